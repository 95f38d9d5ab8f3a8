"""The model stages of the world build past the autoencoder (see ``build.py`` for the order)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from .build import cache_root, finish_stage, load_pool, stage_config, stage_tmp
from .config import WorldConfig

log = logging.getLogger("accord_face.world")


def _clip_parts(cfg: WorldConfig):
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

    folder = cache_root(cfg) / "clip"
    clip = CLIPModel.from_pretrained(folder).eval()
    text = CLIPTextModel(clip.config.text_config)
    text.load_state_dict(clip.text_model.state_dict())
    return clip, text.eval(), CLIPTokenizer.from_pretrained(folder)


def _save_module(module: torch.nn.Module, path: Path, half: bool = False) -> None:
    from safetensors.torch import save_file

    state = {k: (v.half() if half and v.is_floating_point() else v).contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path))


def run_unet(cfg: WorldConfig) -> dict:
    from diffusers import AutoencoderKL

    from .unet import train_unet

    pool = load_pool(cfg)
    _, text, tok = _clip_parts(cfg)
    vae = AutoencoderKL.from_pretrained(cache_root(cfg) / "vae").eval()
    # Checkpoints and cached latents belong to this config (the step count aside: a longer run resumes).
    key = stage_config(cfg, "unet")
    key["unet"] = {k: v for k, v in key["unet"].items() if k not in ("steps", "checkpoint_every")}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    init = committed_unet(cfg, text.config.hidden_size) if cfg.unet.continue_from else None
    unet = train_unet(cfg.unet, pool, vae, text, tok, cache_root(cfg) / f"unet_work-{digest}", init=init)
    tmp = stage_tmp(cfg, "unet")
    unet.save_pretrained(tmp, safe_serialization=True)
    finish_stage(cfg, "unet", tmp, {"params_m": sum(p.numel() for p in unet.parameters()) / 1e6})
    return {}


def committed_unet(cfg: WorldConfig, cross_attention_dim: int) -> tuple[dict, int]:
    """(fp32 state dict, step count) of the UNet ``unet.continue_from`` names (``assets``: the committed one;
    else a world assets folder); a ConfigError unless it was trained on this config's photos, text tower and
    latents with this architecture, for fewer steps than ``unet.steps``."""
    from ..config import ConfigError
    from .assemble import _load_fp32, assets_dir, read_record
    from .unet import build_unet

    src = assets_dir() if cfg.unet.continue_from == "assets" else Path(cfg.unet.continue_from)
    theirs = record_config(read_record(src))
    rec, mine = theirs.model_fields(), cfg.model_fields()
    arch = ("channels", "heads")
    for section in ("pool", "clip", "vae"):
        if rec[section] != mine[section]:
            raise ConfigError(f"unet.continue_from={cfg.unet.continue_from}: the UNet there was trained with another "
                              f"{section} config ({src / 'world.json'}); drop the {section}.* overrides")
    if any(rec["unet"][k] != mine["unet"][k] for k in arch):
        raise ConfigError(f"unet.continue_from={cfg.unet.continue_from}: unet.channels / unet.heads differ from its UNet's "
                          f"({rec['unet']['channels']}, {rec['unet']['heads']}); drop those overrides")
    done = int(rec["unet"]["steps"])
    if cfg.unet.steps <= done:
        raise ConfigError(f"unet.continue_from={cfg.unet.continue_from}: unet.steps={cfg.unet.steps} must exceed "
                          f"the {'committed ' if cfg.unet.continue_from == 'assets' else ''}UNet's {done} steps")
    unet = _load_fp32(build_unet(theirs.unet, cross_attention_dim), src / "unet.safetensors")
    return unet.state_dict(), done


def run_detector(cfg: WorldConfig) -> dict:
    from .face_models import Detector, detector_error, export_onnx, train_detector

    pool = load_pool(cfg)
    net = train_detector(cfg.detector, pool)
    metrics = detector_error(net, pool, np.random.default_rng(97).integers(0, len(pool), 500),
                             np.random.default_rng(96))
    tmp = stage_tmp(cfg, "detector")
    _save_module(net, tmp / "detector.safetensors")
    export_onnx(net, tmp / "detector.onnx", 64, ["landmarks_and_logit"])
    assert isinstance(net, Detector)
    finish_stage(cfg, "detector", tmp, metrics)
    return metrics


def held_out_verification(analyzer, n_ids: int = 200, per_id: int = 4, seed: int = 0) -> dict:
    """Verification accuracy of a face analyzer on held-out identities' clean renders (detect -> align -> embed)."""
    from .face_models import held_out_photos, verification

    imgs, ids, _ = held_out_photos(n_ids, per_id, seed)
    embs, keep = [], []
    for i, im in enumerate(imgs):
        faces = analyzer.analyze(im, max_faces=1)
        if faces:
            embs.append(faces[0].embedding), keep.append(i)
    v = verification(np.stack(embs), ids[keep], np.random.default_rng(seed))
    return {"verification_accuracy": v.accuracy, "threshold": v.threshold, "same_mean_cos": v.same_mean,
            "diff_mean_cos": v.diff_mean, "pairs": v.pairs, "faces_found": len(keep) / len(imgs),
            "identities": n_ids, "photos_per_identity": per_id}


