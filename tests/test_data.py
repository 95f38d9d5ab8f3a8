"""The training-side reader (accord_face.data) on shards written here with webdataset's TarWriter."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from accord_face.data import build_dataset, collate, list_shards, read_manifest


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")  # lossless, so pixels can be compared exactly
    return buf.getvalue()


def _pattern(i: int, h: int = 16, w: int = 16) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write(folder, n_shards=4, per_shard=5, dim=8, key="sface.npy", manifest=True):
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with wds.TarWriter(str(folder / f"faces-{s:06d}.tar")) as tw:
            for i in range(per_shard):
                idx = s * per_shard + i
                emb = np.full(dim, idx, np.float32)
                tw.write({"__key__": f"k{idx:04d}", "jpg": _png(_pattern(idx)), "txt": f"caption {idx}",
                          key: emb, "json": {"index": idx}})
    if manifest:
        (folder / "manifest.json").write_text(json.dumps({"embedding_key": key, "embedding_dim": dim}))
    return folder


@pytest.fixture()
def shards(tmp_path):
    return _write(tmp_path / "shards")


def _keys(ds) -> list[str]:
    return [s["__key__"] for s in ds]


def test_list_shards_specs(shards):
    names = [f"{shards}/faces-{i:06d}.tar" for i in range(4)]
    assert list_shards(str(shards)) == names
    assert list_shards(f"{shards}/*.tar") == names
    assert list_shards(f"{shards}/faces-{{000001..000002}}.tar") == names[1:3]
    assert list_shards([names[3], names[0]]) == [names[3], names[0]]
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        list_shards(str(shards / "nothing_here"))
    assert read_manifest(shards)["embedding_key"] == "sface.npy"
    assert read_manifest(shards / "faces-000000.tar")["embedding_dim"] == 8
    assert read_manifest(shards.parent) is None


def test_samples_decode_exactly(shards):
    samples = list(build_dataset(str(shards), resolution=16, shuffle_buffer=0))
    assert sorted(_keys(samples)) == [f"k{i:04d}" for i in range(20)]
    for s in samples:
        idx = s["meta"]["index"]
        expected = torch.from_numpy(_pattern(idx)).permute(2, 0, 1).float() / 127.5 - 1
        torch.testing.assert_close(s["pixel_values"], expected)
        torch.testing.assert_close(s["face_embedding"], torch.full((8,), float(idx)))
        assert s["caption"] == f"caption {idx}"
    batch = collate(samples[:3])
    assert batch["pixel_values"].shape == (3, 3, 16, 16) and batch["face_embedding"].shape == (3, 8)
    assert batch["caption"] == [s["caption"] for s in samples[:3]]


def test_resize_crop_and_flip(tmp_path):
    folder = tmp_path / "wide"
    with wds.TarWriter(str(folder.with_suffix(".tar"))) as tw:
        for i in range(8):
            tw.write({"__key__": f"w{i}", "jpg": _png(_pattern(i, 40, 80)), "txt": "x", "e.npy": np.ones(4, np.float32)})
    path = str(folder.with_suffix(".tar"))
    plain = {s["__key__"]: s["pixel_values"] for s in build_dataset(path, resolution=20, shuffle_buffer=0)}
    flipped = {s["__key__"]: s["pixel_values"]
               for s in build_dataset(path, resolution=20, shuffle_buffer=0, random_flip=True, seed=3)}
    for k, v in plain.items():
        assert v.shape == (3, 20, 20) and -1 <= v.min() and v.max() <= 1
        assert torch.equal(flipped[k], v) or torch.equal(flipped[k], v.flip(-1))
    n_flipped = sum(not torch.equal(flipped[k], plain[k]) for k in plain)
    assert 0 < n_flipped < 8
    again = {s["__key__"]: s["pixel_values"]
             for s in build_dataset(path, resolution=20, shuffle_buffer=0, random_flip=True, seed=3)}
    assert all(torch.equal(again[k], flipped[k]) for k in plain)  # flips are deterministic


def test_order_is_deterministic_in_seed_and_epoch(shards):
    a = _keys(build_dataset(str(shards), resolution=16, shuffle_buffer=8, seed=1, epoch=0))
    b = _keys(build_dataset(str(shards), resolution=16, shuffle_buffer=8, seed=1, epoch=0))
    c = _keys(build_dataset(str(shards), resolution=16, shuffle_buffer=8, seed=1, epoch=1))
    assert a == b and a != c and sorted(a) == sorted(c)
    assert a != sorted(a)  # shuffled at all
    ds = build_dataset(str(shards), resolution=16, shuffle_buffer=8, seed=1, epoch=0)
    ds.set_epoch(1)
    assert _keys(ds) == c


def test_ranks_see_disjoint_shards(shards, monkeypatch):
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append(_keys(build_dataset(str(shards), resolution=16, seed=5)))
    assert len(seen[0]) == len(seen[1]) == 10
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [f"k{i:04d}" for i in range(20)]


def test_skip_resumes_where_the_stream_stopped(shards):
    full = _keys(build_dataset(str(shards), resolution=16, seed=2))
    assert _keys(build_dataset(str(shards), resolution=16, seed=2, skip=7)) == full[7:]


def test_skip_with_dataloader_workers_sees_the_rest_once(shards):
    from torch.utils.data import DataLoader

    def run(skip):
        ds = build_dataset(str(shards), resolution=16, seed=4, skip=skip, skip_batch_size=2)
        return [k for b in DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate) for k in b["__key__"]]

    full = run(0)
    assert sorted(full) == [f"k{i:04d}" for i in range(20)]
    rest = run(6)  # 3 batches consumed before the "restart"
    assert sorted(full[:6] + rest) == sorted(full)


def test_corrupt_shards_are_skipped_and_counted(shards, caplog):
    (shards / "faces-000009.tar").write_bytes(b"not a tar at all" * 100)
    good = (shards / "faces-000000.tar").read_bytes()
    (shards / "faces-000010.tar").write_bytes(good[: len(good) // 2 + 100])  # truncated mid-member
    ds = build_dataset(str(shards), resolution=16, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="accord_face.data"):
        keys = _keys(ds)
    assert set(keys) >= {f"k{i:04d}" for i in range(20)}
    assert 20 <= len(keys) < 25  # plus whatever complete samples precede the truncation
    assert ds.stats.errors >= 2 and any("faces-000009.tar" in u for u in ds.stats.bad_shards)
    assert "skipping unreadable shard data" in caplog.text


def test_embedding_key_from_manifest_or_single_member(tmp_path):
    folder = _write(tmp_path / "a", n_shards=1, key="arcface.npy", dim=4, manifest=False)
    s = next(iter(build_dataset(str(folder), resolution=16)))
    assert s["face_embedding"].shape == (4,)
    ds = build_dataset(str(folder), resolution=16, embedding_key="sface.npy")
    assert list(ds) == [] and ds.stats.errors == 5  # every sample lacks the requested member
