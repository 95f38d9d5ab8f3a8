"""The family's shipped configs load, validate and say what the issue asks (member, tokens, LoRA, CLIP tower)."""

from pathlib import Path

import pytest

from accord_face.config import ConfigError, load_config
from accord_face.train.config import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name,kind,tokens,photos,lora,clip", [
    ("sd15_faceid_plusv2", "faceid_plusv2", 4, 1, 128, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    ("sdxl_faceid_plusv2", "faceid_plusv2", 4, 1, 128, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    ("sd15_faceid_portrait", "faceid_portrait", 16, 5, 0, None),
    ("tiny_faceid_plusv2", "faceid_plusv2", 4, 1, 0, "embedded:clip-vision"),
    ("tiny_faceid_portrait", "faceid_portrait", 16, 3, 0, None),
])
def test_family_configs(name, kind, tokens, photos, lora, clip):
    cfg = load_config(TrainConfig, CONFIGS / f"{name}.yaml")
    e = cfg.encoder
    assert (e.kind, e.num_tokens, e.num_photos, cfg.lora.rank) == (kind, tokens, photos, lora)
    if clip:
        assert e.image_encoder_path == clip
    if name.startswith("tiny"):
        assert cfg.pretrained_model == "embedded:tiny" and cfg.resolution == 64


@pytest.mark.parametrize("override,match", [
    ("encoder.num_tokens=16", "num_tokens must be 4"),
    ("encoder.num_photos=3", "num_photos"),
    ("lora.rank=-1", "lora.rank"),
])
def test_bad_family_settings_name_the_key(override, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        load_config(TrainConfig, CONFIGS / "tiny_faceid_plusv2.yaml", [override])
