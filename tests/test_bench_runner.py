"""The benchmark runner's own logic (fast): paired ratios, the output contract check, bad --out."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks import gpu, run
from benchmarks.common import paired_ratios, summary, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]


def test_paired_ratios_are_per_round_not_ratio_of_medians():
    variant, base = [2.0, 3.0, 10.0], [1.0, 3.0, 4.0]      # ratios 2, 1, 2.5 (medians would give 3/3 = 1)
    r = paired_ratios(variant, base)
    assert (r["median"], r["min"], r["max"], r["n"]) == (2.0, 1.0, 2.5, 3)
    with pytest.raises(ValueError, match="rounds"):
        paired_ratios([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        summary([])


def _complete() -> dict:
    return {"accord_step": {"default": {"time_ratio": 1.08, "memory_ratio": 1.0}},
            "loader": {"samples_per_s_per_core": 200.0}, "prep": {"non_model_share": 0.12},
            "zero": {"two_rank_speedup": 1.7}}


def test_contract_check_names_missing_and_non_finite_figures():
    assert run.missing_figures(_complete()) == []
    r = _complete()
    del r["prep"]["non_model_share"]
    r["zero"]["two_rank_speedup"] = math.nan
    r["loader"]["samples_per_s_per_core"] = True                # a bool is not a figure
    assert run.missing_figures(r) == ["loader.samples_per_s_per_core", "prep.non_model_share",
                                      "zero.two_rank_speedup"]
    assert set(run.CONTRACT) == {"accord_step.default.time_ratio", "accord_step.default.memory_ratio",
                                 "loader.samples_per_s_per_core", "prep.non_model_share", "zero.two_rank_speedup"}


@pytest.mark.parametrize("main", [run.main, gpu.main])
def test_out_that_is_a_file_exits_2_and_leaves_it(tmp_path, capsys, main):
    f = tmp_path / "results"
    f.write_text("keep me")
    assert main(["--out", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(f) in err[0] and "folder" in err[0]
    assert f.read_text() == "keep me"


def test_atomic_json_write_replaces_whole_file(tmp_path):
    p = tmp_path / "r.json"
    write_json_atomic(p, {"a": 1})
    write_json_atomic(p, {"b": [1, 2]})
    assert p.read_text().strip().startswith("{") and '"b"' in p.read_text() and '"a"' not in p.read_text()
    assert [x.name for x in tmp_path.iterdir()] == ["r.json"]          # no temp file left


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a CUDA machine would run the real benchmark")
def test_gpu_script_without_a_gpu_exits_2_with_one_line(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(tmp_path / "o")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--dry-run" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "o").exists()


def test_only_reruns_one_section_and_keeps_the_others(tmp_path, monkeypatch):
    """``--only zero`` replaces the zero section of an existing results.json and keeps every other figure."""
    import json

    from benchmarks import bench_zero

    shutil.copyfile(ROOT / "docs" / "benchmarks" / "results.json", tmp_path / "results.json")
    before = json.loads((tmp_path / "results.json").read_text())
    called = []

    def fake_measure(stages, steps, rounds=1, progress=None):
        called.append(tuple(stages))
        step = {"median": 0.2, "min": 0.1, "max": 0.3, "n": 2}
        runs = {f"zero{s}_ranks{k}": {"stage": s, "ranks": k, "step_s": step, "cpu_s_per_rank": step,
                                      "peak_rss_gib_rank0": 0.5, "loss": [1.0, 0.9]} for s in stages for k in (1, 2)}
        for s in stages:
            runs[f"zero{s}_ranks1"].update(two_rank_speedup=1.9, two_rank_speedup_wall=3.0,
                                           max_loss_gap_vs_2_ranks=0.0)
        return {"steps": steps, "rounds": rounds, "global_batch": 4, "runs": runs}

    monkeypatch.setattr(bench_zero, "measure", fake_measure)
    r = run.run(run.Plan(), tmp_path, quick=False, only=("zero",))
    assert called == [(0, 1, 2, 3)]
    assert r["zero"]["two_rank_speedup"] == 1.9 and r["zero"]["two_rank_speedup_wall"] == 3.0
    for name in ("accord_step", "loader", "prep"):
        assert r[name] == before[name]
    assert r["rerun"][-1]["sections"] == ["zero"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["zero"]["two_rank_speedup"] == 1.9 and saved["loader"] == before["loader"]
    assert "1.90 (3.00)" in (tmp_path / "results.md").read_text()
    assert run.missing_figures(saved) == []
