"""What the encoder trainer adds for the family members (called from ``train/loop.py``).

- ``attach_family_parts``: the frozen CLIP vision tower (FaceID-Plus) and the identity bank
  (Portrait) on ``FrozenParts``;
- ``face_crop_size``: the aligned crop size the data stream must produce (CLIP image size);
- ``adapter_config_fields``: what ``adapter_config.json`` records for ``accord-face generate``;
- ``validation_clip``: CLIP states of the validation faces (FaceID-Plus).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from ..encoder import needs_clip

log = logging.getLogger("accord_face.train")

__all__ = ["attach_family_parts", "face_crop_size", "adapter_config_fields", "validation_clip", "identity_lora_writer"]


def attach_family_parts(cfg, parts, info, device: torch.device, dtype: torch.dtype, rank: int = 0):
    """Load the CLIP tower / build the identity bank the member needs (in place on ``parts``)."""
    e = cfg.encoder
    if needs_clip(e.kind):
        from .clip_image import load_image_encoder

        parts.image_encoder = load_image_encoder(e.image_encoder_path, e.image_encoder_subfolder or None,
                                                 device=device, dtype=dtype)
        log.info("CLIP vision tower %s: %d px face crops, hidden %d", e.image_encoder_path,
                 parts.image_encoder.image_size, parts.image_encoder.hidden_size)
    if e.kind == "faceid_portrait" and e.num_photos > 1:
        from .portrait import IdentityBank

        if not info.embedding_key:
            raise ValueError("encoder.kind=faceid_portrait needs the shards' embedding_key (manifest or "
                             "data.embedding_key) to index photos by person")
        parts.identity_bank = IdentityBank.from_shards(info.urls, info.embedding_key, e.num_photos,
                                                       progress=rank == 0 and cfg.logging.progress)
        stats = parts.identity_bank.stats()
        log.info("identity bank: %(people)d people, %(photos)d photos, %(multi_photo_people)d with > 1 photo", stats)
        if stats["multi_photo_people"] == 0:
            log.warning("no person has more than one photo (no person_id in the shards?): Portrait samples repeat "
                        "one photo; write shards with --person-from folder or a person_id metadata field")
    if e.reference == "other_photo":
        from .reference import ReferenceBank

        if not info.embedding_key:
            raise ValueError("encoder.reference=other_photo needs the shards' embedding_key (manifest or "
                             "data.embedding_key) to index photos by person")
        parts.reference_bank = ReferenceBank.from_shards(info.urls, info.embedding_key, images=needs_clip(e.kind),
                                                         progress=rank == 0 and cfg.logging.progress)
        stats = parts.reference_bank.stats()
        log.info("reference bank: %(people)d people, %(photos)d photos, %(single_photo_people)d with one photo",
                 stats)
        if stats["people"] and stats["single_photo_people"] == stats["people"]:
            log.warning("encoder.reference=other_photo but no person has a second photo (no person_id in the "
                        "shards?): every sample keeps its own; write shards with a person_id metadata field")
    return parts


def face_crop_size(parts) -> Optional[int]:
    return parts.image_encoder.image_size if getattr(parts, "image_encoder", None) is not None else None


def adapter_config_fields(cfg, parts) -> dict:
    """Fields ``accord-face generate`` needs to drive each member through diffusers."""
    e = cfg.encoder
    out = {"encoder": e.kind, "num_photos": e.num_photos, "reference": e.reference}
    if cfg.lora.rank > 0:
        from .identity_lora import LORA_WEIGHTS

        out["identity_lora"] = {"weight_name": LORA_WEIGHTS, "rank": cfg.lora.rank,
                                "alpha": cfg.lora.alpha or cfg.lora.rank, "targets": list(cfg.lora.targets)}
    if needs_clip(e.kind):
        out.update(image_encoder_path=e.image_encoder_path, image_encoder_subfolder=e.image_encoder_subfolder,
                   clip_image_size=parts.image_encoder.image_size, shortcut=e.kind == "faceid_plusv2",
                   s_scale=e.s_scale,
                   dropped_identity="zero face embedding + CLIP hidden_states[-2] of the zero pixel tensor")
    return out


def validation_clip(parts, crops: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(N, 3, S, S) uint8 face crops -> (N, 1, L, H) CLIP states, or None for members without CLIP."""
    if crops is None or getattr(parts, "image_encoder", None) is None:
        return None
    return parts.image_encoder(crops).float()[:, None]


def identity_lora_writer(unet, is_sdxl: bool):
    """``export_adapter(extra=...)``: writes the identity LoRA into the adapter folder, or None without one."""
    from .identity_lora import has_identity_lora, save_identity_lora

    if not has_identity_lora(unet):
        return None
    return lambda folder: save_identity_lora(folder, unet, is_sdxl)
