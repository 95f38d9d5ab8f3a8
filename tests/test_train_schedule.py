"""Learning-rate schedules and warm starts of the encoder trainer, end to end under DeepSpeed on CPU.

    schedule   6 steps, cosine after 2 warm-up steps: the logged lr of every step against diffusers'
               ``get_scheduler("cosine")`` and ``sections.lr_factor``; killed after step 3 and resumed:
               the same lr (the LambdaLR state rides in the DeepSpeed checkpoint)
    warm       ``init_adapter`` = the first run's export, learning rate ~0: the export equals it
    cold       the same without ``init_adapter``: the fresh encoder, far from it
    bad        ``init_adapter`` from an encoder with other tokens: exit 2, one line naming the key
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

from accord_face.sections import lr_factor
from shards_util import write_shards

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(out: Path, args: list[str]) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "MASTER_PORT": str(port)}
    cmd = [sys.executable, str(ROOT / "scripts" / "train_encoder.py"), "--config", str(ROOT / "configs" / "tiny.yaml")]
    return subprocess.run(cmd + args + [f"output_dir={out}"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=400)


def _lrs(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in rows}


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def runs(tiny_pipeline_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("sched")
    shards = write_shards(base / "shards", n_shards=2, per_shard=4)
    common = [f"pretrained_model={tiny_pipeline_dir}", f"shards={shards}", "train_batch_size=2",
              "data.shuffle_buffer=0", "validation.enabled=false", "logging.progress=false", "logging.logging_steps=1",
              "checkpointing.checkpoints_total_limit=0"]
    sched = common + ["max_steps=6", "optimizer.learning_rate=0.001", "optimizer.lr_warmup_steps=2",
                      "optimizer.lr_scheduler=cosine", "checkpointing.checkpointing_steps=2"]
    res = {"schedule": _run(base / "schedule", sched)}
    res["crash"] = _run(base / "crash", sched + ["debug.kill_after_step=3"])
    res["resume"] = _run(base / "crash", sched)
    res["warm"] = _run(base / "warm", common + ["max_steps=1", "optimizer.learning_rate=1e-12",
                                                f"init_adapter={base / 'schedule' / 'adapter'}"])
    res["cold"] = _run(base / "cold", common + ["max_steps=1", "optimizer.learning_rate=1e-12"])
    res["bad"] = _run(base / "bad", common + ["max_steps=1", "encoder.num_tokens=2",
                                               f"init_adapter={base / 'schedule' / 'adapter'}"])
    return base, res


def test_cosine_schedule_is_diffusers_cosine_and_survives_a_resume(runs):
    from diffusers.optimization import get_scheduler

    base, res = runs
    _ok(res["schedule"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    theirs = get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=6)
    expected = {}
    for step in range(1, 7):                       # row `step` logs the lr after `step` optimizer steps
        opt.step()
        theirs.step()
        expected[step] = opt.param_groups[0]["lr"]
    got = _lrs(base / "schedule")
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step] == pytest.approx(expected[step], abs=1e-12), step
        assert got[step] == pytest.approx(1e-3 * lr_factor(step, 2, 6, "cosine"), abs=1e-12), step
    assert got[2] == pytest.approx(1e-3) and got[6] == pytest.approx(0.0, abs=1e-12) and got[4] < got[3]
    assert res["crash"].returncode != 0             # SIGKILLed after step 3: resumed from step 2
    _ok(res["resume"])
    assert _lrs(base / "crash") == pytest.approx(got, abs=1e-12)


def test_init_adapter_starts_from_the_exported_weights(runs):
    from safetensors.torch import load_file

    base, res = runs
    _ok(res["warm"])
    a = load_file(str(base / "schedule" / "adapter" / "ip_adapter.safetensors"))
    b = load_file(str(base / "warm" / "adapter" / "ip_adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)
    # Without init_adapter the same run exports the fresh encoder, far from the trained weights
    # (otherwise the equality above would say nothing).
    _ok(res["cold"])
    cold = load_file(str(base / "cold" / "adapter" / "ip_adapter.safetensors"))
    assert max(float((cold[k] - a[k]).abs().max()) for k in a) > 1e-3
    assert json.loads((base / "warm" / "adapter" / "adapter_config.json").read_text())["train_steps"] == 1


def test_init_adapter_that_does_not_fit_is_one_clear_line(runs):
    _, res = runs
    bad = res["bad"]
    assert bad.returncode == 2, bad.stderr[-3000:]
    lines = [ln for ln in bad.stderr.splitlines() if "init_adapter" in ln]
    assert lines and "num_tokens=4 there, 2 here" in lines[0], bad.stderr[-3000:]
