"""The trainer end to end under DeepSpeed on CPU (gloo): 1 vs 2 ranks, crash + resume.

Four short runs share one module fixture (about a minute on 2 cores):
  single  1 rank,  micro batch 2 x accumulation 2, 4 steps, checkpoint every 2
  pair    2 ranks (ZeRO-2), micro batch 2 x 1,    4 steps  (same global batch of 4)
  crash   as single, SIGKILLed right after step 3 (last complete checkpoint: step 2)
  resume  as single in the crashed folder (a half-written step-3 checkpoint is planted first)
Shards: 4 shards of 2 samples, no shuffle, so every global batch holds the same samples in both layouts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shards_util import write_shards

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, common: list[str], extra: list[str], ranks: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "MASTER_PORT": str(_port())}
    script = [str(ROOT / "scripts" / "train_encoder.py"), "--config", str(ROOT / "configs" / "tiny.yaml")]
    if ranks == 1:
        cmd = [sys.executable] + script
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master_port", env["MASTER_PORT"]] + script
    return subprocess.run(cmd + common + extra + [f"output_dir={out}"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=400)


def _metrics(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}  # a resumed run's rows override the crashed run's


@pytest.fixture(scope="module")
def runs(tiny_pipeline_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("train")
    shards = write_shards(base / "shards", n_shards=4, per_shard=2)
    common = [f"pretrained_model={tiny_pipeline_dir}", f"shards={shards}", "max_steps=4", "train_batch_size=2",
              "data.shuffle_buffer=0", "checkpointing.checkpointing_steps=2", "checkpointing.checkpoints_total_limit=0",
              "validation.enabled=false", "optimizer.learning_rate=0.001", "debug.log_sample_keys=true", "logging.progress=false"]
    single = ["optimizer.gradient_accumulation_steps=2", "deepspeed.config=configs/deepspeed/zero2.json"]
    results = {}
    results["single"] = _run(base / "single", common, single)
    results["pair"] = _run(base / "pair", common, ["optimizer.gradient_accumulation_steps=1",
                                                   "deepspeed.config=configs/deepspeed/zero2.json"], ranks=2)
    results["crash"] = _run(base / "crash", common, single + ["debug.kill_after_step=3"])
    half = base / "crash" / "checkpoints" / "step-00000003"
    half.mkdir(parents=True, exist_ok=True)
    (half / "mp_rank_00_model_states.pt").write_bytes(b"half-written")
    results["resume"] = _run(base / "crash", common, single)
    return base, results


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def test_two_ranks_train_on_disjoint_samples(runs):
    base, res = runs
    _ok(res["pair"])
    losses = [r["loss"] for r in _metrics(base / "pair").values()]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    rows = [[json.loads(line) for line in (base / "pair" / f"samples-rank{r}.jsonl").read_text().splitlines()]
            for r in (0, 1)]
    for epoch in (0, 1):  # 8 samples, 4 per rank and epoch: each epoch the ranks split the data
        seen = [{k for row in rank_rows if row["epoch"] == epoch for k in row["keys"]} for rank_rows in rows]
        assert len(seen[0]) == len(seen[1]) == 4 and not seen[0] & seen[1]
    assert (base / "pair" / "adapter" / "ip_adapter.safetensors").is_file()


def test_one_and_two_ranks_give_the_same_loss_curve(runs):
    base, res = runs
    _ok(res["single"])
    _ok(res["pair"])
    one, two = _metrics(base / "single"), _metrics(base / "pair")
    for step in range(1, 5):
        for term in ("loss", "mse", "dd", "pd"):
            assert one[step][term] == pytest.approx(two[step][term], rel=1e-3, abs=1e-6), (step, term)
    # Training moved the loss at all (otherwise equality would be trivial).
    assert one[4]["loss"] != one[1]["loss"]
    # cpu_s is each step's own CPU time (not the process's running total, which includes the start-up's
    # seconds): positive and within a few threads' worth of the step's wall time.
    for rows, global_batch in ((one, 4), (two, 4)):
        for r in rows.values():
            wall = global_batch / r["samples_per_s"]
            assert 0 < r["cpu_s"] < 4 * wall + 0.05, (r["step"], r["cpu_s"], wall)


def test_resume_after_kill_equals_uninterrupted(runs):
    from safetensors.torch import load_file

    base, res = runs
    assert res["crash"].returncode != 0  # SIGKILL
    _ok(res["resume"])
    assert "resumed from" in res["resume"].stderr + res["resume"].stdout
    assert "step-00000002" in res["resume"].stderr + res["resume"].stdout  # not the half-written step 3
    single, resumed = _metrics(base / "single"), _metrics(base / "crash")
    for step in (3, 4):
        assert resumed[step]["loss"] == pytest.approx(single[step]["loss"], rel=1e-6, abs=1e-9)
    done = lambda out: json.loads((out / "checkpoints" / "step-00000004" / "COMPLETE").read_text())
    assert done(base / "crash")["step"] == done(base / "single")["step"] == 4
    assert done(base / "crash")["data"] == done(base / "single")["data"]
    a = load_file(str(base / "single" / "adapter" / "ip_adapter.safetensors"))
    b = load_file(str(base / "crash" / "adapter" / "ip_adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)
    from accord_face.config import load_config
    from accord_face.train import TrainConfig

    resolved = load_config(TrainConfig, base / "crash" / "config.yaml")  # the resolved config loads back
    assert Path(resolved.pretrained_model_path, "unet").is_dir() and resolved.max_steps == 4
