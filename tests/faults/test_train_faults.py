"""The trainer under faults, end to end (the short subset of the suite that runs by default; the seeded
kill -9 schedules are in test_kill_trials.py, marked soak):

  ref      uninterrupted 4-step run, started while port 29500 is taken (a lone process needs no port)
  export   killed (SIGKILL) after the step-2 adapter was written but before it was swapped in, then resumed:
           the adapter on disk stayed loadable, the final one equals ref's, no duplicate metric rows,
           temp folders cleaned, keep_last respected, no incomplete checkpoint left
  sigterm  SIGTERM mid-run on shards with a bad sample and an empty shard: a checkpoint at that step, exit 0;
           the rerun resumes from it; skip counts in metrics.jsonl and TensorBoard
  all-bad  every shard unusable: one line, exit 2
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

import trainrun
from shards_util import write_shards

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tiny_pipeline_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("train_faults")
    shards = write_shards(base / "shards", n_shards=4, per_shard=2)
    busy = socket.socket()
    try:
        busy.bind(("127.0.0.1", 29500))
        busy.listen()
    except OSError:
        pass  # already taken by something else: the point holds either way
    try:
        ref = trainrun.run(tiny_pipeline_dir, shards, base / "ref")
    finally:
        busy.close()
    assert ref.returncode == 0, ref.stderr[-4000:]
    return base, shards, tiny_pipeline_dir


def test_kill_during_export_then_resume_equals_the_uninterrupted_run(setup):
    from accord_face import adapter

    base, shards, pipe = setup
    out = base / "export"
    killed = trainrun.run(pipe, shards, out, ["debug.kill_at=export:2"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert adapter.load_adapter_config(out / "adapter")["train_steps"] == 1   # step 1's adapter, whole
    assert adapter.load_adapter_state_dict(out / "adapter")
    assert [p.name for p in out.iterdir() if p.name.startswith(".adapter.tmp.")]  # the dead export's folder
    resumed = trainrun.run(pipe, shards, out)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stderr and "step-00000002" in resumed.stderr  # step 2 was COMPLETE
    a, b = trainrun.adapter_tensors(base / "ref"), trainrun.adapter_tensors(out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    steps = [r["step"] for r in trainrun.metrics(out)]
    assert steps == [1, 2, 3, 4]                                              # replayed rows replaced
    ref_rows = {r["step"]: r["loss"] for r in trainrun.metrics(base / "ref")}
    assert [r["loss"] for r in trainrun.metrics(out)] == pytest.approx([ref_rows[s] for s in steps], rel=1e-5)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".adapter")) == []
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-")) == \
        ["step-00000003", "step-00000004"]                                    # keep_last=2, all complete
    assert (out / "samples" / "step-00000004.png").is_file()
    assert not (out / "checkpoints" / "latest").exists()                    # no DeepSpeed 'latest' pointer
    assert "NaN" not in (out / "metrics.jsonl").read_text()


def _bad_shards(folder: Path) -> Path:
    import io

    import numpy as np
    import webdataset as wds

    shards = write_shards(folder, n_shards=4, per_shard=2)
    with wds.TarWriter(str(shards / "faces-000004.tar")) as tw:      # a sample without image, one bad embedding
        buf = io.BytesIO()
        np.save(buf, np.ones(7, np.float32))
        tw.write({"__key__": "noimage", "txt": b"x", "sface.npy": buf.getvalue()})
        tw.write({"__key__": "short", "jpg": b"\xff\xd8 not a jpeg", "txt": b"x", "sface.npy": buf.getvalue()})
    with wds.TarWriter(str(shards / "faces-000005.tar")):            # an empty shard
        pass
    return shards


def test_sigterm_checkpoints_and_stops_and_skip_counts_are_logged(setup):
    base, _, pipe = setup
    shards = _bad_shards(base / "bad_shards")
    out = base / "sigterm"
    cmd = trainrun.command(pipe, shards, out, ["max_steps=200", "checkpointing.checkpointing_steps=0"])
    proc = subprocess.Popen(cmd, env=trainrun.env(), cwd=trainrun.ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            rows = trainrun.metrics(out) if (out / "metrics.jsonl").is_file() else []
            if len(rows) >= 6:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-4000:]
    line = stdout.strip().splitlines()[-1]
    assert line.startswith("stopped by SIGTERM at step "), stdout[-2000:]
    k = int(line.split("at step ")[1].split(":")[0])
    assert 6 <= k < 200
    marker = json.loads((out / "checkpoints" / f"step-{k:08d}" / "COMPLETE").read_text())
    assert marker["step"] == k
    rows = trainrun.metrics(out)
    assert [r["step"] for r in rows] == list(range(1, k + 1))
    # 3 epochs at least went by (10 good samples... 8 good / batch 2): the bad shard was read and counted
    assert rows[-1]["data_bad_samples"] >= 2 and rows[-1]["data_empty_shards"] >= 1
    assert "faces-000004.tar key noimage" in stderr and "faces-000005.tar: no samples" in stderr

    resumed = trainrun.run(pipe, shards, out, [f"max_steps={k + 1}", "checkpointing.checkpointing_steps=0"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from {out / 'checkpoints' / f'step-{k:08d}'}" in resumed.stderr
    rows = trainrun.metrics(out)
    assert [r["step"] for r in rows] == list(range(1, k + 2))
    assert rows[-1]["data_bad_samples"] >= rows[-2]["data_bad_samples"]  # counts carry over the resume

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs"))
    events.Reload()
    assert "train/data_bad_samples" in events.Tags()["scalars"]


def test_every_shard_bad_stops_with_one_line(setup, tmp_path):
    _, _, pipe = setup
    folder = tmp_path / "all_bad"
    folder.mkdir()
    for i in range(2):
        (folder / f"faces-{i:06d}.tar").write_bytes(b"not a tar file" * 50)
    proc = trainrun.run(pipe, folder, tmp_path / "out", ["validation.enabled=false"])
    line = trainrun.one_line_error(proc)
    assert "got no complete batch" in line and " bad shard(s)" in line and "faces-00000" in line, line
