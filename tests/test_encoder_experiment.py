"""The encoder coupling experiment's analysis and dose resolution, on synthetic records."""

from __future__ import annotations

import json

import numpy as np
import pytest

from accord_face.world.analysis import analyze, write_plot, write_table
from accord_face.world.experiment import ARMS, SCALES, resolve_overrides, sync_archive

FIELDS = ("background", "shirt", "accessory", "framing")


def _rec(identity, scale, sim, coupled, aligned, p=0):
    return {"identity": identity, "scale": scale, "prompt_index": p, "identity_similarity": sim,
            "retrieval_top1": sim > 0.5, "context_correct": {f: bool(aligned) for f in FIELDS},
            "coupled": {"background": bool(coupled), "shirt": False, "accessory": False},
            "p_asked": 0.9, "p_coupled": 0.3 if coupled else 0.1, "clip_t": 60.0}


def _write(out, arm, seed, coupling_of_scale, rng):
    d = out / "runs" / f"{arm}-abc" / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"arm": arm, "seed": seed}))
    lines = []
    for i in range(20):
        for s in SCALES:
            for p in range(2):
                lines.append(_rec(f"h{i}", s, 0.4 * s + 0.01 * rng.normal(), rng.random() < coupling_of_scale(s),
                                  rng.random() < 0.9, p))
    (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_an_arm_with_less_coupling_at_equal_identity_has_a_positive_coupling_gap(tmp_path):
    rng = np.random.default_rng(0)
    out = tmp_path / "exp"
    (out / "base").mkdir(parents=True)
    (out / "base" / "records.jsonl").write_text("".join(
        json.dumps(_rec(f"h{i}", 0.0, 0.0, False, True, p)) + "\n" for i in range(20) for p in range(2)))
    for seed in (0, 1, 2):
        _write(out, "baseline", seed, lambda s: 0.4 * s, rng)       # coupling rises with scale
        _write(out, "dd_r0.3", seed, lambda s: 0.1 * s, rng)        # same identity, a quarter of the coupling
    res = analyze(out, reps=200)
    base, dd = res["arms"]["baseline"], res["arms"]["dd_r0.3"]
    # one of the three differing fields can couple: the rate is a third of the draw's probability
    assert base["coupling_rate"]["mean"] == pytest.approx(0.4 / 3, abs=0.04)
    gap = dd["paired_vs_baseline"]["coupling_gap"]
    # coupling removed at equal identity: 0.3 * scale / 3 over the common range (identity = 0.4 * scale)
    assert gap["mean_diff"] == pytest.approx(0.1 * np.mean(SCALES), abs=0.03)
    assert gap["ci95"][0] > 0 and len(gap["per_run"]) == 3
    assert abs(dd["paired_vs_baseline"]["alignment_gap"]["mean_diff"]) < 0.1
    pw = dd["power"]
    assert pw["effect"] == pytest.approx(0.3 * pw["baseline_excess_coupling"])
    assert 0 <= pw["achieved"] <= 1 and pw["observed_mean_diff"] < 0
    table = write_table(res)
    assert "| baseline | 3 |" in table and "dd_r0.3" in table
    assert write_plot(res, tmp_path / "c.png").stat().st_size > 1000


def test_doses_are_resolved_from_the_gradient_ratio():
    calib = {"baseline_seed0": {"mean": {"grad_base": 0.03, "grad_dd": 0.001, "grad_pd": 0.6}}}
    over = resolve_overrides(ARMS["dd_r0.3"], calib)
    lam = float([o for o in over if o.startswith("losses.lambda_dd=")][0].split("=")[1])
    assert lam == pytest.approx(0.3 * 0.03 / 0.001, rel=1e-4)
    pd = resolve_overrides(ARMS["pd_r0.3"], calib)
    assert float(pd[-1].split("=")[1]) == pytest.approx(0.3 * 0.03 / 0.6, rel=1e-4)
    assert resolve_overrides(ARMS["baseline"], None) == ["losses.lambda_dd=0", "losses.lambda_pd=0"]


def test_archive_round_trip_keeps_finished_runs_only(tmp_path):
    out, arch = tmp_path / "out", tmp_path / "arch"
    done = out / "runs" / "baseline-abc" / "seed0"
    (done / "train").mkdir(parents=True)
    for name in ("run.json", "records.jsonl", "train/metrics.jsonl"):
        (done / name).write_text("x")
    (done / "train" / "adapter.bin").write_text("big")
    unfinished = out / "runs" / "dd-abc" / "seed0"
    unfinished.mkdir(parents=True)
    (unfinished / "run.json").write_text("x")
    assert sync_archive(out, arch, restore=False) == 3
    assert not (arch / "runs" / "dd-abc").exists() and not list(arch.rglob("adapter.bin*"))
    assert (arch / "runs/baseline-abc/seed0/records.jsonl.gz").is_file()
    fresh = tmp_path / "fresh"
    assert sync_archive(fresh, arch, restore=True) == 3
    assert (fresh / "runs/baseline-abc/seed0/records.jsonl").read_text() == "x"


def test_training_diagnostics_first_and_last_share_per_key():
    from accord_face.world.analysis import training_diagnostics

    rows = [{"step": i, "mse": 1.0 - i / 100, "dd": 0.0, "delta_q0": float(i), "cos_gap": 0.0, "lambda_pd": 0.0}
            for i in range(100)]
    d = training_diagnostics(rows)
    assert d["mse"]["first"] == pytest.approx(np.mean([1.0 - i / 100 for i in range(20)]))
    assert d["delta_q0"]["last"] == pytest.approx(np.mean(range(80, 100)))
    assert "cos_gap" not in d and "delta_q3" not in d          # no PDLoss: its logged zeros are not a gap
    rows_pd = [dict(r, lambda_pd=0.003, cos_gap=0.5 - r["step"] / 1000) for r in rows]
    assert training_diagnostics(rows_pd)["cos_gap"]["first"] == pytest.approx(0.5 - 9.5 / 1000)
    assert training_diagnostics([]) == {}
    from accord_face.world.analysis import write_diagnostics_table
    def as_arm(d):    # analyze()'s per-arm shape: {key: {first|last: {mean, per_run}}}
        return {"training": {k: {w: {"mean": v[w], "per_run": [v[w]]} for w in v} for k, v in d.items()}}
    res = {"arms": {"baseline": as_arm(training_diagnostics([{"mse": 1.0}])), "dd_r0.3": as_arm(training_diagnostics(rows))}}
    table = write_diagnostics_table(res)
    assert "| dd_r0.3 |" in table and "| baseline |" not in table and "9.5 -> 89.5" in table
    assert write_diagnostics_table({"arms": {"baseline": res["arms"]["baseline"]}}) == ""
