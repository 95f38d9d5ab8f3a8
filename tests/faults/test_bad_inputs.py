"""Bad configs, paths and output folders: each fails before any model loads, with one line naming the cause
and the fix, exit code 2, no traceback, and nothing already in the output folder changed.

The trainer's ``main`` runs in this process: every case here is refused before the process group starts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import typing
from pathlib import Path

import pytest
import torch
import yaml

from accord_face.config import ConfigError, load_config, save_config
from accord_face.train import TrainConfig
from accord_face.train import checkpoint as ckpt
from accord_face.train.guard import OutputLock
from payload import write_torch_payload
from shards_util import write_shards

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"


def _main():
    spec = importlib.util.spec_from_file_location("train_encoder_script", ROOT / "scripts" / "train_encoder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("bad_inputs") / "shards", n_shards=2, per_shard=2)


def _fail(capsys, argv) -> str:
    """Run the trainer's main; it must return 2 with exactly one stderr line and no traceback."""
    assert _main()(["--config", str(TINY), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def _finished_run(out: Path, shards: Path, step: int = 4, world: int = 1, **over) -> Path:
    """An output folder as a finished run leaves it (config.yaml + a complete checkpoint), without training."""
    cfg = load_config(TrainConfig, TINY, [f"shards={shards}", f"output_dir={out}", "max_steps=4",
                                          *[f"{k}={v}" for k, v in over.items()]])
    from accord_face.train.config import preflight
    from accord_face.train.loop import _resolved

    info = preflight(cfg)
    save_config(_resolved(cfg, type("P", (), {"path": "x"})(), info), out / "config.yaml")
    folder = out / "checkpoints" / ckpt.tag_for(step)
    folder.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}, "global_steps": step}, folder / "mp_rank_00_model_states.pt")
    ckpt.mark_complete(folder, {"step": step, "world_size": world})
    return out


