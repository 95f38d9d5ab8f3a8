"""The evaluation run behind ``accord-face evaluate``.

For each identity x prompt x scale x seed: generate with the adapter, then
measure identity similarity (with an evaluation recognizer, ideally not the
conditioning one) and CLIP-T. Then the paper's coupling diagnostics on
held-out samples. Writes, under ``out``:

    samples.jsonl   one record per generated image (appended as it goes: a rerun resumes)
    samples.csv     the same as a table
    metrics.json    aggregates (stable schema, ``schema_version``)
    report.md       a Markdown summary
    grid_<identity>.png   prompts (rows) x scales (columns), first seed
    tradeoff.png    identity similarity vs CLIP-T across scales

Reports and the ``--compare`` table live in ``accord_face.evaluate_report``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from . import metrics
from .config import field, to_dict
from .pipeline import (IMAGE_SUFFIXES, FaceIDGenerator, GenerateError, append_line, atomic_save_image,
                       atomic_write_text, check_adapter_files, identity_embedding, load_image_rgb, make_face_analyzer,
                       read_adapter_config)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


@dataclass
class EvaluateConfig:
    """Settings of one evaluation run (recorded in metrics.json)."""

    adapter: str = field(help="exported adapter folder")
    faces: str = field(help="folder of reference photos: one sub-folder per identity, or one photo per identity")
    prompts: str = field(help="text file, one prompt per line (blank lines and # comments ignored)")
    scales: list[float] = field(default_factory=lambda: [0.3, 0.6, 1.0], help="adapter scales to sweep")
    seeds: list[int] = field(default_factory=lambda: [0], help="seeds per (identity, prompt, scale)")
    steps: int = field(30, help="denoising steps")
    batch_size: int = field(8, help="images per pipeline call ((prompt, seed) pairs of one identity and scale)")
    guidance: float = field(5.0, help="classifier-free guidance scale")
    negative_prompt: str = field("", help="negative prompt")
    pretrained: Optional[str] = field(None, help="base model; default: the one recorded by the adapter")
    resolution: Optional[int] = field(None, help="image size; default: the adapter's training resolution")
    id_model: str = field("opencv-zoo", help="face analyzer backend for identity similarity (opencv-zoo | insightface)")
    id_model_root: Optional[str] = field(None, help="model folder for the identity analyzer")
    id_model_name: Optional[str] = field(None, help="model pack name for the identity analyzer (insightface)")
    clip_model: str = field("openai/clip-vit-base-patch32", help="CLIP folder or hub id for CLIP-T; 'none' skips")
    shards: Optional[str] = field(None, help="held-out shards for the coupling diagnostics; "
                                            "default: the reference photos paired with the prompts")
    coupling_samples: int = field(8, help="held-out samples for the coupling diagnostics (0 skips them)")
    coupling_timesteps: int = field(10, help="timesteps in the grid for sum_t (t/T)|Delta_t|")
    superclass: str = field("a photo of a person", help="superclass prompt c_s of the PDLoss cosine gap")
    text_projection: Optional[str] = field(None, help="CLIPTextModelWithProjection folder for the cosine gap; "
                                                      "default: the one saved beside an embedded base model")
    out: str = field("outputs/evaluate", help="output folder")
    device: Optional[str] = field(None, help="torch device; default cuda when available")
    clip_image_encoder: Optional[str] = field(None, help="FaceID-Plus: CLIP vision tower (hub id or folder); "
                                                         "default: the adapter's recorded image_encoder_path")
    s_scale: Optional[float] = field(None, help="FaceID-Plus-V2 shortcut weight; default: the trained value")
    lora_scale: float = field(1.0, help="strength of the adapter's identity LoRA (when it has one)")

    def validate(self) -> None:
        if not self.scales or not self.seeds:
            raise ValueError("scales and seeds must not be empty")
        if self.steps < 1 or self.batch_size < 1 or self.coupling_samples < 0 or self.coupling_timesteps < 1:
            raise ValueError("steps, batch_size and coupling_timesteps must be >= 1, coupling_samples >= 0")


# ----------------------------------------------------------------------------- inputs


def load_identities(folder: str | Path) -> dict[str, list[Path]]:
    """{identity: photos}: each sub-folder with photos is one identity; each loose photo is one identity."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GenerateError(f"faces folder {folder} does not exist")
    ids: dict[str, list[Path]] = {}
    for entry in sorted(folder.iterdir()):
        if entry.is_dir():
            photos = sorted(p for p in entry.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if photos:
                ids[entry.name] = photos
        elif entry.suffix.lower() in IMAGE_SUFFIXES:
            ids[entry.stem] = [entry]
    if not ids:
        raise GenerateError(f"no photos ({', '.join(IMAGE_SUFFIXES)}) in {folder} or its sub-folders")
    return ids


def load_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise GenerateError(f"prompts file {path} does not exist")
    prompts = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if not prompts:
        raise GenerateError(f"{path} holds no prompts (one per line)")
    return prompts


def sample_key(identity: str, p_idx: int, scale: float, seed: int) -> str:
    return f"{identity}|{p_idx}|{scale:g}|{seed}"


def _load_done(path: Path) -> dict[str, dict]:
    """Records of a previous (interrupted) run; a torn last line is ignored."""
    done: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[rec["key"]] = rec
    return done


# ----------------------------------------------------------------------------- the run


def check_evaluate_inputs(cfg: EvaluateConfig) -> None:
    """Paths, device and hub reachability of every model, before anything loads (checks.UsageError)."""
    from . import checks

    checks.check_adapter_dir(cfg.adapter)
    checks.check_folder(cfg.faces, "--faces", "a folder with one sub-folder (or one photo) per identity")
    checks.check_file(cfg.prompts, "--prompts", "a text file with one prompt per line")
    if cfg.shards and not any(c in cfg.shards for c in "*?{,"):   # a folder (globs / brace lists go as they are)
        checks.check_folder(cfg.shards, "--shards", "the folder of held-out *.tar shards")
    checks.check_device(cfg.device)
    if cfg.pretrained:
        checks.check_hub_reachable(cfg.pretrained, "--pretrained")
    if cfg.clip_model != "none":
        checks.check_hub_reachable(cfg.clip_model, "--clip-model", probe="config.json")
    if cfg.text_projection:
        checks.check_hub_reachable(cfg.text_projection, "--text-projection", probe="config.json")
    check_adapter_files(cfg.adapter)   # the weight files are whole and as exported


def run_evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Generate and measure every sample (resuming), add coupling diagnostics, write all outputs."""
    from tqdm.auto import tqdm

    from .evaluate_report import write_outputs
    from .face import load_face_analyzer

    check_evaluate_inputs(cfg)
    out = Path(cfg.out)
    identities, prompts = load_identities(cfg.faces), load_prompts(cfg.prompts)
    # The fingerprint of a run: its settings and the inputs the files held (sample keys use prompt indices).
    settings = {**to_dict(cfg), "prompt_list": prompts,
                "identity_photos": {n: [str(p) for p in photos] for n, photos in identities.items()}}
    settings_path, samples_path = out / "settings.json", out / "samples.jsonl"
    done = _load_done(samples_path)
    if samples_path.is_file():  # keep only complete records, so appends never glue onto a torn last line
        atomic_write_text(samples_path, "".join(json.dumps(r) + "\n" for r in done.values()))
    if done and settings_path.is_file() and json.loads(settings_path.read_text()) != settings:
        raise GenerateError(f"{out} holds an evaluation with other settings ({settings_path}); "
                            "use another --out or delete the folder")
    atomic_write_text(settings_path, json.dumps(settings, indent=2))

    # Faces first (cheap, and the likeliest user error), then the base model.
    cond = make_face_analyzer(read_adapter_config(cfg.adapter))
    try:
        judge = load_face_analyzer(cfg.id_model, cfg.id_model_root, cfg.id_model_name)
    except (OSError, ValueError) as err:
        raise GenerateError(f"identity model {cfg.id_model!r}: {err}") from None
    same = (judge.recognizer_name, judge.backend) == (cond.recognizer_name, cond.backend)
    if same:
        log.warning("identity similarity uses the conditioning recognizer (%s); scores may flatter the adapter",
                    judge.recognizer_name)
    scorer = metrics.IdentityScorer(judge)
    cond_embeds, refs = {}, {}
    for name, photos in identities.items():
        cond_embeds[name], _ = identity_embedding(cond, photos)
        refs[name] = scorer.reference([load_image_rgb(p) for p in photos])
        if refs[name] is None:
            raise GenerateError(f"the identity model finds no face in any photo of {name!r} ({photos[0].parent})")
    gen = FaceIDGenerator(cfg.adapter, cfg.pretrained, cfg.device, lora_scale=cfg.lora_scale,
                          clip_image_encoder=cfg.clip_image_encoder, s_scale=cfg.s_scale)
    # FaceID family: Portrait generates from every photo's embedding, Plus also from the first photo's face crop.
    family = {}
    if gen.family is not None and gen.family.kind != "faceid":
        from .family.generation import photo_inputs

        family = {name: photo_inputs(gen.adapter_cfg, cond, photos, gen.family.clip_size)
                  for name, photos in identities.items()}
    clip = None if cfg.clip_model.lower() == "none" else _load_clip(cfg.clip_model, gen.device)

    # One batched pipeline call per chunk of (prompt, seed) pairs of one identity at one scale
    # (the adapter scale is global to the pipeline, the identity embedding is shared).
    total = len(identities) * len(prompts) * len(cfg.scales) * len(cfg.seeds)
    with tqdm(total=total, desc="evaluate") as bar:
        for name in identities:
            if family:
                gen.family.set_face_crop(family[name]["crop"])
            for scale in cfg.scales:
                pairs = [(i, sd) for i in range(len(prompts)) for sd in cfg.seeds]
                todo = [(i, sd) for i, sd in pairs if sample_key(name, i, scale, sd) not in done]
                bar.update(len(pairs) - len(todo))
                for k in range(0, len(todo), cfg.batch_size):
                    chunk = todo[k:k + cfg.batch_size]
                    texts = [prompts[i] for i, _ in chunk]
                    images = gen.generate_pairs(family[name]["embedding"] if family else cond_embeds[name], texts, [sd for _, sd in chunk], scale=scale,
                                                steps=cfg.steps, guidance=cfg.guidance,
                                                negative_prompt=cfg.negative_prompt, resolution=cfg.resolution)
                    clip_t = clip.score(images, texts) if clip else [None] * len(images)
                    for (p_idx, seed), image, ct in zip(chunk, images, clip_t):
                        rel = f"images/{name}/p{p_idx:02d}_scale{scale:g}_seed{seed}.png"
                        atomic_save_image(image, out / rel)
                        sim = scorer.score(refs[name], image)
                        rec = {"key": sample_key(name, p_idx, scale, seed), "identity": name,
                               "prompt_index": p_idx, "prompt": prompts[p_idx], "scale": scale, "seed": seed,
                               "image": rel, "face_found": sim is not None, "identity_similarity": sim,
                               "clip_t": ct}
                        append_line(samples_path, json.dumps(rec) + "\n")
                        done[rec["key"]] = rec
                        bar.update(1)

    jobs = [(n, i, s) for n in identities for i in range(len(prompts)) for s in cfg.scales]
    records = [done[sample_key(n, i, s, sd)] for n, i, s in jobs for sd in cfg.seeds]
    if cfg.coupling_samples:
        log.info("coupling diagnostics: %d held-out samples x %d timesteps (4 UNet branches each), then the "
                 "PDLoss cosine gap over %d prompts", cfg.coupling_samples, cfg.coupling_timesteps, len(prompts))
    coupling = coupling_diagnostics(gen, cfg, identities, prompts, cond_embeds)
    result = {
        "schema_version": SCHEMA_VERSION,
        "adapter": gen.describe(),
        "identity_model": {"recognizer": judge.recognizer_name, "backend": judge.backend,
                           "embedding_dim": int(judge.embedding_dim), "same_as_conditioning": same},
        "clip_model": clip.name if clip else None,
        "settings": settings,
        "num_identities": len(identities), "num_prompts": len(prompts), "num_samples": len(records),
        **aggregate(records, cfg.scales, list(identities)),
        "coupling": coupling,
    }
    write_outputs(out, result, records, prompts, cfg.scales, cfg.seeds[0])
    return result


def _load_clip(name: str, device: str) -> metrics.ClipTextScorer:
    try:
        return metrics.ClipTextScorer.from_pretrained(name, device=device)
    except ValueError as err:
        raise GenerateError(str(err)) from None


def _summary(recs: list[dict]) -> dict[str, float]:
    """Mean identity similarity over faces found, face-not-found rate, mean CLIP-T."""
    n = len(recs)
    sims = [r["identity_similarity"] for r in recs if r["face_found"]]
    return {"n": n, "identity_similarity": metrics.mean_or_nan(sims),
            "face_not_found_rate": (n - len(sims)) / n if n else math.nan,
            "clip_t": metrics.mean_or_nan([r["clip_t"] for r in recs])}


def aggregate(records: list[dict], scales: list[float], identities: list[str]) -> dict[str, Any]:
    """``overall``, ``per_scale`` (list, ascending scale) and ``per_identity`` summaries."""
    return {
        "overall": _summary(records),
        "per_scale": [{"scale": s, **_summary([r for r in records if r["scale"] == s])} for s in sorted(scales)],
        "per_identity": {n: _summary([r for r in records if r["identity"] == n]) for n in identities},
    }


# ----------------------------------------------------------------------------- coupling diagnostics


def _holdout_batch(gen: FaceIDGenerator, cfg: EvaluateConfig, identities: dict[str, list[Path]],
                   prompts: list[str], cond_embeds: dict[str, np.ndarray]
                   ) -> tuple[torch.Tensor, list[str], torch.Tensor, str]:
    """(pixels (B, 3, R, R) in [-1, 1], captions, identity embeddings (B, D), source description)."""
    from .data import build_dataset, load_image

    res = cfg.resolution or gen.resolution
    if cfg.shards:
        ds = build_dataset(cfg.shards, resolution=res, shuffle_buffer=1, split_by_node=False, split_by_worker=False)
        items = []
        for item in ds:
            items.append(item)
            if len(items) >= cfg.coupling_samples:
                break
        if not items:
            raise GenerateError(f"no readable samples in the held-out shards {cfg.shards}")
        return (torch.stack([s["pixel_values"] for s in items]), [s["caption"] for s in items],
                torch.stack([s["face_embedding"] for s in items]), f"shards:{cfg.shards}")
    pix, caps, embs = [], [], []
    pairs = [(n, p) for n, photos in identities.items() for p in photos]
    for k in range(min(cfg.coupling_samples, len(pairs) * len(prompts))):
        name, photo = pairs[k % len(pairs)]
        pix.append(load_image(photo.read_bytes(), res))
        caps.append(prompts[k % len(prompts)])
        embs.append(torch.from_numpy(cond_embeds[name]))
    return torch.stack(pix), caps, torch.stack(embs), "reference photos x prompts"


@torch.no_grad()
def coupling_diagnostics(gen: FaceIDGenerator, cfg: EvaluateConfig, identities: dict[str, list[Path]],
                         prompts: list[str], cond_embeds: dict[str, np.ndarray]) -> dict[str, Any]:
    """DDLoss discrepancy on held-out samples and the PDLoss cosine gap over the prompts (adapter scale 1)."""
    from diffusers import DDPMScheduler

    out: dict[str, Any] = {"adapter_scale": 1.0}
    pipe = gen.pipe
    if gen.family is not None and gen.family.image_encoder is not None:
        why = "not implemented for FaceID-Plus (the diagnostics feed embeddings only, no CLIP face crops)"
        return {**out, "dd": {"skipped": why}, "pd": {"skipped": why}}
    if cfg.coupling_samples == 0:
        return {**out, "dd": {"skipped": "coupling_samples = 0"}, "pd": {"skipped": "coupling_samples = 0"}}
    pipe.set_ip_adapter_scale(1.0)
    dtype, device = gen.dtype, gen.device
    pixels, captions, embeds, source = _holdout_batch(gen, cfg, identities, prompts, cond_embeds)
    if embeds.shape[1] != int(gen.adapter_cfg["id_embed_dim"]):
        raise GenerateError(f"held-out identity embeddings are {embeds.shape[1]}-d but the adapter takes "
                            f"{gen.adapter_cfg['id_embed_dim']}-d; use shards made with the adapter's recognizer")
    latents = _encode_latents(pipe, pixels.to(device), dtype)
    # The same text encoding as the pipelines (SDXL: penultimate layers of both encoders + pooled text).
    enc = [pipe.encode_prompt(prompt=p, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
           for p in (captions, [""])]
    sdxl = {}
    if gen.is_sdxl:
        res = cfg.resolution or gen.resolution
        sdxl = {"pooled_joint": enc[0][2], "pooled_null": enc[1][2],
                "time_ids": torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32).repeat(len(captions), 1)}
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    dd = metrics.dependence_discrepancy(pipe.unet, scheduler, latents.float(), enc[0][0], enc[1][0],
                                        embeds.to(device), num_timesteps=cfg.coupling_timesteps,
                                        seed=cfg.seeds[0], **sdxl)
    out["dd"] = {"discrepancy": dd.discrepancy, "weighted_mean": dd.weighted_mean,
                 "delta_by_quartile": {str(k): v for k, v in sorted(dd.delta_by_quartile.items())},
                 "abs_delta_by_t": {str(k): v for k, v in dd.abs_delta_by_t.items()},
                 "num_samples": dd.num_samples, "source": source}
    out["pd"] = _prior_gap(gen, cfg, prompts, cond_embeds)
    return out


def _encode_latents(pipe, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Clean latents (posterior mean, deterministic); in fp32 where the VAE asks for it (SDXL's force_upcast)."""
    vae = pipe.vae
    upcast = dtype != torch.float32 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        latents = vae.encode(pixels.to(torch.float32 if upcast else dtype)).latent_dist.mean
    finally:
        if upcast:
            vae.to(dtype)
    return latents * vae.config.scaling_factor


def _prior_gap(gen: FaceIDGenerator, cfg: EvaluateConfig, prompts: list[str],
               cond_embeds: dict[str, np.ndarray]) -> dict[str, Any]:
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    from .tiny import projection_model_path
    from .train.models import PD_MAPPINGS  # the trainer's f_p, so the gap measures what PDLoss optimised

    if cfg.text_projection:
        path = cfg.text_projection
        model, tokenizer = CLIPTextModelWithProjection.from_pretrained(path), CLIPTokenizer.from_pretrained(path)
    elif gen.is_sdxl:  # as the trainer's clip_model=auto: SDXL's own text_encoder_2
        path = f"{gen.base_model} (text_encoder_2)"
        model, tokenizer = gen.pipe.text_encoder_2, gen.pipe.tokenizer_2
    elif projection_model_path(gen.base_model):
        path = projection_model_path(gen.base_model)
        model, tokenizer = CLIPTextModelWithProjection.from_pretrained(path), CLIPTokenizer.from_pretrained(path)
    else:
        return {"skipped": "no CLIP text projection model (pass --text-projection DIR)"}
    model = model.eval().to(gen.device)
    name = (gen.adapter_cfg.get("losses") or {}).get("pd_mapping") or (
        "text_projection_mean_tail" if gen.is_sdxl else "text_projection_mean")
    if name not in PD_MAPPINGS:
        return {"skipped": f"unknown pd_mapping {name!r} in adapter_config.json"}
    proj = gen.pipe.unet.encoder_hid_proj.image_projection_layers[0]
    embeds = torch.from_numpy(np.stack(list(cond_embeds.values()))).to(gen.device, gen.dtype)  # (N, D)
    tokens = proj(embeds[:, None, :])                                                            # (N, K, E)
    try:
        gap = metrics.prior_cosine_gap(tokens.float(), model, tokenizer, prompts, cfg.superclass,
                                       mapping=PD_MAPPINGS[name])
    except (ValueError, RuntimeError) as err:  # RuntimeError: a width mismatch inside the mapping
        return {"skipped": " ".join(str(err).split())}
    gap["pd_mapping"] = name
    return {**gap, "projection_model": str(path), "superclass": cfg.superclass}
