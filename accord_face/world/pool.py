"""A pool of rendered world photos shared by every trainer of the world's models.

Rendering costs ~8 ms a photo, so the trainers draw batches from one pool rendered
once (``photos_per_identity`` photos of each identity, each in a random context)
and cached as an ``.npz`` (written under a temporary name, then renamed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .render import ACCESSORIES, BACKGROUNDS, FRAMINGS, SHIRTS, Context, random_context, render, training_caption

BG_NAMES, SHIRT_NAMES = tuple(BACKGROUNDS), tuple(SHIRTS)
CONTEXT_FIELDS = {"background": BG_NAMES, "shirt": SHIRT_NAMES, "accessory": ACCESSORIES, "framing": FRAMINGS}


def encode_context(ctx: Context) -> np.ndarray:
    """Context -> (4,) int codes in CONTEXT_FIELDS order."""
    return np.array([opts.index(getattr(ctx, name)) for name, opts in CONTEXT_FIELDS.items()], dtype=np.int64)


def decode_context(codes) -> Context:
    return Context(**{name: opts[int(c)] for (name, opts), c in zip(CONTEXT_FIELDS.items(), codes)})


@dataclass
class Pool:
    images: np.ndarray      # (N, 64, 64, 3) uint8
    identity: np.ndarray    # (N,) int64
    context: np.ndarray     # (N, 4) int64 codes
    landmarks: np.ndarray   # (N, 5, 2) float32 pixels

    def __len__(self) -> int:
        return len(self.identity)

    def batch(self, idx: np.ndarray, rng: np.random.Generator | None = None, p_omit: float = 0.15):
        """(images float32 (B, 3, 64, 64) in [-1, 1], captions) for pool rows ``idx``."""
        x = self.images[idx].astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
        if rng is None:
            from .render import caption
            caps = [caption(decode_context(c)) for c in self.context[idx]]
        else:
            caps = [training_caption(decode_context(c), rng, p_omit) for c in self.context[idx]]
        return x, caps


def render_pool(identities: range | list[int], photos_per_identity: int, seed: int, progress: bool = True) -> Pool:
    rng = np.random.default_rng(seed)
    ids, imgs, ctxs, lms = [], [], [], []
    jobs = [(i, j) for i in identities for j in range(photos_per_identity)]
    for i, j in tqdm(jobs, desc="render pool", disable=not progress, mininterval=10):
        ctx = random_context(rng)
        photo = render(i, ctx, seed * 100_003 + j)
        ids.append(i), imgs.append(photo.image), ctxs.append(encode_context(ctx)), lms.append(photo.landmarks)
    return Pool(np.stack(imgs), np.array(ids, np.int64), np.stack(ctxs), np.stack(lms).astype(np.float32))


def load_or_render_pool(path: Path, identities, photos_per_identity: int, seed: int) -> Pool:
    path = Path(path)
    if path.is_file():
        with np.load(path) as z:
            pool = Pool(z["images"], z["identity"], z["context"], z["landmarks"])
        if len(pool) == len(identities) * photos_per_identity:
            return pool
    pool = render_pool(identities, photos_per_identity, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, images=pool.images, identity=pool.identity, context=pool.context, landmarks=pool.landmarks)
    os.replace(tmp, path)
    return pool
