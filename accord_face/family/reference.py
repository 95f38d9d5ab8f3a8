"""Identity from another photo of the same person: ``encoder.reference: other_photo``.

By default (``self``) a sample's identity comes from the very photo being denoised, as in
FFHQ-style training with one photo per person: everything the embedding (and, for
FaceID-Plus, the CLIP face crop) carries about *that* photo — its background, accessory,
lighting — is a shortcut to the target, and the adapter learns to copy the photo instead
of following the prompt. With ``other_photo`` the identity inputs come from a different
photo of the same person (the ``person_id`` the shards record), so only what is constant
across a person's photos is worth carrying:

    ref(sample) = a uniform draw from { photos of person(sample) } \\ { sample }
                  (generator seeded by (seed, step, sample key): the same on any rank layout)

A person with a single photo keeps its own (counted in ``stats()``). At start-up the trainer
indexes every sample's embedding (and, for FaceID-Plus, its stored image bytes: the crop is
computed on demand from the image and the json landmarks, exactly as for the sample itself).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .portrait import person_of, scan_shards

__all__ = ["ReferenceBank", "REFERENCES"]

REFERENCES = ("self", "other_photo")


@dataclass
class ReferenceBank:
    """{person: [(key, embedding (D,), meta, image bytes | None)]}: every photo of every person."""

    people: dict[str, list[tuple[str, np.ndarray, dict, Optional[bytes]]]] = field(default_factory=dict)

    @classmethod
    def from_shards(cls, urls: list[str], embedding_key: str, images: bool = False,
                    progress: bool = True) -> "ReferenceBank":
        bank = cls()
        for key, meta, emb, image in scan_shards(urls, embedding_key, images=images, progress=progress,
                                                 desc="reference bank"):
            bank.people.setdefault(person_of(meta, key), []).append((key, emb, meta, image))
        return bank

    def stats(self) -> dict:
        sizes = [len(v) for v in self.people.values()]
        return {"people": len(sizes), "photos": sum(sizes), "single_photo_people": sum(s == 1 for s in sizes)}

    def pick(self, key: str, meta: dict, seed: int, step: int):
        """The entry of another photo of the sample's person, or None (a person with one photo)."""
        photos = self.people.get(person_of(meta, key), [])
        others = [p for p in photos if p[0] != key]
        if not others:
            return None
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_000_003
                                          + zlib.crc32(f"{key}/reference".encode()))
        return others[int(torch.randint(0, len(others), (), generator=g))]

    def swap(self, keys: list[str], metas: list[dict], ids: torch.Tensor, crops: Optional[torch.Tensor],
             seed: int, step: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(B, D) own embeddings [+ (B, 3, S, S) own crops] -> those of another photo of each person."""
        from .clip_image import face_crop_from_sample

        ids = ids.clone()
        crops = crops.clone() if crops is not None else None
        for i, (key, meta) in enumerate(zip(keys, metas)):
            other = self.pick(key, meta, seed, step)
            if other is None:
                continue
            _, emb, other_meta, image = other
            ids[i] = torch.from_numpy(emb).to(ids)
            if crops is not None:
                if image is None:
                    raise ValueError(f"reference bank: sample {other[0]} has no image member for its face crop")
                crops[i] = face_crop_from_sample(image, other_meta, crops.shape[-1]).to(crops)
        return ids, crops
