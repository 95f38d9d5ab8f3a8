"""The LoRA trainer under faults, as the user runs it (a subprocess of scripts/train_lora.py):

  signal    SIGTERM or SIGINT mid-run: a checkpoint at that step, the export, exit 0 with one line; the rerun
            resumes from it and ends with the same LoRA as an uninterrupted run of the same length
  config    an output folder holding a LoRA run with another config is refused before any model loads (one
            line naming the keys, exit 2, the stored config kept); the same run (longer, other validation)
            resumes; --resume_from_checkpoint force continues it with the new settings
  save      a checkpoint save cut short (ENOSPC): accelerate's own folder is left unloadable, the trainer's
            leaves no folder and the previous checkpoint the newest

The refusal runs by default (nothing trains); the runs that train are marked heavy (pytest -m heavy).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import trainrun

pytestmark = pytest.mark.slow

from accord_face.config import load_config, save_config  # noqa: E402
from accord_face.lora.config import LoraTrainConfig  # noqa: E402

ROOT = trainrun.ROOT
FAST = ["data.synthetic_count=2", "validation.num_inference_steps=1", "validation.num_validation_images=1",
        "validation.validation_prompts=['a photo of sks backpack']", "validation.validation_steps=0",
        "logging.logging_steps=1", "logging.progress=false", "lora.rank=2", "accord.lambda_pd=0"]


def command(pipeline: str, out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "train_lora.py"), "--config", "lora_tiny",
            f"pretrained_model={pipeline}", "--output_dir", str(out), *FAST, *extra]


def run(pipeline: str, out: Path, extra: list[str] = (), timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command(pipeline, out, list(extra)), env=trainrun.env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def lora_tensors(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))


def rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.heavy
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_checkpoints_exits_cleanly_and_the_rerun_resumes(tiny_pipeline_dir, tmp_path, sig):
    out = tmp_path / "stopped"
    proc = subprocess.Popen(command(tiny_pipeline_dir, out, ["--max_train_steps", "200", "--checkpointing_steps",
                                                             "0"]),
                            env=trainrun.env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and len(rows(out)) < 2:
            time.sleep(0.2)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-4000:]
    assert "Traceback" not in stderr, stderr[-4000:]
    line = stdout.strip().splitlines()[-1]
    assert line.startswith(f"stopped by {sig.name} at step "), stdout[-2000:]
    k = int(line.split("at step ")[1].split(":")[0])
    assert 2 <= k < 200
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == [f"step-{k:08d}"]                                      # checkpointing_steps=0: only this one
    assert json.loads((out / "checkpoints" / ckpts[0] / "state.json").read_text())["step"] == k
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()    # exported at the stop
    from accord_face.train.guard import OutputLock

    OutputLock(out).release()                                               # the folder is free again

    resumed = run(tiny_pipeline_dir, out, ["--max_train_steps", str(k + 1), "--checkpointing_steps", "0"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from {out / 'checkpoints' / ckpts[0]} (step {k})" in resumed.stdout + resumed.stderr
    assert [r["step"] for r in rows(out)] == list(range(1, k + 2))           # no step twice, none missing

    straight = tmp_path / "straight"
    ref = run(tiny_pipeline_dir, straight, ["--max_train_steps", str(k + 1), "--checkpointing_steps", "0"])
    assert ref.returncode == 0, ref.stderr[-4000:]
    a, b = lora_tensors(out), lora_tensors(straight)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    assert [r["loss"] for r in rows(out)] == pytest.approx([r["loss"] for r in rows(straight)], rel=1e-5)


def test_another_lora_run_in_the_output_folder_is_refused_before_any_model_loads(tiny_pipeline_dir, tmp_path):
    from accord_face.checks import UsageError
    from accord_face.lora.train import check_output_run

    out = tmp_path / "run"
    cfg = load_config(LoraTrainConfig, ROOT / "configs" / "lora_tiny.yaml",
                      [f"pretrained_model={tiny_pipeline_dir}", f"output_dir={out}", *FAST])
    save_config(cfg, out / "config.yaml")                                   # what a run leaves there
    stored = (out / "config.yaml").read_bytes()
    refused = run(tiny_pipeline_dir, out, ["--learning_rate", "0.5", "--rank", "4"], timeout=120)
    line = trainrun.one_line_error(refused)
    assert line.startswith(f"error: output_dir {out} holds a LoRA run with another config (")
    assert "lora.rank: 2 -> 4" in line and "optimizer.learning_rate: 0.001 -> 0.5" in line
    assert "--resume_from_checkpoint force" in line and "pick a new output_dir" in line
    assert "[lora] base model" not in refused.stdout + refused.stderr       # nothing loaded
    assert (out / "config.yaml").read_bytes() == stored
    assert sorted(p.name for p in out.iterdir()) == [".lock", "config.yaml"]
    fresh = load_config(LoraTrainConfig, out / "config.yaml", ["optimizer.learning_rate=0.5",
                                                                "checkpointing.resume_from_checkpoint=none"])
    with pytest.raises(UsageError, match="holds a LoRA run with another config"):   # not even from scratch
        check_output_run(fresh)
    longer = load_config(LoraTrainConfig, out / "config.yaml", ["max_steps=90", "validation.num_inference_steps=3",
                                                                 "export_format=kohya", "logging.logging_steps=9"])
    assert check_output_run(longer) is None                                  # the same run: no checkpoint yet
    forced = load_config(LoraTrainConfig, out / "config.yaml", ["optimizer.learning_rate=0.5",
                                                                 "checkpointing.resume_from_checkpoint=force"])
    assert check_output_run(forced) is None


@pytest.mark.heavy
def test_an_output_folder_with_another_lora_run_is_refused_unless_it_is_the_same_run(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "run"
    first = run(tiny_pipeline_dir, out, ["--max_train_steps", "2", "--checkpointing_steps", "1"])
    assert first.returncode == 0, first.stderr[-4000:]
    stored = (out / "config.yaml").read_bytes()
    weights = (out / "lora" / "pytorch_lora_weights.safetensors").read_bytes()

    refused = run(tiny_pipeline_dir, out, ["--max_train_steps", "3", "--learning_rate", "0.5", "--rank", "4"])
    line = trainrun.one_line_error(refused)
    assert line.startswith(f"error: output_dir {out} holds a LoRA run with another config (")
    assert "lora.rank: 2 -> 4" in line and "optimizer.learning_rate: 0.001 -> 0.5" in line
    assert "--resume_from_checkpoint force" in line and "pick a new output_dir" in line
    assert "[lora] base model" not in refused.stdout + refused.stderr       # refused before any model loaded
    assert (out / "config.yaml").read_bytes() == stored
    assert (out / "lora" / "pytorch_lora_weights.safetensors").read_bytes() == weights

    fresh = run(tiny_pipeline_dir, out, ["--max_train_steps", "3", "--learning_rate", "0.5",
                                         "--resume_from_checkpoint", "none"])
    assert "holds a LoRA run with another config" in trainrun.one_line_error(fresh)   # not even from scratch

    same = run(tiny_pipeline_dir, out, ["--max_train_steps", "3", "--checkpointing_steps", "1",
                                        "validation.num_inference_steps=2", "--export_format", "kohya"])
    assert same.returncode == 0, same.stderr[-4000:]
    assert "(step 2)" in same.stdout + same.stderr and [r["step"] for r in rows(out)] == [1, 2, 3]

    forced = run(tiny_pipeline_dir, out, ["--max_train_steps", "4", "--learning_rate", "0.5",
                                          "--resume_from_checkpoint", "force"])
    assert forced.returncode == 0, forced.stderr[-4000:]
    assert "(step 3)" in forced.stdout + forced.stderr
    assert "learning_rate: 0.5" in (out / "config.yaml").read_text()       # the run now has the new settings


def test_a_save_that_fails_midway_leaves_the_previous_checkpoint_newest(tmp_path, monkeypatch):
    """Why the LoRA trainer wraps ``save_state``: accelerate alone writes into the final folder, so a save cut
    short (disk full, kill) leaves a folder that looks like the newest checkpoint and does not load."""
    import errno

    from accelerate import Accelerator

    from accord_face.lora.checkpoints import list_checkpoints, save_checkpoint

    accelerator = Accelerator(cpu=True)
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = accelerator.prepare_optimizer(torch.optim.AdamW([weight], lr=0.1))
    weight.grad = torch.ones(3)
    optimizer.step()
    root = tmp_path / "checkpoints"
    save_checkpoint(accelerator, root, 1, {"loss": 1.0})

    real_save = torch.save

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    bare = tmp_path / "bare" / "step-00000002"
    with pytest.raises(OSError):
        accelerator.save_state(str(bare))
    with pytest.raises(OSError):
        save_checkpoint(accelerator, root, 2, {"loss": 1.0})
    monkeypatch.setattr(torch, "save", real_save)

    assert bare.is_dir()                                                    # accelerate: a folder is there ...
    with pytest.raises(Exception):
        accelerator.load_state(str(bare))                                   # ... and it does not load
    assert [p.name for p in root.iterdir()] == ["step-00000001"]            # ours: no new folder, no temp left
    assert [p.name for p in list_checkpoints(root)] == ["step-00000001"]
    accelerator.load_state(str(root / "step-00000001"))
