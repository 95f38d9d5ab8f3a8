"""Corrupt data during reading: each kind is skipped, counted once by kind, logged with its shard and key;
the counts reach the batches (so also through DataLoader workers); good samples all arrive."""

from __future__ import annotations

import io
import logging
import os

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from accord_face.data import SKIP_KINDS, build_dataset, collate

DIM = 8


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr, np.float32))
    return buf.getvalue()


def _sample(key: str, seed: int, **over) -> dict:
    s = {"__key__": key, "png": _png(seed), "txt": b"a photo", "sface.npy": _npy(np.ones(DIM) / np.sqrt(DIM))}
    s.update(over)
    return {k: v for k, v in s.items() if v is not None}


def _tar(path, samples) -> None:
    with wds.TarWriter(str(path)) as tw:
        for s in samples:
            tw.write(s)


@pytest.fixture()
def corrupt(tmp_path):
    """6 good samples in 2 shards + one of each fault."""
    d = tmp_path / "shards"
    d.mkdir()
    _tar(d / "a-good.tar", [_sample(f"good{i}", i) for i in range(3)])
    _tar(d / "b-bad-samples.tar", [
        _sample("good3", 3),
        _sample("nojpg", 10, png=None),                                        # a missing member
        _sample("wrongdim", 11, **{"sface.npy": _npy(np.ones(DIM + 3))}),      # embedding of the wrong size
        _sample("nan", 12, **{"sface.npy": _npy(np.full(DIM, np.nan))}),        # NaN embedding
        _sample("badimg", 13, png=b"\x89PNG\r\n\x1a\n not really"),            # undecodable image
        _sample("good4", 4),
    ])
    _tar(d / "c-empty.tar", [])                                                  # an empty shard
    full = io.BytesIO()
    with wds.TarWriter(full) as tw:
        for i in range(5, 9):
            tw.write(_sample(f"trunc{i}", i))
    data = full.getvalue()
    (d / "d-truncated.tar").write_bytes(data[: len(data) * 3 // 5])             # a truncated tar
    _tar(d / "e-good.tar", [_sample("good5", 5)])
    _tar(d / "f-vanishes.tar", [_sample("ghost", 20)])                           # deleted after listing
    return d


def _run(corrupt, num_workers: int, caplog):
    from torch.utils.data import DataLoader

    ds = build_dataset(str(corrupt), resolution=16, embedding_key="sface.npy", shuffle_buffer=0, embedding_dim=DIM,
                       split_by_node=False)
    os.remove(corrupt / "f-vanishes.tar")            # listed by build_dataset, gone when read
    loader = DataLoader(ds, batch_size=1, collate_fn=collate, num_workers=num_workers)
    with caplog.at_level(logging.WARNING, logger="accord_face.data"):
        batches = list(loader)
    keys = [k for b in batches for k in b["__key__"]]
    counts = {k: sum(b["__skipped__"][k] for b in batches) for k in SKIP_KINDS}
    if num_workers == 0:                             # skips after the last sample: the stats hold them
        rest = ds.stats.take_unreported()
        counts = {k: counts[k] + rest[k] for k in SKIP_KINDS}
    return ds, keys, counts


def test_every_fault_is_skipped_counted_once_and_logged_with_shard_and_key(corrupt, caplog):
    ds, keys, counts = _run(corrupt, 0, caplog)
    good = {f"good{i}" for i in range(6)}
    assert good <= set(keys) and len(keys) == len(set(keys))
    assert set(keys) - good <= {"trunc5", "trunc6"}  # whole samples before the cut are kept
    assert counts == {"bad_shard": 2, "empty_shard": 1, "bad_sample": 4}  # truncated + vanished; 4 bad samples
    assert ds.stats.kinds == counts
    log = caplog.text
    for key, why in [("nojpg", "no image member"), ("wrongdim", f"'sface.npy' has {DIM + 3} values, expected {DIM}"),
                     ("nan", "'sface.npy' holds NaN or inf"), ("badimg", "image does not decode")]:
        assert f"b-bad-samples.tar key {key}: {why}" in log
    assert "c-empty.tar: no samples in this shard" in log
    assert "d-truncated.tar: ReadError" in log and "after key trunc6" in log
    assert "f-vanishes.tar: FileNotFoundError" in log
    assert log.count("d-truncated.tar") == 1                                   # counted once, not twice


def test_counts_reach_the_batches_through_dataloader_workers(corrupt, caplog):
    _, keys, counts = _run(corrupt, 2, caplog)
    assert {f"good{i}" for i in range(6)} <= set(keys)
    # each worker reports its skips with its next sample; skips after a worker's last sample stay in the
    # log only, so the batch counts are a lower bound that still sees every kind here
    assert counts["bad_sample"] >= 3 and counts["bad_shard"] + counts["empty_shard"] >= 1


def test_skips_in_the_replayed_part_are_not_counted_again(corrupt, caplog):
    os.remove(corrupt / "f-vanishes.tar")
    first = build_dataset(str(corrupt), resolution=16, embedding_key="sface.npy", shuffle_buffer=0,
                          embedding_dim=DIM, split_by_node=False)
    seen = []
    for s in first:
        seen.append(s["__skipped__"])
    resumed = build_dataset(str(corrupt), resolution=16, embedding_key="sface.npy", shuffle_buffer=0,
                            embedding_dim=DIM, split_by_node=False, skip=5)
    after = [s["__skipped__"] for s in resumed]
    total_first = {k: sum(d[k] for d in seen) for k in SKIP_KINDS}
    total_after = {k: sum(d[k] for d in after) for k in SKIP_KINDS}
    # the first 5 samples (good0-2, good3, good4) carry the bad samples of shard b; a resumed reader
    # skipping them must not count those again
    assert total_first["bad_sample"] == 4 and total_after["bad_sample"] == 0
