"""Write small face shards in the shard format (accord_face.data) for trainer tests."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

CAPTIONS = ["a photo of a man on a beach", "a woman wearing a red hat", "a portrait of a girl in a park",
            "a boy smiling in the city"]


def write_shards(folder: Path, n_shards: int = 4, per_shard: int = 2, dim: int = 128, size: int = 64,
                 recognizer: str = "sface", seed: int = 0, people: int = 0) -> Path:
    """Random shards; the json carries 5 landmarks + crop_box (as prepare_shards writes them) and,
    with ``people`` > 0, a ``person_id`` (sample i of the whole set belongs to person i % people)."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = []
    for s in range(n_shards):
        name = f"faces-{s:06d}.tar"
        with wds.TarWriter(str(folder / name)) as sink:
            for i in range(per_shard):
                img = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
                buf = io.BytesIO()
                img.save(buf, format="JPEG")
                emb = rng.standard_normal(dim).astype(np.float32)
                emb /= np.linalg.norm(emb)
                npy = io.BytesIO()
                np.save(npy, emb)
                sink.write({"__key__": f"s{s:02d}_{i:03d}", "jpg": buf.getvalue(),
                            "txt": CAPTIONS[(s + i) % len(CAPTIONS)].encode(), f"{recognizer}.npy": npy.getvalue(),
                            "json": json.dumps(_meta(recognizer, dim, size, s * per_shard + i, people)).encode()})
        shards.append({"name": name, "samples": per_shard})
    (folder / "manifest.json").write_text(json.dumps({"embedding_key": f"{recognizer}.npy", "embedding_dim": dim,
                                                      "recognizer": recognizer, "shards": shards}))
    return folder


def _meta(recognizer: str, dim: int, size: int, index: int, people: int) -> dict:
    # Landmarks in original pixels of a 2*size crop box at (10, 20): the stored jpg is that box at `size` px.
    from accord_face.face import ARCFACE_TEMPLATE

    stored = ARCFACE_TEMPLATE * (size / 2 / 112) + size / 4
    meta = {"recognizer": recognizer, "embedding_dim": dim,
            "landmarks": (stored * 2 + np.array([10.0, 20.0])).round(2).tolist(),
            "crop_box": [10, 20, 10 + 2 * size, 20 + 2 * size]}
    if people:
        meta["person_id"] = f"person{index % people}"
    return meta
