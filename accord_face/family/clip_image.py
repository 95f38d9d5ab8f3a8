"""The frozen CLIP vision tower of FaceID-Plus / Plus-V2 and the aligned face crop it sees.

FaceID-Plus reads the *penultimate* hidden states of a CLIP vision tower run on
the 5-point-aligned face crop (the reference recipe: insightface
``norm_crop(image, kps, 224)`` -> ``CLIPImageProcessor`` -> ``hidden_states[-2]``).
Here the crop is computed from what every shard already stores (backward
compatible, no new member): the landmarks in original-image pixels and the
``crop_box`` that produced the stored ``jpg``:

    lm_jpg = (lm - (left, top)) * jpg_width / (right - left)
    crop   = warpAffine(jpg, similarity(lm_jpg -> ARCFACE_TEMPLATE * S / 112), S x S),   S = CLIP image size

**Dropped identity** (one convention for training dropout, the three ACCORD
no-grad DDLoss branches and generation's negative CFG branch): zero face
embedding *and* the CLIP hidden states of an all-zero *normalised* pixel
tensor, exactly what the reference ``IPAdapterFaceIDPlus`` and diffusers'
``prepare_ip_adapter_image_embeds`` use as the unconditional image
(``image_encoder(torch.zeros_like(pixels)).hidden_states[-2]``).

``image_encoder_path``: a hub id or folder of a ``CLIPVisionModelWithProjection``
(``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, the reference's; ``h94/IP-Adapter``
with subfolder ``models/image_encoder``), or ``embedded:clip-vision[:seed]``: a
tiny random tower built offline into the accord-face cache (tests, tiny configs).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

__all__ = ["EMBEDDED_CLIP", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "build_tiny_clip_vision", "resolve_image_encoder",
           "load_image_encoder", "ImageEncoder", "landmarks_in_stored_image", "aligned_face_crop",
           "face_crop_from_sample"]

EMBEDDED_CLIP = "embedded:clip-vision"
WORLD_CLIP = "embedded:faces/world_clip"   # the identity world's CLIP (accord_face.world)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_tiny_clip_vision(folder: str | os.PathLike, seed: int = 0, image_size: int = 64, hidden: int = 48,
                           replace: bool = True) -> Path:
    """A random ``CLIPVisionModelWithProjection`` (+ its ``CLIPImageProcessor``) saved to ``folder`` atomically.

    ``replace=False``: when another process finished the same folder first, keep that one (ranks
    building the cache at once never delete a folder another rank is reading)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                              num_attention_heads=4, image_size=image_size, patch_size=16, projection_dim=32)
    model = CLIPVisionModelWithProjection(config).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size,
                                                                                  "width": image_size})
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        if folder.exists() and replace:
            shutil.rmtree(folder)
        try:
            tmp.rename(folder)
        except OSError:
            if replace or not (folder / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_image_encoder(path: str) -> str:
    """``embedded:clip-vision[:seed]`` -> cached local folder (built on first use); ``embedded:faces/world_clip``
    -> the identity world's CLIP (its vision tower); anything else unchanged."""
    if path == WORLD_CLIP:
        from ..world.assemble import world_clip_dir

        return str(world_clip_dir())
    if not path.startswith(EMBEDDED_CLIP):
        return path
    from ..tiny import cache_dir

    rest = path[len(EMBEDDED_CLIP):].lstrip(":")
    try:
        seed = int(rest) if rest else 0
    except ValueError:
        raise ValueError(f"image_encoder_path {path!r}: the seed after {EMBEDDED_CLIP}: must be an integer") from None
    folder = cache_dir() / f"embedded-clip-vision-seed{seed}"
    if not (folder / "config.json").is_file():
        build_tiny_clip_vision(folder, seed, replace=False)
    return str(folder)


class ImageEncoder(nn.Module):
    """Frozen CLIP vision tower: aligned face crops uint8 (N, 3, S, S) -> penultimate hidden states (N, L, H)."""

    def __init__(self, model: nn.Module, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self._null: dict = {}

    @property
    def image_size(self) -> int:
        return int(self.model.config.image_size)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def normalise(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8 / [0, 255] (N, 3, S, S) -> CLIP pixel values (x / 255 - mean) / std."""
        return (crops.float() / 255.0 - self.mean) / self.std

    @torch.no_grad()
    def hidden_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (N, 3, S, S) -> ``hidden_states[-2]`` (N, L, H), L = (S / patch)^2 + 1."""
        dtype = next(self.model.parameters()).dtype
        return self.model(pixel_values.to(dtype), output_hidden_states=True).hidden_states[-2]

    @torch.no_grad()
    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.hidden_states(self.normalise(crops.to(self.mean.device)))

    @torch.no_grad()
    def null_embeds(self) -> torch.Tensor:
        """(1, L, H): the dropped identity's CLIP states = tower(zeros normalised pixels), computed once."""
        key = (str(self.mean.device), next(self.model.parameters()).dtype)
        if key not in self._null:
            zeros = torch.zeros(1, 3, self.image_size, self.image_size, device=self.mean.device)
            self._null[key] = self.hidden_states(zeros)
        return self._null[key]


def _processor_stats(path: str, subfolder: Optional[str]) -> tuple[tuple, tuple]:
    folder = Path(path) / (subfolder or "")
    cfg_file = folder / "preprocessor_config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        return tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)), tuple(cfg.get("image_std", OPENAI_CLIP_STD))
    return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD   # every CLIP / OpenCLIP ViT processor on the hub uses these


def load_image_encoder(path: str, subfolder: Optional[str] = None, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> ImageEncoder:
    """Load a frozen ``CLIPVisionModelWithProjection`` by hub id / folder / ``embedded:clip-vision``."""
    from transformers import CLIPVisionModelWithProjection

    resolved = resolve_image_encoder(path)
    try:
        model = CLIPVisionModelWithProjection.from_pretrained(resolved, subfolder=subfolder or "")
    except OSError as err:
        raise FileNotFoundError(f"image_encoder_path {path!r}: cannot load a CLIPVisionModelWithProjection "
                                f"({str(err).splitlines()[0]}); pass a folder or hub id (downloaded once), "
                                f"or {EMBEDDED_CLIP} for the offline tiny tower") from None
    mean, std = _processor_stats(resolved, subfolder)
    return ImageEncoder(model, mean, std).to(device=device, dtype=dtype)


def landmarks_in_stored_image(meta: dict, stored_size: tuple[int, int]) -> np.ndarray:
    """Shard json (``landmarks`` in original pixels, ``crop_box``) -> (5, 2) landmarks in the stored jpg."""
    if "landmarks" not in meta:
        raise KeyError("sample json has no 'landmarks': rewrite the shards with scripts/prepare_shards.py "
                       "(FaceID-Plus computes the face crop from them)")
    lm = np.asarray(meta["landmarks"], dtype=np.float64).reshape(5, 2)
    box = meta.get("crop_box")
    if box is None:                                   # no crop recorded: the jpg is the original image
        return lm
    left, top, right, bottom = [float(v) for v in box]
    sx, sy = stored_size[0] / (right - left), stored_size[1] / (bottom - top)
    return (lm - np.array([left, top])) * np.array([sx, sy])


def aligned_face_crop(image: np.ndarray, landmarks: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 + (5, 2) landmarks -> (size, size, 3) ArcFace-template-aligned crop (insightface norm_crop)."""
    from ..face import align_face

    return align_face(image, landmarks, size)


def face_crop_from_sample(jpg: bytes, meta: dict, size: int) -> torch.Tensor:
    """Stored image bytes + shard json -> aligned face crop uint8 (3, size, size)."""
    from PIL import Image

    with Image.open(io.BytesIO(jpg)) as im:
        rgb = np.asarray(im.convert("RGB"))
    crop = aligned_face_crop(rgb, landmarks_in_stored_image(meta, (rgb.shape[1], rgb.shape[0])), size)
    return torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)         # (3, S, S) uint8
