"""diffusers-example flags on both trainers, mapped onto the trainers' own keys."""

import pytest

from accord_face.config import ConfigError, load_config
from accord_face.lora import LoraTrainConfig
from accord_face.train import TrainConfig
from accord_face.train_flags import (ENCODER_FLAGS, LORA_FLAGS, flags_to_overrides, resolve_config_path,
                                     split_argv)


SHARED = ["--train_batch_size", "3", "--learning_rate", "2e-5", "--adam_weight_decay", "0.03", "--adam_beta2", "0.99",
          "--lr_warmup_steps", "6", "--lr_scheduler", "cosine", "--max_grad_norm", "0.5", "--gradient_accumulation_steps", "2",
          "--checkpointing_steps", "4", "--checkpoints_total_limit", "1", "--resume_from_checkpoint", "none",
          "--mixed_precision", "bf16", "--logging_steps", "7", "--report_to", "none", "--validation_steps", "8",
          "--validation_prompt", "a sks dog", "--num_inference_steps", "3", "--max_train_steps", "9"]


def _shared(cfg) -> dict:
    from accord_face.config import to_dict

    d = to_dict(cfg)
    return {"train_batch_size": d["train_batch_size"], "max_steps": d["max_steps"], "optimizer": d["optimizer"],
            "precision": d["precision"], "checkpointing": d["checkpointing"], "logging": d["logging"],
            **{k: d["validation"][k] for k in ("validation_steps", "validation_prompts", "num_inference_steps")}}


def test_both_trainers_map_the_diffusers_flags_onto_the_same_keys():
    lora = load_config(LoraTrainConfig, resolve_config_path("lora_tiny"), flags_to_overrides(SHARED, LORA_FLAGS))
    enc = load_config(TrainConfig, resolve_config_path("tiny"), flags_to_overrides(SHARED, ENCODER_FLAGS))
    assert _shared(lora) == _shared(enc)
    o = enc.optimizer
    assert (o.learning_rate, o.adam_weight_decay, o.adam_beta2) == pytest.approx((2e-5, 0.03, 0.99))
    assert (o.lr_warmup_steps, o.max_grad_norm, o.gradient_accumulation_steps) == (6, 0.5, 2)
    assert o.lr_scheduler == lora.optimizer.lr_scheduler == "cosine"
    c = enc.checkpointing
    assert (c.checkpointing_steps, c.checkpoints_total_limit, c.resume_from_checkpoint) == (4, 1, "none")
    assert (enc.train_batch_size, enc.max_steps, enc.precision.mixed_precision) == (3, 9, "bf16")
    assert (enc.logging.logging_steps, enc.logging.report_to) == (7, "none")
    v = enc.validation
    assert (v.validation_steps, v.validation_prompts, v.num_inference_steps) == (8, ["a sks dog"], 3)


def test_lora_trainer_takes_dreambooth_lora_flags(tmp_path):
    argv = ["--output_dir", str(tmp_path), "--rank", "8", "--with_prior_preservation", "--num_validation_images", "3",
            "lora.alpha=16", "--data.synthetic", "subject"]
    cfg = load_config(LoraTrainConfig, resolve_config_path("lora_tiny"), flags_to_overrides(argv, LORA_FLAGS))
    assert (cfg.output_dir, cfg.lora.rank, cfg.lora.alpha) == (str(tmp_path), 8, 16.0)
    assert cfg.prior.enabled and cfg.validation.num_validation_images == 3


def test_flag_mistakes_are_named():
    with pytest.raises(ConfigError, match="did you mean 'optimizer.learning_rate'"):
        load_config(LoraTrainConfig, None, flags_to_overrides(["--lerning_rate", "1"], LORA_FLAGS))
    with pytest.raises(ConfigError, match="did you mean 'checkpointing.checkpointing_steps'"):
        load_config(TrainConfig, None, ["checkpointing_steps=5"])
    with pytest.raises(ValueError, match="--output_dir needs a value"):
        flags_to_overrides(["--output_dir", "--rank", "4"], LORA_FLAGS)
    with pytest.raises(ConfigError, match=r"'precision.mixed_precision' in command line: 'fp8' is not one of"):
        load_config(LoraTrainConfig, None, flags_to_overrides(["--mixed_precision", "fp8"], LORA_FLAGS))
    with pytest.raises(ConfigError, match="report_to=wandb: (the encoder trainer writes tensorboard or none|wandb is "
                                          "not installed)"):
        load_config(TrainConfig, None, flags_to_overrides(["--report_to", "wandb"], ENCODER_FLAGS))


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


def test_mixed_precision_no_stays_the_word_no():
    """YAML 1.1 reads a bare ``no`` as false; ``--mixed_precision no`` (diffusers' spelling) must mean "no"."""
    for cls, table in ((LoraTrainConfig, LORA_FLAGS), (TrainConfig, ENCODER_FLAGS)):
        cfg = load_config(cls, None, flags_to_overrides(["--mixed_precision", "no"], table))
        assert cfg.precision.mixed_precision == "no"
    with pytest.raises(ConfigError, match="True is not one of"):
        load_config(TrainConfig, None, ["precision.mixed_precision=yes"])


def test_ip_adapter_warm_start_flag_sets_init_adapter(tmp_path):
    enc = load_config(TrainConfig, resolve_config_path("tiny"),
                      flags_to_overrides(["--pretrained_ip_adapter_path", str(tmp_path)], ENCODER_FLAGS))
    assert enc.init_adapter == str(tmp_path)