def _run_recognizer(cfg: WorldConfig, kind: str) -> dict:
    from .backend import WorldAnalyzer
    from .face_models import export_onnx, train_recognizer

    pool = load_pool(cfg)
    rcfg = cfg.recognizer_a if kind == "a" else cfg.recognizer_b
    net = train_recognizer(kind, rcfg, pool)
    stage = f"recognizer_{kind}"
    tmp = stage_tmp(cfg, stage)
    _save_module(net, tmp / f"{stage}.safetensors")
    export_onnx(net, tmp / f"{stage}.onnx", net.crop, ["embedding"])
    shutil.copy2(cache_root(cfg) / "detector" / "detector.onnx", tmp / "detector.onnx")
    metrics = held_out_verification(WorldAnalyzer(tmp, kind, threads=1))
    os.remove(tmp / "detector.onnx")
    finish_stage(cfg, stage, tmp, metrics)
    return metrics


def run_recognizer_a(cfg: WorldConfig) -> dict:
    return _run_recognizer(cfg, "a")


def run_recognizer_b(cfg: WorldConfig) -> dict:
    return _run_recognizer(cfg, "b")


def run_judge(cfg: WorldConfig) -> dict:
    from .judge import IDENTITY_FIELDS, accuracy, identity_codes, train_judge
    from .pool import CONTEXT_FIELDS, encode_context
    from .render import random_context, render

    pool = load_pool(cfg)
    net = train_judge(cfg.judge, pool)
    rng = np.random.default_rng(95)
    photos = [render(2000 + int(rng.integers(400)), random_context(rng), int(rng.integers(1 << 20)))
              for _ in range(600)]
    ctx = np.stack([encode_context(p.context) for p in photos])
    idc = np.stack([identity_codes(p.identity.index) for p in photos])
    truth = {k: ctx[:, j] for j, k in enumerate(CONTEXT_FIELDS)}
    truth.update({k: idc[:, j] for j, k in enumerate(IDENTITY_FIELDS)})
    metrics = {"held_out_accuracy": accuracy(net, np.stack([p.image for p in photos]), truth)}
    tmp = stage_tmp(cfg, "judge")
    _save_module(net, tmp / "judge.safetensors")
    finish_stage(cfg, "judge", tmp, metrics)
    return metrics


