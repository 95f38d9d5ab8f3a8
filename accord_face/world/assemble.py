"""``embedded:faces``: the world's Stable Diffusion pipeline folder, built from the trained weights.

The committed assets (``accord_face/world/assets/``: fp16 safetensors and ONNX, with
``world.json`` recording the config that made them) are expanded on first use into a
cache folder that stock diffusers loads offline::

    <cache>/embedded-faces-<hash>/
        model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/   StableDiffusionPipeline
        text_encoder_projection/   CLIPTextModelWithProjection sharing the text tower (PDLoss)
        world_clip/                CLIPModel + tokenizer + image processor (CLIP-T)
        face_models/               detector.onnx, recognizer_a.onnx, recognizer_b.onnx (backend "world")
        judge/                     judge.safetensors (context / attribute classifier)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parent / "assets"
RECORD = "world.json"
MARKER = "accord_face_world.json"
ONNX_FILES = ("detector.onnx", "recognizer_a.onnx", "recognizer_b.onnx")
WEIGHT_FILES = ("clip.safetensors", "vae.safetensors", "unet.safetensors", "judge.safetensors")


class WorldMissingError(FileNotFoundError):
    """The world's trained weights are not there (message says how to build them)."""


def assets_dir() -> Path:
    return Path(os.environ.get("ACCORD_FACE_WORLD_ASSETS", ASSETS))


def read_record(assets: Path | None = None) -> dict:
    path = (assets or assets_dir()) / RECORD
    if not path.is_file():
        raise WorldMissingError(f"the identity world's weights are missing ({path}): build them with "
                                "'python -m accord_face.world.build' (about an hour on 2 CPU cores)")
    return json.loads(path.read_text())


def assets_hash(assets: Path | None = None) -> str:
    assets = assets or assets_dir()
    digest = hashlib.sha256()
    for name in (RECORD, *WEIGHT_FILES, *ONNX_FILES):
        digest.update(name.encode())
        digest.update(hashlib.sha256((assets / name).read_bytes()).digest())
    return digest.hexdigest()[:12]


def _load_fp32(module: torch.nn.Module, path: Path) -> torch.nn.Module:
    from safetensors.torch import load_file

    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    module.load_state_dict(state)
    return module.eval()


def build_parts(assets: Path | None = None) -> dict:
    """The trained models (fp32) from the assets: clip, text_encoder, projection, tokenizer, vae, unet, scheduler."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from .clip import build_clip
    from .config import ClipConfig, UnetConfig, VaeConfig
    from .unet import build_scheduler, build_unet
    from .vae import build_vae

    assets = assets or assets_dir()
    rec = read_record(assets)
    cfg = rec["config"]
    clip, tok = build_clip(ClipConfig(**cfg["clip"]))
    _load_fp32(clip, assets / "clip.safetensors")
    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    projection = CLIPTextModelWithProjection(clip.config.text_config)
    projection.text_model.load_state_dict(clip.text_model.state_dict())
    projection.text_projection.load_state_dict(clip.text_projection.state_dict())
    vae = _load_fp32(build_vae(VaeConfig(**cfg["vae"])), assets / "vae.safetensors")
    vae.register_to_config(scaling_factor=float(rec["vae_scaling_factor"]))
    unet = _load_fp32(build_unet(UnetConfig(**cfg["unet"]), clip.config.text_config.hidden_size),
                      assets / "unet.safetensors")
    return {"clip": clip, "tokenizer": tok, "text_encoder": text_encoder.eval(), "projection": projection.eval(),
            "vae": vae, "unet": unet, "scheduler": build_scheduler()}


def save_world_pipeline(folder: Path, parts: dict, assets: Path, marker: dict) -> Path:
    """Write the pipeline folder (atomically: a temporary folder renamed when complete)."""
    from diffusers import StableDiffusionPipeline

    from .clip import image_processor

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        pipe = StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"],
                                       tokenizer=parts["tokenizer"], unet=parts["unet"],
                                       scheduler=parts["scheduler"], safety_checker=None, feature_extractor=None,
                                       image_encoder=None, requires_safety_checker=False)
        pipe.save_pretrained(tmp, safe_serialization=True)
        parts["projection"].save_pretrained(tmp / "text_encoder_projection", safe_serialization=True)
        parts["tokenizer"].save_pretrained(tmp / "text_encoder_projection")
        parts["clip"].save_pretrained(tmp / "world_clip", safe_serialization=True)
        parts["tokenizer"].save_pretrained(tmp / "world_clip")
        image_processor().save_pretrained(tmp / "world_clip")
        (tmp / "face_models").mkdir()
        for name in ONNX_FILES:
            shutil.copy2(assets / name, tmp / "face_models" / name)
        (tmp / "judge").mkdir()
        shutil.copy2(assets / "judge.safetensors", tmp / "judge" / "judge.safetensors")
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
        os.chmod(tmp, 0o755)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def ensure_world_pipeline(root: str | os.PathLike | None = None, assets: Path | None = None) -> Path:
    """Path of the cached ``embedded:faces`` pipeline, expanding the assets on first use."""
    from ..tiny import cache_dir

    assets = assets or assets_dir()
    read_record(assets)
    h = assets_hash(assets)
    folder = Path(root or cache_dir()) / f"embedded-faces-{h}"
    marker = folder / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("assets_hash") == h:
        return folder
    return save_world_pipeline(folder, build_parts(assets), assets, {"assets_hash": h, "assets": str(assets)})


def face_models_dir() -> Path:
    return ensure_world_pipeline() / "face_models"


def world_clip_dir() -> Path:
    return ensure_world_pipeline() / "world_clip"


def load_judge(folder: Path | None = None):
    from .judge import Judge

    path = (folder or ensure_world_pipeline()) / "judge" / "judge.safetensors"
    return _load_fp32(Judge(), path)
