"""Zero-shot evaluation on held-out world identities: does the adapter carry the person, and the prompt?

For each held-out identity: one reference photo in context A, prompts naming other contexts
B != A (another background, shirt and accessory), generated with the adapter and without it
(adapter scale 0: the base model's unconditioned draw, same noise). Measured on every image:

- identity similarity: cos(recognizer B of the reference, recognizer B of the image) —
  recognizer B is independent of the conditioning recognizer A;
- retrieval top-1: the image's nearest reference among all evaluated identities is its own
  (chance = 1 / identities);
- context accuracy: the judge finds B's attribute (per field, and all fields at once);
- coupling: the judge finds A's attribute although B was asked for (fields where A != B);
- CLIP-T: 100 * cos(world CLIP image, prompt).

Per-identity means are the unit of analysis: means come with Student-t 95 % intervals over
identities, adapter-vs-base differences are paired by identity.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from dataclasses import field as dc_field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..config import field
from .pool import CONTEXT_FIELDS, encode_context
from .render import ACCESSORIES, BACKGROUNDS, FRAMINGS, HELD_OUT_START, SHIRTS, Context, caption

log = logging.getLogger(__name__)


@dataclass
class WorldEvalConfig:
    adapter: str = field(help="exported adapter folder (trained on embedded:faces)")
    out: str = field("outputs/world-eval", help="output folder (metrics.json, samples.jsonl, grid.png)")
    identities: int = field(50, help="held-out identities evaluated (from identity `first` on)")
    first: int = field(2000, help="first identity evaluated: 2000 = the held-out split; below 2000 evaluates "
                                  "training people (a generalisation check, not zero-shot)")
    prompts_per_identity: int = field(2, help="prompts with other contexts per identity")
    conditioning_photos: int = field(1, help="photos of each person the adapter is conditioned on: the reference "
                                             "(the retrieval gallery's photo) plus n-1 others of that person, "
                                             "embeddings averaged as `generate --photo A --photo B` does")
    scale: float = field(1.0, help="adapter scale of the adapter arm")
    steps: int = field(25, help="denoising steps")
    guidance: float = field(4.0, help="classifier-free guidance scale")
    batch_size: int = field(16, help="images per pipeline call")
    seed: int = field(0, help="reference contexts, prompts and noise")
    scheduler: str = field("", help="sampler: '' = the pipeline's own (DDPM), or ddim / dpm (DPMSolverMultistep) / "
                                    "euler, made from its config")
    pretrained: str = field("", help="base pipeline (folder or id) to generate with instead of the one the adapter "
                                     "records (both arms: adapter and no adapter)")


SCHEDULERS = {"ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler"}


def other_context(a: Context, rng: np.random.Generator) -> Context:
    """A context B that differs from A in background, shirt and accessory (framing drawn freely)."""
    bg = str(rng.choice([b for b in BACKGROUNDS if b != a.background]))
    shirt = str(rng.choice([s for s in SHIRTS if s != a.shirt]))
    acc = str(rng.choice([x for x in ACCESSORIES if x != a.accessory]))
    return Context(bg, shirt, acc, str(rng.choice(FRAMINGS)))


def mean_ci(values) -> dict:
    """{mean, ci95, n, per_run}: Student-t 95 % interval over the values (``accord_face.stats.t_interval``)."""
    from ..stats import t_interval

    return t_interval(values)


class WorldScorer:
    """The evaluation's fixed instruments: recognizer B (identity), the context judge, the world CLIP."""

    def __init__(self):
        from ..metrics import ClipTextScorer
        from .assemble import ensure_world_pipeline, load_judge
        from .backend import WorldAnalyzer

        world = ensure_world_pipeline()
        self.recognizer = WorldAnalyzer(world / "face_models", "b")
        self.judge = load_judge(world)
        self.clip = ClipTextScorer.from_pretrained(world / "world_clip")

    def embed(self, rgb: np.ndarray):
        faces = self.recognizer.analyze(rgb, max_faces=1)
        return faces[0].embedding if faces else None


