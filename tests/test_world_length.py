"""The length run's comparisons across runs: paired per person, pooled over training seeds, refused on other jobs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from accord_face.world import length

ROOT = Path(__file__).resolve().parents[1]
JOBS = {"identities": 5, "prompts_per_identity": 2, "scale": 1.0, "steps": 25, "guidance": 4.0, "seed": 0}


def fake_eval(rng: np.random.Generator, **config) -> dict:
    """A metrics.json as the world evaluation writes it, with random per-person values."""
    adapter = {k: {"per_run": [round(float(x), 5) for x in rng.uniform(0, 1, 5)]} for k in length.PAIRED}
    return {"identities": 5, "arms": {"adapter": adapter}, "config": JOBS | config}


def t95(d: np.ndarray) -> tuple[float, float, float]:
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return d.mean(), d.mean() - half, d.mean() + half


def test_paired_and_pooled_figures_match_the_per_person_formulas():
    rng = np.random.default_rng(3)
    a, b = fake_eval(rng), fake_eval(rng)
    got = length.paired_runs(a, b)["retrieval_top1"]
    per = [np.array(m["arms"]["adapter"]["retrieval_top1"]["per_run"]) for m in (a, b)]
    d = per[0] - per[1]
    mean, lo, hi = t95(d)
    assert got["mean"] == pytest.approx(mean) and got["ci95"] == pytest.approx([lo, hi]) and got["n"] == 5
    pooled = length.pooled_runs([a, b])["identity_similarity"]
    xbar = (np.array(a["arms"]["adapter"]["identity_similarity"]["per_run"])
            + np.array(b["arms"]["adapter"]["identity_similarity"]["per_run"])) / 2
    mean, lo, hi = t95(xbar)
    assert pooled["mean"] == pytest.approx(mean) and pooled["ci95"] == pytest.approx([lo, hi])
    assert pooled["seeds"] == 2 and pooled["n"] == 5


def test_evaluations_of_other_jobs_are_not_paired():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="cannot be paired"):
        length.paired_runs(fake_eval(rng), fake_eval(rng, seed=1))       # other evaluation noise
    with pytest.raises(ValueError, match="cannot be paired"):
        length.pooled_runs([fake_eval(rng), fake_eval(rng, identities=6)])


def test_comparisons_pair_only_the_milestones_both_runs_have(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    monkeypatch.setattr(length, "REPO", tmp_path)
    other, seed0 = tmp_path / "other", tmp_path / "seed0"
    for folder, steps in ((other, (4000, 16000)), (seed0, (16000,))):
        folder.mkdir()
        for s in steps:
            (folder / f"steps-{s}.json").write_text(json.dumps(fake_eval(rng)))
    done = {8000: fake_eval(rng), 16000: fake_eval(rng)}
    out = length.comparisons(done, ["other"], ["seed0"])
    assert list(out) == ["16000"]
    assert set(out["16000"]) == {"paired_vs:other", "pooled"}
    mine = np.array(done[16000]["arms"]["adapter"]["clip_t"]["per_run"])
    theirs = np.array(json.loads((other / "steps-16000.json").read_text())["arms"]["adapter"]["clip_t"]["per_run"])
    assert out["16000"]["paired_vs:other"]["clip_t"]["mean"] == pytest.approx((mine - theirs).mean())


def test_a_missing_comparison_archive_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_world_length.py"), f"out={tmp_path / 'o'}",
                        "compare=[docs/world/no_such_run]"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "compare: docs/world/no_such_run is not a folder" in r.stderr
    assert not (tmp_path / "o").exists()


CHILD = """
import signal, sys, time
from pathlib import Path
def stop(*_):
    Path(sys.argv[1]).write_text("checkpointed")
    sys.exit(1)
