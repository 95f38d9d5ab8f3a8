"""Driving each family member through a stock diffusers pipeline (``accord-face generate`` / ``evaluate``).

The adapter folder's ``adapter_config.json`` says which member it is (``encoder``):

- ``faceid``: the normalised mean embedding of the ``--face`` photos (one identity, K tokens);
- ``faceid_portrait``: every photo its own embedding, (n, D) -> n x K tokens (diffusers' multi-embedding
  ``ip_adapter_image_embeds`` of shape (2, n, D), zeros as the negative);
- ``faceid_plus`` / ``faceid_plusv2``: the mean embedding plus the CLIP states of the FIRST photo's aligned
  face crop (the reference recipe uses one crop), written to the loaded layer's ``.clip_embeds`` with the
  dropped identity (CLIP of the zero pixel tensor) as the negative; V2 sets ``.shortcut`` and
  ``.shortcut_scale = s_scale`` (``--s-scale``, default the trained value).

The CLIP tower is the recorded ``image_encoder_path`` unless ``--clip-image-encoder`` overrides it.
The identity LoRA, when the folder has one, is loaded as adapter ``identity`` at ``--lora-scale``.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np
import torch

from ..encoder import needs_clip

__all__ = ["member", "photo_inputs", "FamilyDriver"]


def member(adapter_cfg: dict[str, Any]) -> str:
    return adapter_cfg.get("encoder") or "faceid"


def photo_inputs(adapter_cfg: dict[str, Any], analyzer, photos: list[str | os.PathLike], clip_size: Optional[int]
                 ) -> dict[str, Any]:
    """Photos of ONE person -> {"embedding": (D,) mean or (n, D) per photo (Portrait), "crop": (3, S, S) uint8 | None}."""
    from ..face import align_face
    from ..pipeline import GenerateError, load_image_rgb

    embeds, crop = [], None
    for i, photo in enumerate(photos):
        rgb = load_image_rgb(photo)
        faces = analyzer.analyze(rgb)
        if not faces:
            raise GenerateError(f"no face found in {photo}; use a photo with one clearly visible face")
        emb = np.asarray(faces[0].embedding, dtype=np.float64).reshape(-1)
        embeds.append(emb / max(np.linalg.norm(emb), 1e-12))
        if i == 0 and clip_size:
            crop = torch.from_numpy(np.ascontiguousarray(align_face(rgb, faces[0].landmarks, clip_size))).permute(2, 0, 1)
    e = np.stack(embeds)
    if member(adapter_cfg) != "faceid_portrait":
        mean = e.mean(0)
        e = mean / max(np.linalg.norm(mean), 1e-12)
    return {"embedding": e.astype(np.float32), "crop": crop}


class FamilyDriver:
    """Per-pipeline state of a family member: the CLIP tower and the current identity's CLIP states."""

    def __init__(self, adapter_cfg: dict[str, Any], device: str, dtype: torch.dtype,
                 clip_image_encoder: Optional[str] = None, s_scale: Optional[float] = None):
        self.kind = member(adapter_cfg)
        self.shortcut = bool(adapter_cfg.get("shortcut", self.kind == "faceid_plusv2"))
        self.s_scale = float(adapter_cfg.get("s_scale", 1.0) if s_scale is None else s_scale)
        self.image_encoder = None
        self.clip = None                                                     # (1, L, H) of the current identity
        if needs_clip(self.kind):
            from ..pipeline import GenerateError
            from .clip_image import load_image_encoder

            path = clip_image_encoder or adapter_cfg.get("image_encoder_path")
            if not path:
                raise GenerateError("this FaceID-Plus adapter records no image_encoder_path: pass "
                                    "--clip-image-encoder ID_OR_DIR")
            sub = None if clip_image_encoder else (adapter_cfg.get("image_encoder_subfolder") or None)
            try:
                self.image_encoder = load_image_encoder(path, sub, device=device, dtype=dtype)
            except FileNotFoundError as err:
                raise GenerateError(str(err)) from None

    @property
    def clip_size(self) -> Optional[int]:
        return self.image_encoder.image_size if self.image_encoder is not None else None

    def set_face_crop(self, crop: Optional[torch.Tensor]) -> None:
        """(3, S, S) uint8 aligned crop of the identity (FaceID-Plus); ignored by the other members."""
        if self.image_encoder is None:
            return
        if crop is None:
            from ..pipeline import GenerateError

            raise GenerateError("FaceID-Plus needs a face photo for its CLIP face crop (--face IMG)")
        self.clip = self.image_encoder(crop[None])                            # (1, L, H)

    def before_call(self, pipe, batch: int, cfg_guidance: bool) -> None:
        """Set the loaded FaceID-Plus layer's inputs for a call of ``batch`` images (prompts x images)."""
        if self.image_encoder is None:
            return
        from ..adapter import faceid_plus_clip_embeds, set_faceid_plus_inputs

        clip = faceid_plus_clip_embeds(self.clip, self.image_encoder.null_embeds(), batch, cfg_guidance)
        set_faceid_plus_inputs(pipe.unet, clip, self.shortcut, self.s_scale)

    def describe(self) -> dict[str, Any]:
        return {"member": self.kind, "shortcut": self.shortcut if self.image_encoder is not None else None,
                "s_scale": self.s_scale if self.image_encoder is not None else None}