@dataclass
class EvalPlan:
    """Held-out references and the (identity, prompt, noise) jobs every arm is generated on."""

    folder: Path
    refs: dict                                # name -> {"identity", "file", "context"}
    names: list[str]
    jobs: list[tuple]                         # (name, prompt index, context A, context B, noise seed)
    ref_b: dict                               # name -> recognizer-B embedding of the reference (or None)
    extra: dict = dc_field(default_factory=dict)  # name -> more conditioning photos (folder-relative)

    @classmethod
    def make(cls, folder: Path, identities: int, prompts_per_identity: int, seed: int, scorer: WorldScorer,
             first: int = HELD_OUT_START, conditioning_photos: int = 1):
        from PIL import Image

        from .photos import write_extra_photos, write_reference_photos

        if conditioning_photos < 1:
            raise ValueError(f"conditioning_photos={conditioning_photos}: use 1 (the reference alone) or more")
        refs = write_reference_photos(folder, identities, seed=seed, first=first)
        extra = write_extra_photos(folder, refs, conditioning_photos - 1, seed=seed) if conditioning_photos > 1 else {}
        names = list(refs)
        rng = np.random.default_rng(seed)
        jobs, ref_b = [], {}
        for name in names:
            ref_b[name] = scorer.embed(np.asarray(Image.open(folder / refs[name]["file"]).convert("RGB")))
            a = Context(**refs[name]["context"])
            for p in range(prompts_per_identity):
                jobs.append((name, p, a, other_context(a, rng), int(rng.integers(1 << 30))))
        return cls(Path(folder), refs, names, jobs, ref_b, extra)

    def photo(self, name: str) -> Path:
        return self.folder / self.refs[name]["file"]

    def gallery(self) -> tuple[list[str], np.ndarray]:
        """The retrieval gallery: names with a recognizer-B reference embedding, and those embeddings (R, D)."""
        names = [n for n in self.names if self.ref_b[n] is not None]
        return names, np.stack([self.ref_b[n] for n in names])

    def conditioning(self, name: str) -> list[Path]:
        """The photos ``name``'s generations are conditioned on: the reference first, then the extra ones."""
        return [self.photo(name)] + [self.folder / f for f in self.extra.get(name, [])]


def generate_records(gen, plan: EvalPlan, scorer: WorldScorer, arms: dict[str, float], out: Path, *, steps: int,
                     guidance: float, batch_size: int, progress: bool = True) -> list[dict]:
    """Every job of ``plan`` generated at each arm's adapter scale (same prompts and noise), scored.

    ``gen``: a ``FaceIDGenerator`` with the adapter loaded (any FaceID family member: the identity
    inputs come from ``family.generation.photo_inputs``, the CLIP face crop for FaceID-Plus). An adapter
    with an identity LoRA has it on in every arm of scale > 0 and off at scale 0 (the base model)."""
    from ..family.generation import photo_inputs
    from ..pipeline import make_face_analyzer

    cond = make_face_analyzer(gen.adapter_cfg)
    inputs = {n: photo_inputs(gen.adapter_cfg, cond, plan.conditioning(n), gen.family.clip_size) for n in plan.names}
    gallery = plan.gallery()
    records = []
    with tqdm(total=len(plan.jobs) * len(arms), desc="world eval", disable=not progress, mininterval=5) as bar:
        for arm, scale in arms.items():
            gen.set_identity_lora(scale > 0)
            for name in plan.names:
                gen.family.set_face_crop(inputs[name]["crop"])
                mine = [j for j in plan.jobs if j[0] == name]
                for k in range(0, len(mine), batch_size):
                    chunk = mine[k:k + batch_size]
                    prompts = [caption(b) for _, _, _, b, _ in chunk]
                    images = gen.generate_pairs(inputs[name]["embedding"], prompts, [s for *_, s in chunk],
                                                scale=scale, steps=steps, guidance=guidance)
                    records += score_images(plan, scorer, gallery, chunk, images, prompts, arm, scale, out)
                    bar.update(len(chunk))
    return records


def score_images(plan: EvalPlan, scorer: WorldScorer, gallery: tuple, chunk: list[tuple], images: list,
                 prompts: list[str], arm: str, scale: float, out: Path) -> list[dict]:
    """One record per generated image of ``chunk`` (jobs of ``plan``), saved as ``out/images/<arm>/``: identity
    (recognizer B against ``gallery`` = ``plan.gallery()``), the judge's context, CLIP-T against ``prompts``."""
    from .judge import predict

    ref_names, ref_mat = gallery
    arr = np.stack([np.asarray(im.convert("RGB")) for im in images])
    probs = predict(scorer.judge, arr)
    clip_t = scorer.clip.score(images, prompts)
    records = []
    for i, ((name, p, a, b, seed), im) in enumerate(zip(chunk, images)):
        rel = f"images/{arm}/{name}_p{p}.png"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        im.save(out / rel)
        emb = scorer.embed(arr[i])
        sim = float(emb @ plan.ref_b[name]) if emb is not None and plan.ref_b[name] is not None else None
        top1 = (ref_names[int(np.argmax(ref_mat @ emb))] == name) if emb is not None else False
        want, had = encode_context(b), encode_context(a)
        seen = np.array([int(probs[f][i].argmax()) for f in CONTEXT_FIELDS])
        differs = want != had
        records.append({
            "arm": arm, "scale": scale, "identity": name, "prompt_index": p, "prompt": prompts[i],
            "image": rel, "reference_context": a.attributes(), "face_found": emb is not None,
            "identity_similarity": sim, "retrieval_top1": bool(top1),
            "context_correct": {f: bool(seen[j] == want[j]) for j, f in enumerate(CONTEXT_FIELDS)},
            "all_context_correct": bool((seen == want).all()),
            "coupled": {f: bool(seen[j] == had[j]) for j, f in enumerate(CONTEXT_FIELDS) if differs[j]},
            # continuous judge scores (probabilities), next to the thresholded rates
            "p_asked": float(np.mean([probs[f][i][want[j]] for j, f in enumerate(CONTEXT_FIELDS)])),
            "p_coupled": float(np.mean([probs[f][i][had[j]] for j, f in enumerate(CONTEXT_FIELDS)
                                        if differs[j]])) if differs.any() else None,
            "clip_t": float(clip_t[i]),
            "embedding_b": None if emb is None else [round(float(x), 5) for x in emb],
        })
    return records