signal.signal(signal.SIGTERM, stop)
print("training", flush=True)
time.sleep(float(sys.argv[2]))
"""


LAUNCHER = """
import subprocess, sys
sys.exit(subprocess.call([sys.executable, "-c", sys.argv[1], *sys.argv[2:]]))
"""   # dies at once on SIGTERM, as the deepspeed launcher does: only the leaf may be signalled


def test_a_deadline_stops_the_job_with_sigterm_and_is_not_a_failure(tmp_path):
    import time

    from accord_face.world.experiment import run_until

    flag, log = tmp_path / "flag", tmp_path / "job.log"
    tic = time.time()
    assert run_until([sys.executable, "-c", CHILD, str(flag), "60"], log, dict(os.environ), deadline=tic + 2) is True
    assert flag.read_text() == "checkpointed" and time.time() - tic < 30 and "training" in log.read_text()
    flag.unlink()
    assert run_until([sys.executable, "-c", LAUNCHER, CHILD, str(flag), "60"], log, dict(os.environ),
                     deadline=time.time() + 2) is True
    assert flag.read_text() == "checkpointed"                       # the rank got the signal, not the launcher
    assert run_until([sys.executable, "-c", CHILD, str(flag), "0"], log, dict(os.environ), deadline=time.time() + 60) \
        is False                                                    # done before its deadline
    with pytest.raises(subprocess.CalledProcessError):               # a failure of its own is still one
        run_until([sys.executable, "-c", "raise SystemExit(3)"], log, dict(os.environ), deadline=time.time() + 60)


def test_a_run_stopped_by_its_deadline_archives_its_newest_checkpoint(tmp_path, monkeypatch):
    """stop_at reached: the newest complete checkpoint (not an incomplete newer one) goes to the archive, the
    milestone stays pending, and a fresh checkout's working folder gets it back."""
    out, archive = tmp_path / "run", tmp_path / "archive"
    for step, complete in ((200, True), (400, True), (600, False)):
        ck = out / "train" / "checkpoints" / f"step-{step:08d}"
        ck.mkdir(parents=True)
        (ck / "optim_states.pt").write_bytes(np.random.default_rng(step).bytes(1000))
        if complete:
            (ck / "COMPLETE").write_text("{}")
    (out / "train" / "config.yaml").write_text("max_steps: 16000\n")
    (out / "shards").mkdir()
    (out / "shards" / "manifest.json").write_text("{}")
    monkeypatch.setattr(length, "train_to", lambda *a, **k: None)   # the trainer stopped at the deadline
    cfg = length.LengthConfig(out=str(out), archive=str(archive), milestones=[16000], stop_at="23:59")
    result = length.run_length(cfg)
    assert result["pending"] == [16000]
    kept = archive / length.RESUME / "train" / "checkpoints"
    assert sorted(p.name for p in kept.iterdir()) == ["step-00000400"]
    assert length.restore_resume_point(tmp_path / "fresh", archive)
    assert length.latest_checkpoint(tmp_path / "fresh") == 400


def test_ranks_split_the_recipes_batch_and_refuse_a_non_divisor(tmp_path, monkeypatch):
    from accord_face.world import experiment

    seen = {}

    def launch(config, shards, out, steps, port, extra, log_path, threads, ranks, deadline):
        seen.update(extra=extra, ranks=ranks)
        return True                                                  # as if stopped: nothing to export

    monkeypatch.setattr(experiment, "launch_train_encoder", launch)
    cfg = length.LengthConfig(config="configs/faces_wide.yaml", ranks=2, overrides=["seed=1"])
    cfg.validate()
    assert length.train_to(cfg, tmp_path, tmp_path / "shards", 16000) is None
    assert seen["ranks"] == 2 and seen["extra"][-1] == "train_batch_size=8" and "seed=1" in seen["extra"]
    with pytest.raises(ValueError, match="does not divide"):
        length.LengthConfig(ranks=3).validate()
    with pytest.raises(ValueError, match="does not divide"):
        length.LengthConfig(ranks=2, overrides=["train_batch_size=5"]).validate()


def test_a_milestones_adapter_is_archived_under_its_cap_and_branches_start_from_it(tmp_path, monkeypatch):
    from accord_face.world import capacity

    adapter = tmp_path / "run" / "adapter-16000"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"train_steps": 16000}')
    (adapter / "ip_adapter.safetensors").write_bytes(b"\0" * 200_000)
    archive = tmp_path / "archive"
    archive.mkdir()
    assert length.archive_adapter(adapter, archive, 16000, max_mb=0.1) is None        # over the cap
    assert length.archive_adapter(adapter, archive, 16000, max_mb=0) is None          # off
    kept = length.archive_adapter(adapter, archive, 16000, max_mb=1.0)
    assert kept == archive / "adapter-16000"
    assert (kept / "ip_adapter.safetensors").read_bytes() == (adapter / "ip_adapter.safetensors").read_bytes()
    monkeypatch.setattr(length, "ensure_shards", lambda cfg, out: out / "shards")
    start, _ = capacity.start_adapter(capacity.CapacityConfig(length_out=str(tmp_path / "fresh"),
                                                              length_archive=str(archive)))
    assert start == kept                                             # no retraining in a checkout without the run
