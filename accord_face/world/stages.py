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
    unet = train_unet(cfg.unet, pool, vae, text, tok, cache_root(cfg) / f"unet_work-{digest}")
    tmp = stage_tmp(cfg, "unet")
    unet.save_pretrained(tmp, safe_serialization=True)
    finish_stage(cfg, "unet", tmp, {"params_m": sum(p.numel() for p in unet.parameters()) / 1e6})
    return {}


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


def run_assets(cfg: WorldConfig) -> dict:
    """Copy the trained weights (fp16 safetensors, fp32 ONNX) and their record into the package assets."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from .assemble import RECORD, _load_fp32, assets_dir

    root, out = cache_root(cfg), assets_dir()
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
    metrics = {s: json.loads((root / s / "DONE.json").read_text())["metrics"]
               for s in ("clip", "vae", "unet", "detector", "recognizer_a", "recognizer_b", "judge")}
    record = {"config": cfg.model_fields(), "vae_scaling_factor": float(vae.config.scaling_factor),
              "metrics": metrics, "rebuild": "python -m accord_face.world.build"}
    (out / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    size = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    log.info("world assets: %.1f MB in %s", size, out)
    return {"assets_mb": size}


STAGE_FUNCTIONS = {"unet": run_unet, "detector": run_detector, "recognizer_a": run_recognizer_a,
                   "recognizer_b": run_recognizer_b, "judge": run_judge, "assets": run_assets}