def run_assets(cfg: WorldConfig, out: Path | None = None) -> dict:
    """Copy the trained weights (fp16 safetensors, fp32 ONNX) and their record (written last) into the package
    assets, or into ``out``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from .assemble import RECORD, _load_fp32, assets_dir

    root, out = cache_root(cfg), (out or assets_dir())
    out.mkdir(parents=True, exist_ok=True)
    clip, _, _ = _clip_parts(cfg)
    _save_module(clip, out / "clip.safetensors", half=True)
    vae = AutoencoderKL.from_pretrained(root / "vae")
    _save_module(vae, out / "vae.safetensors", half=True)
    _save_module(UNet2DConditionModel.from_pretrained(root / "unet"), out / "unet.safetensors", half=True)
    from .judge import Judge

    _save_module(_load_fp32(Judge(), root / "judge" / "judge.safetensors"), out / "judge.safetensors", half=True)
    shutil.copy2(root / "detector" / "detector.onnx", out / "detector.onnx")
    for kind in ("a", "b"):
        shutil.copy2(root / f"recognizer_{kind}" / f"recognizer_{kind}.onnx", out / f"recognizer_{kind}.onnx")
    metrics = {s: {k: v for k, v in json.loads((root / s / "DONE.json").read_text())["metrics"].items()
                   if k != "seeded_from"} for s in SEEDABLE}
    record = {"config": cfg.model_fields(), "vae_scaling_factor": float(vae.config.scaling_factor),
              "metrics": metrics, "rebuild": REBUILD}
    (out / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    size = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    log.info("world assets: %.1f MB in %s", size, out)
    return {"assets_mb": size}


REBUILD = "python -m accord_face.world.build use_assets=false"
SEEDABLE = ("clip", "vae", "unet", "detector", "recognizer_a", "recognizer_b", "judge")


def record_config(rec: dict) -> WorldConfig:
    """The WorldConfig a ``world.json`` record describes (fields it predates take their defaults)."""
    import dataclasses

    kinds = {f.name: f.default_factory for f in dataclasses.fields(WorldConfig)
             if f.default_factory is not dataclasses.MISSING}
    sections = {}
    for name, values in rec["config"].items():
        default = kinds[name]()
        known = {k: v for k, v in values.items() if k in default.__dataclass_fields__}
        sections[name] = dataclasses.replace(default, **known)
    return WorldConfig(**sections)


def seed_from_assets(cfg: WorldConfig) -> list[str]:
    """Fill the build cache with the committed assets' trained parts (``use_assets``): every stage not already
    cached whose config (with those it depends on) equals the one the assets record gets a ``<cache>/<stage>``
    folder made from them, with the record's metrics, so a build that changes one stage (``unet.steps=...``)
    retrains that stage only. The committed weights are fp16, so a seeded part is their fp32 upcast (the
    ``assets`` stage writes them back bit for bit). Returns the seeded stages."""
    from .assemble import ASSETS, RECORD, _load_fp32, assets_dir, build_parts, read_record
    from .build import stage_done
    from .clip import image_processor
    from .judge import Judge

    assets = assets_dir()
    if not (assets / RECORD).is_file():
        return []
    rec = read_record(assets)
    theirs = record_config(rec)
    todo = [s for s in SEEDABLE if not stage_done(cfg, s) and stage_config(theirs, s) == stage_config(cfg, s)]
    if not todo:
        return []
    parts = build_parts(assets)
    for stage in todo:
        tmp = stage_tmp(cfg, stage)
        if stage == "clip":
            parts["clip"].save_pretrained(tmp, safe_serialization=True)
            parts["tokenizer"].save_pretrained(tmp)
            image_processor().save_pretrained(tmp)
        elif stage in ("vae", "unet"):
            parts[stage].save_pretrained(tmp, safe_serialization=True)
        elif stage == "judge":
            _save_module(_load_fp32(Judge(), assets / "judge.safetensors"), tmp / "judge.safetensors")
        else:
            shutil.copy2(assets / f"{stage}.onnx", tmp / f"{stage}.onnx")
        finish_stage(cfg, stage, tmp, {**rec["metrics"][stage], "seeded_from": str(assets)
                                       if assets != ASSETS else "accord_face/world/assets"})
    log.info("world build: seeded %s from the committed assets (%s)", ", ".join(todo), assets)
    return todo


STAGE_FUNCTIONS = {"unet": run_unet, "detector": run_detector, "recognizer_a": run_recognizer_a,
                   "recognizer_b": run_recognizer_b, "judge": run_judge, "assets": run_assets}
