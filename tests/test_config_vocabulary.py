"""One config vocabulary for both trainers (accord_face.sections): the previous release's names still load,
each with one deprecation line naming the file, to the same resolved values; mistakes get "did you mean"."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from accord_face.config import ConfigError, load_config, to_dict
from accord_face.lora.config import LORA_RENAMED, LoraTrainConfig
from accord_face.train.config import ENCODER_RENAMED, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
PREVIOUS = ROOT / "tests" / "data" / "previous_release"   # configs/*.yaml as the previous release wrote them


def _deprecations(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "deprecated" in r.getMessage()]


@pytest.mark.parametrize("name, cls", [("tiny.yaml", TrainConfig), ("sd15_faceid.yaml", TrainConfig),
                                       ("lora_tiny.yaml", LoraTrainConfig), ("lora_subject.yaml", LoraTrainConfig)])
def test_previous_release_config_loads_to_the_same_values_with_one_line_per_old_key(name, cls, caplog, tmp_path):
    old = tmp_path / name
    shutil.copy(PREVIOUS / name, old)
    with caplog.at_level(logging.WARNING):
        legacy = load_config(cls, old)
    lines = _deprecations(caplog)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        current = load_config(cls, ROOT / "configs" / name)
    assert to_dict(legacy) == to_dict(current)
    assert _deprecations(caplog) == []                               # the bundled configs use the new names
    assert lines and all(line.startswith(f"{old}: '") for line in lines)
    assert len(lines) == len(set(lines))                             # one line per old key
    renamed = ENCODER_RENAMED if cls is TrainConfig else LORA_RENAMED
    old_keys = {line.split("'")[1] for line in lines}
    assert old_keys <= {r.old for r in renamed}
    for line in lines:                                               # names old -> new
        old_key = line.split("'")[1]
        rule = next(r for r in renamed if r.old == old_key)
        assert all(target in line for target in rule.targets), line


def test_every_old_encoder_key_maps_to_its_new_key(caplog):
    old = ["data.micro_batch_size=3", "optim.lr=0.002", "optim.weight_decay=0.03", "optim.betas=[0.8, 0.95]",
           "optim.warmup_steps=5", "optim.grad_clip=0.5", "optim.gradient_accumulation_steps=2",
           "deepspeed.precision=fp32", "checkpoint.every_n_steps=7", "checkpoint.keep_last=0", "resume=auto",
           "logging.every_n_steps=4", "logging.tensorboard=false", "validation.every_n_steps=6",
           "validation.prompts=['a b']"]
    new = ["train_batch_size=3", "optimizer.learning_rate=0.002", "optimizer.adam_weight_decay=0.03",
           "optimizer.adam_beta1=0.8", "optimizer.adam_beta2=0.95", "optimizer.lr_warmup_steps=5",
           "optimizer.max_grad_norm=0.5", "optimizer.gradient_accumulation_steps=2", "precision.mixed_precision=no",
           "checkpointing.checkpointing_steps=7", "checkpointing.checkpoints_total_limit=0",
           "checkpointing.resume_from_checkpoint=latest", "logging.logging_steps=4", "logging.report_to=none",
           "validation.validation_steps=6", "validation.validation_prompts=['a b']"]
    with caplog.at_level(logging.WARNING):
        a = load_config(TrainConfig, ROOT / "configs" / "tiny.yaml", old)
    assert len(_deprecations(caplog)) == len(old) == len(ENCODER_RENAMED)
    assert all(line.startswith("command line: ") for line in _deprecations(caplog))
    b = load_config(TrainConfig, ROOT / "configs" / "tiny.yaml", new)
    assert to_dict(a) == to_dict(b)
    assert a.optimizer.adam_beta1 == pytest.approx(0.8) and a.precision.mixed_precision == "no"


def test_every_old_lora_key_maps_to_its_new_key(caplog):
    old = ["batch_size=3", "gradient_accumulation=2", "learning_rate=0.002", "weight_decay=0.03", "max_grad_norm=0.5",
           "mixed_precision=fp32", "checkpoint_every=7", "keep_checkpoints=1", "resume=false", "log_every=4",
           "report_to=none", "validation.every=6", "validation.prompts=['a b']", "validation.images_per_prompt=3",
           "validation.inference_steps=2"]
    new = ["train_batch_size=3", "optimizer.gradient_accumulation_steps=2", "optimizer.learning_rate=0.002",
           "optimizer.adam_weight_decay=0.03", "optimizer.max_grad_norm=0.5", "precision.mixed_precision=no",
           "checkpointing.checkpointing_steps=7", "checkpointing.checkpoints_total_limit=1",
           "checkpointing.resume_from_checkpoint=none", "logging.logging_steps=4", "logging.report_to=none",
           "validation.validation_steps=6", "validation.validation_prompts=['a b']",
           "validation.num_validation_images=3", "validation.num_inference_steps=2"]
    with caplog.at_level(logging.WARNING):
        a = load_config(LoraTrainConfig, ROOT / "configs" / "lora_tiny.yaml", old)
    assert len(_deprecations(caplog)) == len(old) == len(LORA_RENAMED)
    assert to_dict(a) == to_dict(load_config(LoraTrainConfig, ROOT / "configs" / "lora_tiny.yaml", new))
    assert load_config(LoraTrainConfig, None, ["resume=true"]).checkpointing.resume_from_checkpoint == "latest"


def test_old_and_new_name_together_and_misspelt_keys_are_named(tmp_path):
    both = tmp_path / "both.yaml"
    both.write_text("optim: {lr: 0.1}\noptimizer: {learning_rate: 0.2}\n")
    with pytest.raises(ConfigError, match=f"'optim.lr' in {both} is the old name of 'optimizer.learning_rate', "
                                          "which is given too; keep only 'optimizer.learning_rate'"):
        load_config(TrainConfig, both)
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer.learnig_rate' in command line; did you mean "
                                          r"'optimizer.learning_rate'\?"):
        load_config(LoraTrainConfig, None, ["optimizer.learnig_rate=1"])
    typo = tmp_path / "typo.yaml"
    typo.write_text("checkpointing:\n  checkpoints_totl_limit: 3\n")
    with pytest.raises(ConfigError, match=f"unknown key 'checkpointing.checkpoints_totl_limit' in {typo}; did you "
                                          "mean 'checkpointing.checkpoints_total_limit'"):
        load_config(TrainConfig, typo)
    with pytest.raises(ConfigError, match="did you mean 'optimizer.max_grad_norm'"):   # a key put in the wrong place
        load_config(TrainConfig, None, ["max_grad_norm=1"])


def test_a_run_folder_of_the_previous_release_resumes_without_deprecation_lines(tiny_pipeline_dir, tmp_path, caplog):
    """OUTPUT/config.yaml written with the old names compares equal to the same run with the new ones."""
    from accord_face.lora.train import run_config_changes

    shutil.copy(PREVIOUS / "lora_tiny.yaml", tmp_path / "config.yaml")
    cfg = load_config(LoraTrainConfig, ROOT / "configs" / "lora_tiny.yaml", ["max_steps=80"])
    with caplog.at_level(logging.WARNING):
        assert run_config_changes(cfg, tmp_path / "config.yaml") == []
    assert _deprecations(caplog) == []
    other = load_config(LoraTrainConfig, ROOT / "configs" / "lora_tiny.yaml", ["optimizer.learning_rate=0.5"])
    assert run_config_changes(other, tmp_path / "config.yaml") == ["optimizer.learning_rate: 0.001 -> 0.5"]


def test_lr_warmup_is_diffusers_constant_with_warmup():
    import torch
    from diffusers.optimization import get_scheduler

    from accord_face.lora.train import warmup_factor

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=4)
    ours, theirs = [], []
    for step in range(7):
        ours.append(warmup_factor(step, 4))
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert ours == pytest.approx(theirs) and ours[0] == 0.0 and ours[-1] == 1.0
    assert warmup_factor(0, 0) == 1.0


@pytest.mark.parametrize("schedule,theirs_name", [("constant", "constant_with_warmup"), ("linear", "linear"),
                                                  ("cosine", "cosine")])
def test_lr_factor_is_diffusers_get_scheduler(schedule, theirs_name):
    import torch
    from diffusers.optimization import get_scheduler

    from accord_face.sections import lr_factor

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_scheduler(theirs_name, opt, num_warmup_steps=3, num_training_steps=10)
    for step in range(11):
        assert lr_factor(step, 3, 10, schedule) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12), step
        opt.step()
        sched.step()
    if schedule != "constant":                    # past the end it stays at 0 (diffusers' cosine would rise again)
        assert lr_factor(10, 3, 10, schedule) == lr_factor(13, 3, 10, schedule) == 0.0
    with pytest.raises(ValueError, match="lr_scheduler must be one of"):
        lr_factor(0, 0, 1, "exponential")
