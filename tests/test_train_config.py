"""Config errors fail before any training work starts, naming the cause."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from accord_face.config import ConfigError, describe, load_config
from accord_face.train import TrainConfig, preflight
from accord_face.train.loop import deepspeed_config

from shards_util import write_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), n_shards=1, per_shard=2, dim=128)


def test_all_configs_load_and_describe():
    for name in ("tiny", "sd15_faceid", "sdxl_faceid"):
        cfg = load_config(TrainConfig, ROOT / "configs" / f"{name}.yaml")
        assert cfg.output_dir and cfg.max_steps > 0
    cfg = load_config(TrainConfig, ROOT / "configs" / "tiny.yaml", ["output_dir=out/x", "max_steps=4"])
    assert (cfg.output_dir, cfg.max_steps, cfg.pretrained_model) == ("out/x", 4, "embedded:tiny")
    assert any(line.startswith("losses.dd_batch_fraction") for line in describe(TrainConfig))


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="losses.lamda_dd"):
        load_config(TrainConfig, ROOT / "configs" / "tiny.yaml", ["losses.lamda_dd=0.2"])


def test_shards_path_without_shards(tmp_path):
    cfg = load_config(TrainConfig, ROOT / "configs" / "tiny.yaml", [f"shards={tmp_path}"])
    with pytest.raises(ConfigError, match="'shards'.*no shards found"):
        preflight(cfg)


def test_embedding_size_mismatch(shards):
    cfg = load_config(TrainConfig, ROOT / "configs" / "tiny.yaml", [f"shards={shards}", "encoder.id_embed_dim=512"])
    with pytest.raises(ConfigError, match="embedding_dim=128 but encoder.id_embed_dim=512"):
        preflight(cfg)
    ok = preflight(load_config(TrainConfig, ROOT / "configs" / "tiny.yaml", [f"shards={shards}"]))
    assert ok.embedding_dim == 128 and ok.recognizer["name"] == "sface" and len(ok.urls) == 1


def test_frozen_reference_refused_under_zero3(shards):
    cfg = load_config(TrainConfig, ROOT / "configs" / "tiny.yaml",
                      [f"shards={shards}", "losses.dd_reference=frozen_initial",
                       "deepspeed.config=configs/deepspeed/zero3.json"])
    with pytest.raises(ConfigError, match="ZeRO-3"):
        preflight(cfg)


def test_deepspeed_config_is_filled_from_train_config():
    import torch

    cfg = load_config(TrainConfig, ROOT / "configs" / "tiny.yaml", ["optimizer.gradient_accumulation_steps=3",
                                                                  "train_batch_size=5", "optimizer.lr_warmup_steps=7"])
    for stage in (1, 2, 3):
        cfg.deepspeed.config = str(ROOT / "configs" / "deepspeed" / f"zero{stage}.json")
        ds = deepspeed_config(cfg, torch.float32)
        assert ds["zero_optimization"]["stage"] == stage
        assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (5, 3)
        assert ds["optimizer"]["params"]["torch_adam"] and not ds["bf16"]["enabled"]
        assert ds["scheduler"]["params"]["warmup_num_steps"] == 7


def test_script_reports_config_error_before_training(shards, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_encoder.py"), "--config",
                           str(ROOT / "configs" / "tiny.yaml"), f"shards={shards}", "encoder.id_embed_dim=512",
                           f"output_dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 2
    assert "embedding size mismatch" in proc.stderr
    assert not out.exists()  # nothing was started


def test_logging_interval_must_be_positive():
    with pytest.raises(ConfigError, match="logging_steps must be >= 1"):
        load_config(TrainConfig, ROOT / "configs" / "tiny.yaml", ["logging.logging_steps=0"])
    cfg = load_config(TrainConfig, ROOT / "configs" / "tiny.yaml", ["checkpointing.checkpointing_steps=0"])
    assert cfg.checkpointing.checkpointing_steps == 0