def render_ceiling(plan: EvalPlan, scorer: WorldScorer, vae=None) -> dict:
    """What the instruments give a perfect generator: every job's person rendered cleanly (the world's
    own renderer, another photo seed) in the prompt's context B, scored like a generated image.
    Identity similarity and retrieval top-1 among the plan's references, per identity; the ceiling
    that generated images are measured against (recognizer B's own limit across contexts).

    With ``vae`` (the pipeline's ``AutoencoderKL``) the same renders are also scored after a round trip
    through it, x -> decode(mode(encode(x))): ``through_vae``, the ceiling of any generator whose images
    come out of that decoder (a limit the VAE sets, below the renderer's)."""
    from .render import render

    renders = [render(plan.refs[name]["identity"], b, seed % 100_000 + 60_000).image
               for name, p, _, b, seed in plan.jobs]                                    # each (H, W, 3) uint8
    out = _identity_scores(plan, scorer, renders)
    out["what"] = "clean renders of each job's person in context B (perfect generator), recognizer B"
    if vae is not None:
        out["through_vae"] = _identity_scores(plan, scorer, vae_round_trip(vae, np.stack(renders)))
    return out


def vae_round_trip(vae, images: np.ndarray, batch: int = 32) -> list[np.ndarray]:
    """uint8 images (N, H, W, 3) -> decode(mode(encode(x))) as uint8 (N, H, W, 3), x scaled to [-1, 1]."""
    import torch

    out = []
    with torch.no_grad():
        for k in range(0, len(images), batch):
            x = torch.from_numpy(images[k:k + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1   # (B, 3, H, W)
            x = x.to(vae.device, vae.dtype)
            y = vae.decode(vae.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1)
            out.extend(((y + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    return out


def _identity_scores(plan: EvalPlan, scorer: WorldScorer, images: list[np.ndarray]) -> dict:
    """Per-identity identity similarity and retrieval top-1 of one image per job of ``plan``."""
    ref_names = [n for n in plan.names if plan.ref_b[n] is not None]
    ref_mat = np.stack([plan.ref_b[n] for n in ref_names])                              # (R, D)
    sims: dict[str, list] = {n: [] for n in plan.names}
    hits: dict[str, list] = {n: [] for n in plan.names}
    for (name, *_), image in zip(plan.jobs, images):
        emb = scorer.embed(image)
        if emb is None or plan.ref_b[name] is None:
            hits[name].append(0.0)
            continue
        sims[name].append(float(emb @ plan.ref_b[name]))
        hits[name].append(float(ref_names[int(np.argmax(ref_mat @ emb))] == name))
    per = lambda d: [float(np.mean(v)) if v else float("nan") for v in d.values()]   # noqa: E731
    return {"identity_similarity": mean_ci(per(sims)), "retrieval_top1": mean_ci(per(hits))}


def write_records(path: Path, records: list[dict]) -> None:
    from ..pipeline import atomic_write_text

    atomic_write_text(path, "".join(json.dumps({k: v for k, v in r.items() if k != "embedding_b"}) + "\n"
                                    for r in records))


def run_world_eval(cfg: WorldEvalConfig) -> dict:
    from ..pipeline import FaceIDGenerator, atomic_write_text

    if cfg.scheduler and cfg.scheduler not in SCHEDULERS:
        raise ValueError(f"--scheduler {cfg.scheduler!r}: choose '' (the pipeline's own) or one of {list(SCHEDULERS)}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    scorer = WorldScorer()
    plan = EvalPlan.make(out / "references", cfg.identities, cfg.prompts_per_identity, cfg.seed, scorer,
                         first=cfg.first, conditioning_photos=cfg.conditioning_photos)
    gen = FaceIDGenerator(cfg.adapter, cfg.pretrained or None, "cpu")
    if cfg.scheduler:
        import diffusers

        gen.pipe.scheduler = getattr(diffusers, SCHEDULERS[cfg.scheduler]).from_config(gen.pipe.scheduler.config)
    gen.pipe.set_progress_bar_config(disable=True)
    records = generate_records(gen, plan, scorer, {"adapter": cfg.scale, "base": 0.0}, out, steps=cfg.steps,
                               guidance=cfg.guidance, batch_size=cfg.batch_size)
    write_records(out / "samples.jsonl", records)
    metrics = summarize(records, plan.names, cfg)
    metrics["render_ceiling"] = render_ceiling(plan, scorer, vae=gen.pipe.vae)
    metrics["config"] = asdict(cfg)
    metrics["identity_model"] = scorer.recognizer.describe()
    from ..pipeline import make_face_analyzer

    metrics["conditioning_model"] = make_face_analyzer(gen.adapter_cfg).describe()
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_grid(out, records, plan.refs, plan.names[:8])
    return metrics


# One image record's value of each metric (None: not defined for that image); per person, the mean over images.
RECORD_METRICS = {
    "identity_similarity": lambda r: r["identity_similarity"],
    "retrieval_top1": lambda r: float(r["retrieval_top1"]),
    "context_accuracy": lambda r: float(np.mean(list(r["context_correct"].values()))),
    "all_context_correct": lambda r: float(r["all_context_correct"]),
    "coupling_rate": lambda r: float(np.mean(list(r["coupled"].values()))) if r["coupled"] else None,
    "clip_t": lambda r: r["clip_t"],
    "face_found": lambda r: float(r["face_found"]),
}


def _per_identity(records, names, key):
    vals = []
    for n in names:
        v = [key(r) for r in records if r["identity"] == n]
        v = [x for x in v if x is not None]
        vals.append(float(np.mean(v)) if v else float("nan"))
    return vals


def summarize(records: list[dict], names: list[str], cfg: WorldEvalConfig) -> dict:
    arms = sorted({r["arm"] for r in records})
    out: dict = {"identities": len(names), "chance_top1": 1.0 / len(names), "arms": {}}
    per: dict = {}
    for arm in arms:
        rs = [r for r in records if r["arm"] == arm]
        per[arm] = {k: _per_identity(rs, names, f) for k, f in RECORD_METRICS.items()}
        out["arms"][arm] = {k: mean_ci(v) for k, v in per[arm].items()}
        out["arms"][arm]["per_identity"] = {k: [round(x, 5) for x in v] for k, v in per[arm].items()}
        out["arms"][arm]["context_accuracy_by_field"] = {
            f: float(np.mean([r["context_correct"][f] for r in rs])) for f in CONTEXT_FIELDS}
        out["arms"][arm]["verification_on_generated"] = generated_verification(rs)
    if {"adapter", "base"} <= set(arms):
        out["paired_adapter_minus_base"] = {
            k: mean_ci(np.array(per["adapter"][k]) - np.array(per["base"][k]))
            for k in ("identity_similarity", "retrieval_top1", "context_accuracy", "coupling_rate", "clip_t")}
        base_ctx = out["arms"]["base"]["context_accuracy"]["mean"]
        out["context_accuracy_ratio_vs_base"] = out["arms"]["adapter"]["context_accuracy"]["mean"] / base_ctx
    return out


def generated_verification(records: list[dict]) -> dict | None:
    """Recognizer-B verification between generated images: same identity (other prompt) vs other identities."""
    from .face_models import verification

    rs = [r for r in records if r["embedding_b"] is not None]
    if len(rs) < 4:
        return None
    ids = np.array([r["identity"] for r in rs])
    if len(set(ids)) == len(ids):
        return None
    v = verification(np.array([r["embedding_b"] for r in rs]), ids, np.random.default_rng(0), pairs=500)
    return {"accuracy": v.accuracy, "same_mean_cos": v.same_mean, "diff_mean_cos": v.diff_mean, "pairs": v.pairs}


def write_grid(out: Path, records: list[dict], refs: dict, names: list[str]) -> Path:
    """Rows: identities; columns: reference | adapter images (one per prompt) | base images; prompts below."""
    from PIL import Image, ImageDraw

    rows = []
    for n in names:
        row = [Image.open(out / "references" / refs[n]["file"]).convert("RGB")]
        for arm in ("adapter", "base"):
            row += [Image.open(out / r["image"]).convert("RGB") for r in records
                    if r["identity"] == n and r["arm"] == arm]
        rows.append(row)
    cols = max(len(r) for r in rows)
    cell, scale = 64, 2
    grid = Image.new("RGB", (cols * cell * scale, len(rows) * cell * scale + 14), "white")
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            grid.paste(im.resize((cell * scale, cell * scale), Image.NEAREST), (x * cell * scale, y * cell * scale))
    k = (cols - 1) // 2
    ImageDraw.Draw(grid).text((2, len(rows) * cell * scale + 1),
                              f"reference | adapter x{k} | no adapter x{k} (same prompts and noise)", fill="black")
    path = out / "grid.png"
    grid.save(path)
    return path
