"""diffusers-example flags on both trainers, mapped onto the trainers' own keys."""

import pytest

from accord_face.config import ConfigError, load_config
from accord_face.lora import LoraTrainConfig
from accord_face.train import TrainConfig
from accord_face.train_flags import (ENCODER_FLAGS, LORA_FLAGS, flags_to_overrides, resolve_config_path,
                                     split_argv)


def test_lora_trainer_takes_dreambooth_lora_flags(tmp_path):
    argv = ["--output_dir", str(tmp_path), "--max_train_steps=7", "--rank", "8", "--with_prior_preservation",
            "--mixed_precision", "no", "--resume_from_checkpoint", "latest", "--validation_prompt", "a sks dog",
            "--learning_rate", "3e-4", "--train_batch_size", "2", "--checkpointing_steps", "5",
            "--checkpoints_total_limit", "3", "lora.alpha=16", "--data.synthetic", "subject"]
    cfg = load_config(LoraTrainConfig, resolve_config_path("lora_tiny"), flags_to_overrides(argv, LORA_FLAGS))
    assert (cfg.output_dir, cfg.max_steps, cfg.lora.rank, cfg.lora.alpha) == (str(tmp_path), 7, 8, 16.0)
    assert cfg.prior.enabled and cfg.mixed_precision == "fp32" and cfg.resume is True
    assert cfg.validation.prompts == ["a sks dog"] and cfg.learning_rate == pytest.approx(3e-4)
    assert (cfg.batch_size, cfg.checkpoint_every, cfg.keep_checkpoints) == (2, 5, 3)


def test_encoder_trainer_takes_the_same_flag_names():
    argv = ["--pretrained_model_name_or_path", "embedded:tiny", "--train_batch_size", "3", "--learning_rate", "2e-5",
            "--checkpointing_steps", "4", "--checkpoints_total_limit", "1", "--mixed_precision", "bf16",
            "--resume_from_checkpoint", "latest", "--max_train_steps", "9", "--output_dir", "o"]
    cfg = load_config(TrainConfig, resolve_config_path("tiny"), flags_to_overrides(argv, ENCODER_FLAGS))
    assert (cfg.data.micro_batch_size, cfg.checkpoint.every_n_steps, cfg.checkpoint.keep_last) == (3, 4, 1)
    assert cfg.optim.lr == pytest.approx(2e-5) and cfg.deepspeed.precision == "bf16" and cfg.resume == "auto"
    assert (cfg.max_steps, cfg.output_dir) == (9, "o")


def test_flag_mistakes_are_named():
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        load_config(LoraTrainConfig, None, flags_to_overrides(["--lerning_rate", "1"], LORA_FLAGS))
    with pytest.raises(ValueError, match="--output_dir needs a value"):
        flags_to_overrides(["--output_dir", "--rank", "4"], LORA_FLAGS)
    with pytest.raises(ValueError, match="--mixed_precision fp8: use one of no, fp16, bf16"):
        flags_to_overrides(["--mixed_precision", "fp8"], LORA_FLAGS)


def test_split_argv_keeps_order_and_the_launchers_flag():
    own, rest = split_argv(["--config", "tiny", "--output_dir", "x", "--local_rank=0", "a=1", "--verbose"],
                           {"--config": True, "--local_rank": True, "--verbose": False})
    assert own == ["--config", "tiny", "--local_rank=0", "--verbose"] and rest == ["--output_dir", "x", "a=1"]
    assert resolve_config_path("tiny").endswith("configs/tiny.yaml")
    assert resolve_config_path("no-such-config") == "no-such-config"


def test_accord_face_dispatches_the_trainers(capsys):
    from accord_face.cli import main

    assert main(["train-lora", "--describe"]) == 0
    assert "lora.rank (int, default 4)" in capsys.readouterr().out
    assert main(["train-encoder", "--describe"]) == 0
    assert "export_format (one of 'diffusers' | 'comfyui'" in capsys.readouterr().out
    assert main(["train-lora", "--output_dir"]) == 2
    assert "--output_dir needs a value" in capsys.readouterr().err
