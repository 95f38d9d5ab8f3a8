"""FaceID-Portrait: n photos of one person -> n x K identity tokens (K = 16 in the released model).

Shards record an identity label per sample (``person_id`` in the sample json, written by
``prepare_shards`` from a folder per person or a ``person_id`` metadata field). At start-up
the trainer indexes the embeddings of every sample by person (``IdentityBank.from_shards``:
one pass over the tar headers, reading only the small ``json`` and ``*.npy`` members), and
each step draws

    k ~ U{1..n}                                  one k per (seed, step): every rank, every micro batch
    photos(sample) = [own] + (k - 1) others of the same person
                     (without replacement when the person has >= k - 1 other photos,
                      else with replacement; a person with one photo repeats it)

from a generator seeded by (seed, step, sample key), so the draw is the same on any rank
layout. The model sees (B, k, D) embeddings and gives (B, k*K, cad) tokens, photo-major,
exactly as diffusers flattens ``ip_adapter_image_embeds`` of shape (2, k, D) at generation.
Samples without ``person_id`` are their own person (k copies of one photo).
"""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

__all__ = ["IdentityBank", "draw_count", "person_of", "scan_shards"]


def person_of(meta: dict, key: str) -> str:
    """The identity label of a sample: its json ``person_id``, else its own key."""
    pid = meta.get("person_id") if isinstance(meta, dict) else None
    return str(pid) if pid not in (None, "") else f"__key__:{key}"


def draw_count(seed: int, step: int, max_photos: int) -> int:
    """k in 1..max_photos for one step, the same on every rank."""
    if max_photos <= 1:
        return 1
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 7919 + 17)
    return int(torch.randint(1, max_photos + 1, (), generator=g))


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def scan_shards(urls: list[str], embedding_key: str, *, images: bool = False, progress: bool = True,
                desc: str = "shards"):
    """Yield (key, meta, embedding (D,) float32, image bytes | None) for every sample of the shards
    that has an embedding, reading only the ``json``, ``embedding_key`` (and, with ``images``, the
    image) members. Unreadable shards are skipped (the data reader counts and logs them)."""
    from tqdm import tqdm

    wanted = {"json", embedding_key, *(IMAGE_EXTS if images else ())}
    for url in tqdm(urls, desc=desc, unit="shard", disable=not progress):
        rows: dict[str, dict] = {}
        try:
            with tarfile.open(url) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    base = member.name.rsplit("/", 1)[-1]
                    if "." not in base:
                        continue
                    key, ext = base.split(".", 1)
                    if ext not in wanted:
                        continue
                    data = tar.extractfile(member).read()
                    rows.setdefault(f"{member.name[:len(member.name) - len(base)]}{key}", {})[ext] = data
        except (tarfile.TarError, OSError):
            continue
        for key, row in rows.items():
            if embedding_key not in row:
                continue
            emb = np.load(io.BytesIO(row[embedding_key]), allow_pickle=False).astype(np.float32).reshape(-1)
            try:
                meta = json.loads(row["json"]) if "json" in row else {}
            except json.JSONDecodeError:
                meta = {}
            image = next((row[e] for e in IMAGE_EXTS if e in row), None)
            yield key.rsplit("/", 1)[-1], meta, emb, image


@dataclass
class IdentityBank:
    """{person: (keys, embeddings (m, D))}: every photo of every person in the shards."""

    max_photos: int
    people: dict[str, tuple[list[str], torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def from_shards(cls, urls: list[str], embedding_key: str, max_photos: int, progress: bool = True) -> "IdentityBank":
        """Index the shards' embeddings by ``person_id`` (tar headers + json + npy members only)."""
        groups: dict[str, list[tuple[str, np.ndarray]]] = {}
        for key, meta, emb, _ in scan_shards(urls, embedding_key, progress=progress, desc="identity bank"):
            groups.setdefault(person_of(meta, key), []).append((key, emb))
        bank = cls(max_photos=max_photos)
        for person, items in groups.items():
            bank.people[person] = ([k for k, _ in items], torch.from_numpy(np.stack([e for _, e in items])))
        return bank

    def stats(self) -> dict:
        sizes = [len(keys) for keys, _ in self.people.values()]
        return {"people": len(sizes), "photos": sum(sizes), "multi_photo_people": sum(s > 1 for s in sizes)}

    def photos(self, key: str, meta: dict, own: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
        """(k, D): the sample's own embedding first, then k - 1 of the same person's other photos."""
        if k == 1:
            return own[None]
        keys, embs = self.people.get(person_of(meta, key), ([key], own[None]))
        others = [i for i, kk in enumerate(keys) if kk != key]
        if not others:
            picks: list[int] = []
            rest = own[None].expand(k - 1, -1)
        else:
            if len(others) >= k - 1:
                order = torch.randperm(len(others), generator=generator)[:k - 1]
            else:
                order = torch.randint(0, len(others), (k - 1,), generator=generator)
            picks = [others[i] for i in order.tolist()]
            rest = embs[picks].to(own)
        return torch.cat([own[None], rest])

    def draw(self, keys: list[str], metas: list[dict], own: torch.Tensor, seed: int, step: int,
             k: Optional[int] = None) -> torch.Tensor:
        """(B, D) own embeddings -> (B, k, D) with k = ``draw_count(seed, step, max_photos)`` unless given."""
        k = draw_count(seed, step, self.max_photos) if k is None else k
        out = []
        for key, meta, emb in zip(keys, metas, own.cpu()):
            g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_000_003 + zlib.crc32(f"{key}/portrait".encode()))
            out.append(self.photos(key, meta, emb, k, g))
        return torch.stack(out)                                                       # (B, k, D)