CASES = {
    "unknown key": (["no_such_key=1"], "unknown key 'no_such_key'"),
    "wrong type on the command line": (["max_steps=abc"], "'max_steps' in command line: expected an integer"),
    "missing shards folder": (["shards=/nonexistent/shards"], "'shards': no shards found"),
    "empty shards value": (["shards="], "'shards' is empty"),
    "embedding size mismatch (recognizer)": (["encoder.id_embed_dim=512", "encoder.hidden_dim=1024"],
                                             "embedding size mismatch"),
    "unknown embedded size": (["pretrained_model=embedded:huge"], "names no embedded size"),
    "base model folder that is not a pipeline": (["pretrained_model=/tmp"], "no model_index.json"),
    "missing base model folder": (["pretrained_model=./models/nothing"], "models/nothing"),
    "hub id while offline": (["pretrained_model=someone/not-cached-model"], "HF_HUB_OFFLINE=1"),
    "resume folder that does not exist": (["checkpointing.resume_from_checkpoint=/nonexistent/step-00000003"],
                                   "does not exist"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_config_one_line_exit_2(case, shards, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv, expected = CASES[case]
    line = _fail(capsys, [f"shards={shards}", f"output_dir={tmp_path / 'out'}", *argv])
    assert line.startswith("config error: ") and expected in line, line


def test_output_dir_under_a_file(shards, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    line = _fail(capsys, [f"shards={shards}", f"output_dir={tmp_path / 'f' / 'out'}"])
    assert "it or a parent is a file" in line and str(tmp_path / "f" / "out") in line


def test_another_config_in_the_output_folder_is_refused_and_its_config_kept(shards, tmp_path, capsys):
    out = _finished_run(tmp_path / "out", shards)
    stored = (out / "config.yaml").read_bytes()
    line = _fail(capsys, [f"shards={shards}", f"output_dir={out}", "max_steps=4", "optimizer.learning_rate=0.001",
                          "seed=3"])
    assert "holds a run with another config (optimizer.learning_rate: 0.0001 -> 0.001; seed: 0 -> 3)" in line
    assert "--resume_from_checkpoint force" in line and (out / "config.yaml").read_bytes() == stored
    # the same config with a longer run and other logging is the same run
    from accord_face.train.config import preflight
    from accord_face.train.resume import check_resume

    cfg = load_config(TrainConfig, TINY, [f"shards={shards}", f"output_dir={out}", "max_steps=9",
                                          "logging.logging_steps=3", "validation.num_faces=1"])
    assert check_resume(cfg, preflight(cfg), out, 1).name == "step-00000004"
    forced = load_config(TrainConfig, TINY, [f"shards={shards}", f"output_dir={out}", "max_steps=9",
                                             "optimizer.learning_rate=0.001",
                                             "checkpointing.resume_from_checkpoint=force"])
    assert check_resume(forced, preflight(forced), out, 1).name == "step-00000004"


def test_max_steps_below_the_checkpoint(shards, tmp_path, capsys):
    out = _finished_run(tmp_path / "out", shards, step=4)
    line = _fail(capsys, [f"shards={shards}", f"output_dir={out}", "max_steps=2"])
    assert "is at step 4, past max_steps=2" in line


def test_another_rank_count_is_refused_before_deepspeed_loads(shards, tmp_path):
    from accord_face.train.config import preflight
    from accord_face.train.resume import check_resume

    out = _finished_run(tmp_path / "out", shards, world=2)
    cfg = load_config(TrainConfig, TINY, [f"shards={shards}", f"output_dir={out}", "max_steps=4"])
    with pytest.raises(ConfigError, match=r"written by 2 rank\(s\), this run has 1: resume with 2"):
        check_resume(cfg, preflight(cfg), out, 1)


def test_a_changed_checkpoint_file_is_refused_before_deepspeed_opens_it(shards, tmp_path, capsys):
    out = _finished_run(tmp_path / "out", shards)
    (out / "checkpoints" / "step-00000004" / "mp_rank_00_model_states.pt").write_bytes(b"crafted")
    line = _fail(capsys, [f"shards={shards}", f"output_dir={out}", "max_steps=4"])
    assert "mp_rank_00_model_states.pt differs from the sha256 recorded" in line


def test_a_crafted_pickle_with_matching_hashes_is_refused_before_anything_loads(shards, tmp_path, capsys):
    """The attacker also rewrote COMPLETE's hashes: the opcode scan refuses the file, and nothing runs."""
    import json

    out = _finished_run(tmp_path / "out", shards)
    folder = out / "checkpoints" / "step-00000004"
    marker = tmp_path / "ran"
    write_torch_payload(folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    info = json.loads((folder / "COMPLETE").read_text())
    info["files"] = ckpt.file_hashes(folder)
    (folder / "COMPLETE").write_text(json.dumps(info))
    line = _fail(capsys, [f"shards={shards}", f"output_dir={out}", "max_steps=4"])
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt: refused, it needs posix.system" in line
    assert not marker.exists()


def test_a_second_run_in_a_locked_output_folder(shards, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    lock = OutputLock(out)  # the first run
    try:
        line = _fail(capsys, [f"shards={shards}", f"output_dir={out}"])
    finally:
        lock.release()
    assert "is in use by another run" in line and str(out) in line


def _float_fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _float_fields(tp, f"{prefix}{f.name}.")
        elif tp is float or typing.get_args(tp) and float in typing.get_args(tp) and \
                typing.get_origin(tp) is not tuple and typing.get_origin(tp) is not list:
            yield f"{prefix}{f.name}"


@pytest.mark.parametrize("source", ["yaml", "command line"])
def test_a_float_written_1e_4_is_read_as_a_number_everywhere(tmp_path, source):
    keys = list(_float_fields(TrainConfig))
    assert len(keys) >= 10
    for key in keys:
        if source == "yaml":
            data = yaml.safe_load(TINY.read_text())
            node = data
            for part in key.split(".")[:-1]:
                node = node.setdefault(part, {})
            node[key.split(".")[-1]] = yaml.safe_load("x: 1e-4")["x"]  # YAML 1.1 reads it as the string '1e-4'
            assert node[key.split(".")[-1]] == "1e-4"
            path = tmp_path / "c.yaml"
            path.write_text(yaml.safe_dump(data))
            cfg = load_config(TrainConfig, path)
        else:
            cfg = load_config(TrainConfig, TINY, [f"{key}=1e-4"])
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        assert value == pytest.approx(1e-4) and isinstance(value, float), key


def test_the_lora_trainer_refuses_a_locked_output_folder(tiny_pipeline_dir, tmp_path):
    from accord_face.lora.config import LoraTrainConfig
    from accord_face.lora.train import train_lora

    out = tmp_path / "lora_out"
    out.mkdir()
    cfg = load_config(LoraTrainConfig, ROOT / "configs" / "lora_tiny.yaml",
                      [f"pretrained_model={tiny_pipeline_dir}", f"output_dir={out}", "max_steps=1"])
    lock = OutputLock(out)
    try:
        with pytest.raises(ConfigError, match="is in use by another run"):
            train_lora(cfg, log=lambda *a: None)
    finally:
        lock.release()
