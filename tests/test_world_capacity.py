"""The capacity branches' bookkeeping: paired per-person differences, archives, bad arm names."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats as sps

from accord_face.world import capacity
from accord_face.world.capacity import CONTROL, PAIRED, CapacityConfig, run_capacity, summary


def _metrics(rng, shift: float, n: int = 50) -> dict:
    per = {k: list(np.clip(rng.normal(0.4, 0.2, n) + shift, 0, 1)) for k in PAIRED}
    arm = {k: {"mean": float(np.mean(v)), "ci95": [0.0, 1.0]} for k, v in per.items()}
    arm["per_identity"] = per
    return {"arms": {"adapter": arm, "base": arm}, "context_accuracy_ratio_vs_base": 0.97,
            "paired_adapter_minus_base": {"identity_similarity": {"mean": 0.4}}}


def test_paired_difference_to_the_control_is_the_per_person_t_interval():
    rng = np.random.default_rng(0)
    ctrl, arm = _metrics(rng, 0.0), _metrics(rng, 0.1)
    s = summary({CONTROL: ctrl, "cosine": arm})
    assert "paired_vs_control" not in s["arms"][CONTROL]
    for k in PAIRED:
        d = np.array(arm["arms"]["adapter"]["per_identity"][k]) - np.array(ctrl["arms"]["adapter"]["per_identity"][k])
        got = s["arms"]["cosine"]["paired_vs_control"][k]
        half = sps.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
        assert got["mean"] == pytest.approx(d.mean())
        assert got["ci95"] == pytest.approx([d.mean() - half, d.mean() + half])
    assert s["arm_overrides"]["cosine"] == ["optimizer.lr_scheduler=cosine"]


def test_archived_arms_are_the_record_and_nothing_is_retrained(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    archive = tmp_path / "archive"
    archive.mkdir()
    for arm, shift in ((CONTROL, 0.0), ("cosine", 0.05)):
        (archive / f"{arm}.json").write_text(json.dumps(_metrics(rng, shift)))
    monkeypatch.setattr(capacity, "start_adapter", lambda cfg: pytest.fail("an archived arm was retrained"))
    s = run_capacity(CapacityConfig(out=str(tmp_path / "out"), archive=str(archive), arms=["cosine", CONTROL],
                                    length_archive=str(tmp_path / "none")))
    assert s["pending"] == [] and set(s["arms"]) == {CONTROL, "cosine"}
    assert (archive / "summary.json").is_file() and (archive / "summary.png").stat().st_size > 1000
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["arms"]["cosine"]["paired_vs_control"]


def test_unknown_arm_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown \\['nope'\\]; choose from"):
        CapacityConfig(arms=["nope"]).validate()


def test_summary_includes_arms_another_process_archived_meanwhile(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    archive = tmp_path / "archive"
    archive.mkdir()

    def run_arm(cfg, arm, start, shards):      # while this process trains "cosine", another one finishes the control
        (archive / f"{CONTROL}.json").write_text(json.dumps(_metrics(rng, 0.0)))
        return _metrics(rng, 0.05)

    monkeypatch.setattr(capacity, "start_adapter", lambda cfg: (tmp_path / "a", tmp_path / "s"))
    monkeypatch.setattr(capacity, "run_arm", run_arm)
    s = run_capacity(CapacityConfig(out=str(tmp_path / "out"), archive=str(archive), arms=["cosine"],
                                    length_archive=str(tmp_path / "none")))
    assert set(s["arms"]) == {CONTROL, "cosine"} and "paired_vs_control" in s["arms"]["cosine"]


def test_scale_sweep_is_evaluated_once_archived_and_tabled_per_scale(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "cosine.json").write_text(json.dumps(_metrics(rng, 0.0)))
    calls = []

    def at_scale(cfg, arm, scale):
        calls.append((arm, scale))
        m = _metrics(rng, 0.1)
        m["context_accuracy_ratio_vs_base"] = 0.85
        return m

    monkeypatch.setattr(capacity, "evaluate_at_scale", at_scale)
    cfg = CapacityConfig(out=str(tmp_path / "out"), archive=str(archive), arms=["cosine"], scales=[1.5],
                         length_archive=str(tmp_path / "none"))
    s = run_capacity(cfg)
    row = s["scale_sweep"]["cosine"]
    assert calls == [("cosine", 1.5)] and list(row) == ["1", "1.5"]
    assert row["1.5"]["context_accuracy_ratio_vs_base"] == 0.85 and row["1"]["context_accuracy_ratio_vs_base"] == 0.97
    assert row["1.5"]["retrieval_top1"] == json.loads((archive / "cosine-scale1.5.json").read_text())[
        "arms"]["adapter"]["retrieval_top1"]["mean"]
    run_capacity(cfg)                                  # archived: not evaluated again
    assert calls == [("cosine", 1.5)]
    with pytest.raises(ValueError, match="scales"):
        CapacityConfig(scales=[0.0]).validate()


def test_a_longer_base_arm_trains_and_evaluates_on_its_own_base_and_others_on_the_committed_one(tmp_path,
                                                                                                monkeypatch):
    """``unet6000`` passes its longer base to the trainer (the evaluation then follows the adapter's recorded
    base); the other arms pass none, and never build one."""
    from accord_face.world import experiment, length

    launched = {}
    built = []

    def launch(config, shards, out, steps, port, extra, log_path, threads, ranks=1):
        launched[out.parent.name] = extra

    def longer_base(cfg, steps):
        built.append(steps)
        return tmp_path / f"base-{steps}"

    monkeypatch.setattr(experiment, "launch_train_encoder", launch)
    monkeypatch.setattr(capacity, "longer_base", longer_base)
    monkeypatch.setattr(length, "evaluate", lambda *a, **k: {"arms": {}})
    cfg = capacity.CapacityConfig(out=str(tmp_path / "out"), archive="")
    for arm in ("unet6000", "cosine"):
        capacity.run_arm(cfg, arm, tmp_path / "start", tmp_path / "shards")
    assert f"pretrained_model={tmp_path / 'base-6000'}" in launched["unet6000"]
    assert not any(x.startswith("pretrained_model=") for x in launched["cosine"])
    assert built == [6000] and "unet6000" in capacity.ARMS


def test_the_12000_step_base_continues_the_6000_step_one_which_continues_the_committed_one(tmp_path, monkeypatch):
    """``longer_base(12000)`` builds the 6,000-step base first (if missing) and continues its assets folder;
    the 6,000-step base continues the committed UNet; a built base is reused, never retrained."""
    from accord_face.world import assemble, build, stages

    calls = []

    def run_stage(wcfg, stage):
        calls.append((wcfg.unet.steps, wcfg.unet.continue_from))

    def run_assets(wcfg, out):
        out.mkdir(parents=True)
        (out / "world.json").write_text("{}")

    monkeypatch.setattr(stages, "seed_from_assets", lambda wcfg: [])
    monkeypatch.setattr(build, "run_stage", run_stage)
    monkeypatch.setattr(stages, "run_assets", run_assets)
    monkeypatch.setattr(assemble, "ensure_world_pipeline", lambda root, assets: assets)
    monkeypatch.setattr(capacity, "REPO", tmp_path)
    cfg = capacity.CapacityConfig(world_cache="cache")
    root = tmp_path / "cache"
    assert capacity.longer_base(cfg, 12000) == root / "assets-unet12000"
    assert calls == [(6000, "assets"), (12000, str(root / "assets-unet6000"))]
    capacity.longer_base(cfg, 12000)
    assert len(calls) == 2


def test_the_length_run_archives_its_resume_checkpoint_only_under_the_size_cap(tmp_path):
    """``archive_resume_point`` gzips the checkpoint and run config for a new checkout to continue from, and
    skips a checkpoint over ``max_mb`` (too large to commit) instead of archiving it."""
    from accord_face import archive as arch
    from accord_face.world.length import RESUME, archive_resume_point

    out = tmp_path / "run"
    ck = out / "train" / "checkpoints" / "step-00000200"
    ck.mkdir(parents=True)
    (ck / "COMPLETE").write_text("{}")
    (ck / "optim_states.pt").write_bytes(np.random.default_rng(0).bytes(600_000))   # ~0.57 MB
    (out / "train" / "config.yaml").write_text("max_steps: 200\n")
    assert archive_resume_point(out, tmp_path / "big", 200, max_mb=0.5) == 0
    assert not (tmp_path / "big" / RESUME).exists()
    assert archive_resume_point(out, tmp_path / "ok", 200, max_mb=1.0) == 3
    back = tmp_path / "fresh"
    assert arch.restore(back, tmp_path / "ok" / RESUME) == 3
    assert (back / "train" / "checkpoints" / "step-00000200" / "optim_states.pt").read_bytes() == \
        (ck / "optim_states.pt").read_bytes()


def test_the_wide_recipe_is_faces_yaml_with_only_the_adapter_size_and_length_changed():
    """configs/faces_wide.yaml is the measured arm ``wide16``: faces.yaml's every field but the adapter's token
    count, projection width and training length (so its figures compare with faces.yaml's per person)."""
    from pathlib import Path

    from accord_face.config import load_config, to_dict
    from accord_face.train.config import TrainConfig

    root = Path(__file__).resolve().parents[1]
    base = to_dict(load_config(TrainConfig, str(root / "configs" / "faces.yaml"), []))
    wide_cfg = load_config(TrainConfig, str(root / "configs" / "faces_wide.yaml"), [])
    wide_cfg.validate()
    wide = to_dict(wide_cfg)
    assert (wide["encoder"]["num_tokens"], wide["encoder"]["hidden_dim"], wide["max_steps"]) == (16, 1024, 16000)
    for d in (base, wide):
        d["encoder"].pop("num_tokens"), d["encoder"].pop("hidden_dim"), d.pop("max_steps")
    assert wide == base


def test_branches_on_two_ranks_keep_the_global_batch_and_take_the_common_overrides(tmp_path, monkeypatch):
    from accord_face.world import experiment, length

    seen = {}

    def launch(config, shards, out, steps, port, extra, log_path, threads, ranks=1):
        seen.update(extra=extra, ranks=ranks, config=config)

    monkeypatch.setattr(experiment, "launch_train_encoder", launch)
    monkeypatch.setattr(length, "evaluate", lambda *a, **k: {"arms": {}})
    cfg = capacity.CapacityConfig(out=str(tmp_path / "out"), archive="", config="configs/faces_wide.yaml", ranks=2,
                                  overrides=["data.latent_cache_mb=64"], arms=["lora16_cosine"])
    cfg.validate()
    capacity.run_arm(cfg, "lora16_cosine", tmp_path / "start", tmp_path / "shards")
    assert seen["ranks"] == 2 and seen["extra"][-1] == "train_batch_size=8"
    assert seen["extra"].index("data.latent_cache_mb=64") < seen["extra"].index("lora.rank=16")
    with pytest.raises(ValueError, match="does not divide"):
        capacity.CapacityConfig(ranks=3).validate()
