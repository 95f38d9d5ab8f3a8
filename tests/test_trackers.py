"""The encoder trainer's report_to: TensorBoard events read back, a wandb run continued across a resume (wandb is
not installed here: a stand-in module records the calls the real one would get), and one line without wandb."""

from __future__ import annotations

import importlib.util
import sys
import time
import types

import pytest

from accord_face.config import ConfigError
from accord_face.train.trackers import WANDB_MISSING, Trackers


def test_tensorboard_events_read_back_and_a_resume_purges_replayed_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t = Trackers("tensorboard", tmp_path)
    for step in (1, 2, 3):
        t.log({"loss": 1.0 / step, "note": "text is not a scalar"}, step)
    t.close()
    # TensorBoard reads event files in name order, and the name starts with the creation second: a real resume
    # is a later process, so its file sorts after the killed run's; within one second, the writer counter in the
    # name decides, and in a long test session it can sort "10" before "9". Start the resumed writer a second on.
    time.sleep(1.05)
    resumed = Trackers("tensorboard", tmp_path, step=1)      # killed after 3, resumed from the step-1 checkpoint
    resumed.log({"loss": 0.25}, 2)
    resumed.close()
    acc = EventAccumulator(str(tmp_path / "logs"))
    acc.Reload()
    assert acc.Tags()["scalars"] == ["train/loss"]
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 0.25)]


class FakeRun:
    def __init__(self, calls, kwargs):
        self.calls, self.kwargs = calls, kwargs

    def log(self, data, step):
        self.calls.append(("log", data, step))

    def finish(self):
        self.calls.append(("finish",))


@pytest.fixture
def fake_wandb(monkeypatch):
    calls = []
    module = types.ModuleType("wandb")
    module.init = lambda **kw: calls.append(("init", kw)) or FakeRun(calls, kw)
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def test_wandb_run_gets_the_scalars_and_a_resume_continues_the_same_run(tmp_path, fake_wandb):
    t = Trackers("wandb", tmp_path / "run", config={"seed": 3})
    t.log({"loss": 0.5, "dd": 1}, 1)
    t.close()
    Trackers("wandb", tmp_path / "run", step=1).close()
    inits = [c[1] for c in fake_wandb if c[0] == "init"]
    assert len(inits) == 2 and inits[0]["id"] == inits[1]["id"] and inits[0]["resume"] == "allow"
    assert inits[0]["dir"] == str(tmp_path / "run" / "logs") and inits[0]["config"] == {"seed": 3}
    assert ("log", {"train/loss": 0.5, "train/dd": 1.0}, 1) in fake_wandb
    assert fake_wandb.count(("finish",)) == 2
    assert not list((tmp_path / "run" / "logs").glob("events.out.tfevents.*"))   # wandb only, no TensorBoard


def test_wandb_missing_is_one_line_naming_the_fix(monkeypatch, tmp_path):
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(ConfigError) as info:
        Trackers("wandb", tmp_path)
    assert str(info.value) == WANDB_MISSING and "pip install wandb" in WANDB_MISSING
    assert not (tmp_path / "logs").exists()
    with pytest.raises(ConfigError, match=r"one of tensorboard \| wandb \| none"):
        Trackers("mlflow", tmp_path)


def test_none_writes_nothing(tmp_path):
    t = Trackers("none", tmp_path)
    t.log({"loss": 1.0}, 1)
    t.close()
    assert not (tmp_path / "logs").exists()


STUB = '''"""A stand-in wandb: records init / log / finish as JSON lines in $WANDB_STUB_LOG."""
import json, os
def _rec(*a):
    with open(os.environ["WANDB_STUB_LOG"], "a") as f:
        f.write(json.dumps(a) + "\\n")
class _Run:
    def log(self, data, step): _rec("log", data, step)
    def finish(self): _rec("finish")
def init(**kw):
    _rec("init", {k: kw[k] for k in ("id", "resume", "dir", "name")}, sorted(kw["config"]))
    return _Run()
'''


def _train(pipe, shards, out, extra, **env):
    import subprocess
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "faults"))
    import trainrun

    return subprocess.run(trainrun.command(pipe, shards, out, ["max_steps=2", "validation.enabled=false", *extra]),
                          env=trainrun.env(**env), cwd=trainrun.ROOT, capture_output=True, text=True, timeout=900)


def test_encoder_trainer_without_wandb_refuses_report_to_wandb_in_one_line(tiny_pipeline_dir, tmp_path):
    from shards_util import write_shards

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    shards = write_shards(tmp_path / "shards", n_shards=2, per_shard=2)
    refused = _train(tiny_pipeline_dir, shards, tmp_path / "none", ["--report_to", "wandb"])
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "pip install wandb" in refused.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "none" / "checkpoints").exists()


@pytest.mark.heavy
def test_encoder_trainer_reports_to_wandb(tiny_pipeline_dir, tmp_path):
    """A 2-step tiny training with a stand-in wandb on PYTHONPATH (~40 s: pytest -m heavy)."""
    import json

    from shards_util import write_shards

    shards = write_shards(tmp_path / "shards", n_shards=2, per_shard=2)
    (tmp_path / "stub").mkdir()
    (tmp_path / "stub" / "wandb.py").write_text(STUB)
    log = tmp_path / "wandb.jsonl"
    proc = _train(tiny_pipeline_dir, shards, tmp_path / "run", ["--report_to", "wandb", "logging.logging_steps=1"],
                  PYTHONPATH=tmp_path / "stub", WANDB_STUB_LOG=log)
    assert proc.returncode == 0, proc.stderr[-4000:]
    calls = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert calls[0][0] == "init" and calls[0][1]["dir"] == str(tmp_path / "run" / "logs")
    assert "logging" in calls[0][2] and "optimizer" in calls[0][2]          # the resolved config
    logged = [c for c in calls if c[0] == "log"]
    assert [c[2] for c in logged] == [1, 2] and "train/loss" in logged[0][1] and "train/dd" in logged[0][1]
    assert calls[-1] == ["finish"]
    assert not list((tmp_path / "run" / "logs").glob("events.out.tfevents.*"))
