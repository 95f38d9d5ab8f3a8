"""``python -m benchmarks.run --quick`` and ``benchmarks/gpu.sh --dry-run`` produce every figure."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _png(path: Path) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 200 and im.height > 150, path


def test_quick_run_writes_every_figure(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r = json.loads((out / "results.json").read_text())
    # the output contract of issue 11
    d = r["accord_step"]["default"]
    for v in (d["time_ratio"], d["memory_ratio"], r["loader"]["samples_per_s_per_core"],
              r["prep"]["non_model_share"], r["zero"]["two_rank_speedup"]):
        assert _number(v) and v > 0
    assert 0 <= r["prep"]["non_model_share"] <= 1
    assert d["settings"]["dd_batch_fraction"] < 1 and d["settings"]["dd_every_n_steps"] > 1
    # every section records the load it ran under, and the settings that produced it
    for sec in ("accord_step", "loader", "prep", "zero"):
        assert len(r[sec]["load_average_before"]) == 3 and len(r[sec]["load_average_after"]) == 3
    assert r["quick"] is True and r["plan"]["tiny_rounds"] >= 2
    tiny = r["accord_step"]["tiny"]["variants"]
    for f in ("1", "0.5", "0.25", "0.125"):
        assert f"DD f={f}" in tiny and f"DD+PD f={f}" in tiny
    assert any(v["settings"]["dd_every_n_steps"] == 2 for v in tiny.values())
    assert any(v["settings"]["dd_every_n_steps"] == 4 for v in tiny.values())
    for v in tiny.values():
        assert v["time_ratio"]["n"] == r["plan"]["tiny_rounds"]
        assert v["time_ratio"]["min"] <= v["time_ratio"]["median"] <= v["time_ratio"]["max"]
        assert _number(v["memory_ratio"]) and _number(v["activation_memory_ratio"])
    assert set(r["loader"]["workers"]) == {"0", "1", "2"}
    zero = r["zero"]["runs"]
    one, two = zero["zero2_ranks1"], zero["zero2_ranks2"]
    assert len(one["loss"]) == len(two["loss"]) == r["zero"]["steps"]
    # 1 and 2 ranks see the same samples per step: the curves agree (the PNG shows them)
    assert max(abs(a - b) for a, b in zip(one["loss"], two["loss"])) < 1e-3
    md = (out / "results.md").read_text()
    for head in ("Default ACCORD setting", "ACCORD step cost, tiny", "Loader", "Shard preparation", "ZeRO"):
        assert head in md
    for png in ("step_cost_tiny.png", "loader.png", "zero_losses.png"):
        _png(out / png)


def test_gpu_script_dry_run_prints_one_table(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run", str(out)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert table[0] == "| figure | value |" and len(table) >= 12
    assert any("whole trainer loop" in line for line in table)
    r = json.loads((out / "gpu_results.json").read_text())
    assert r["plan"]["device"] == "cpu" and r["trainer_loop"]["steps"] == r["plan"]["loop_steps"]
    assert _number(r["trainer_loop"]["samples_per_s"]["median"]) and _number(r["train_step_samples_per_s"])
    saved = [line for line in (out / "gpu_table.md").read_text().splitlines() if line.startswith("|")]
    assert saved == table
