"""Seeded kill -9 schedules (soak: ``pytest -m soak tests/faults``; skipped by default).

Training: each trial draws kill points (``debug.kill_at``: mid-step after backward, after the checkpoint
files but before COMPLETE, after the adapter is written but before it is swapped in, after the final
checkpoint before the end-of-run work) from ``random.Random(seed)``, at strictly increasing positions, and
runs the same command again after each kill (``resume=auto``). At every kill: the adapter on disk loads,
and the resumed run picks the newest COMPLETE checkpoint. At the end: the adapter equals an uninterrupted
run's, metrics.jsonl holds each step once, no temp folder and no incomplete checkpoint is left.
``ACCORD_FACE_SOAK_TRIALS`` scales the number of trials (default: 4 x 1 rank, 2 x 2 ranks; 5 kills each),
``ACCORD_FACE_SOAK_FIRST_SEED`` shifts the seeds (other schedules).

Shard preparation: SIGKILL of the main process after a seeded number of committed shards, 1 and 2
workers; the rerun holds every input once, no partial shard under a final name, checksums match.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

import trainrun
from shards_util import write_shards

pytestmark = [pytest.mark.soak, pytest.mark.slow]

POINTS = ["backward", "save", "export"]          # per step, in the order a step passes them
MAX_STEPS = 4
TRIALS = int(os.environ.get("ACCORD_FACE_SOAK_TRIALS", "4"))
FIRST_SEED = int(os.environ.get("ACCORD_FACE_SOAK_FIRST_SEED", "0"))  # run other schedules: seeds 100*ranks + this + i


def schedule(seed: int, kills: int, ranks: int) -> list[str]:
    """``kills`` kill points at strictly increasing positions (step, point), the last may be ``finish``."""
    rng = random.Random(seed)
    positions = [(s, i) for s in range(1, MAX_STEPS + 1) for i in range(len(POINTS))] + [(MAX_STEPS, 3)]
    chosen = sorted(rng.sample(positions, kills))
    out = []
    for step, i in chosen:
        point = "finish" if i == 3 else POINTS[i]
        rank = 0 if point == "export" else rng.randrange(ranks)     # rank 0 alone exports
        out.append(f"{point}:{step}" + (f":{rank}" if ranks > 1 else ""))
    return out


def _complete(out: Path) -> list[str]:
    root = out / "checkpoints"
    return sorted(p.name for p in root.glob("step-*") if (p / "COMPLETE").is_file()) if root.is_dir() else []


def _check_adapter_loadable(out: Path) -> None:
    from accord_face import adapter

    if (out / "adapter").exists():
        adapter.load_adapter_config(out / "adapter")
        assert adapter.load_adapter_state_dict(out / "adapter")


@pytest.fixture(scope="module")
def data(tiny_pipeline_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("soak")
    return base, write_shards(base / "shards", n_shards=4, per_shard=2), tiny_pipeline_dir


def _trial(base: Path, shards: Path, pipe: str, ranks: int, seed: int, ref: Path, log: list) -> None:
    out = base / f"r{ranks}-seed{seed}"
    kills = schedule(seed, 5, ranks)
    for spec in kills + [None]:
        before = _complete(out)
        proc = trainrun.run(pipe, shards, out, [f"debug.kill_at={spec}"] if spec else [], ranks=ranks)
        if before:                                                     # a resume: the newest complete one
            assert f"resumed from {out / 'checkpoints' / before[-1]}" in proc.stderr, proc.stderr[-3000:]
        _check_adapter_loadable(out)
        if proc.returncode == 0:
            log.append((ranks, seed, spec, "finished (kill point not reached)" if spec else "finished"))
            break
        assert proc.returncode != 2, proc.stderr[-3000:]
        log.append((ranks, seed, spec, f"killed rc={proc.returncode}"))
    a, b = trainrun.adapter_tensors(ref), trainrun.adapter_tensors(out)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert [r["step"] for r in trainrun.metrics(out)] == list(range(1, MAX_STEPS + 1))
    assert not [p for p in out.iterdir() if p.name.startswith(".adapter")]
    names = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert names == _complete(out) and len(names) <= 2
    assert (out / "samples" / f"step-{MAX_STEPS:08d}.png").is_file()


@pytest.mark.parametrize("ranks,trials", [(1, TRIALS), (2, max(1, TRIALS // 2))])
def test_kill_schedules_resume_to_the_uninterrupted_adapter(data, ranks, trials):
    base, shards, pipe = data
    extra = [] if ranks == 1 else ["deepspeed.config=configs/deepspeed/zero2.json"]
    ref = base / f"ref-r{ranks}"
    proc = trainrun.run(pipe, shards, ref, extra, ranks=ranks)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log: list = []
    for seed in range(FIRST_SEED, FIRST_SEED + trials):
        _trial(base, shards, pipe, ranks, 100 * ranks + seed, ref, log)
    kills = [row for row in log if row[3].startswith("killed")]
    (base / f"trials-r{ranks}.json").write_text(json.dumps(log, indent=1))
    print(f"\n{ranks} rank(s): {trials} trials, {len(kills)} kills: {log}")
    assert len(kills) >= trials * 2


# ---------------------------------------------------------------- shard preparation
def _journal_shards(out: Path) -> int:
    path = out / ".journal.jsonl"
    return sum('"shard"' in line for line in path.read_text().splitlines()) if path.is_file() else 0


@pytest.mark.parametrize("workers", [1, 2])
def test_shard_prep_kill_schedules_keep_every_input_once(tmp_path, workers):
    from data_pipelines.embedded import write_embedded_photos

    photos = write_embedded_photos(tmp_path / "in")
    for i, p in enumerate(sorted(photos.glob("*.jpg"))):
        (photos / f"copy{i:02d}.jpg").write_bytes(p.read_bytes())
    expected = sorted(p.name for p in photos.glob("*.jpg"))
    rng = random.Random(workers)
    trials = 5
    for trial in range(trials):
        out = tmp_path / f"out{trial}"
        cmd = [sys.executable, str(trainrun.ROOT / "scripts" / "prepare_shards.py"), "--input", str(photos),
               "--output", str(out), "--shard-size", "2", "--resolution", "64", "--no-progress",
               "--batch-size", "2", "--workers", str(workers)]
        env = {**trainrun.env(), "PYTHONPATH": str(trainrun.ROOT)}
        for kill_after in sorted(rng.sample(range(1, 12), 2)):       # two kills per trial
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
            try:
                deadline = time.monotonic() + 300
                while _journal_shards(out) < kill_after and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.005)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for p in out.glob("*.tar"):                                # no partial shard under a final name
                with tarfile.open(p) as tf:
                    tf.getmembers()
        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        from accord_face.data import build_dataset

        sources = [s["meta"]["source"] for s in build_dataset(str(out), resolution=16, shuffle_buffer=0,
                                                              split_by_node=False, split_by_worker=False)]
        assert sorted(sources) == expected                             # every input exactly once
        assert not list(out.glob(".*.tmp"))
        manifest = json.loads((out / "manifest.json").read_text())
        for shard in manifest["shards"]:
            assert hashlib.sha256((out / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
