"""`accord-face generate` / `evaluate` faults: a damaged weight file is one line before the base loads; an
adapter put on another base of the same shape warns, naming both bases."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_pipeline_helpers import export_test_adapter, grace_hopper  # noqa: E402

from accord_face.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photos") / "grace.jpg"
    grace_hopper().save(path, quality=95)
    return path


@pytest.fixture(scope="module")
def good_adapter(tiny_pipeline_dir, tmp_path_factory):
    return export_test_adapter(tiny_pipeline_dir, tmp_path_factory.mktemp("adapters") / "adapter")


def _copy(folder: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(folder, dest)
    return dest


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _garbage(path: Path) -> None:
    path.write_bytes(b"<html>502 Bad Gateway</html>" * 4)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if the base pipeline or a face analyzer starts loading."""
    import diffusers

    import accord_face.face as face

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the damaged file was reported")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", refuse)
    monkeypatch.setattr(face, "load_face_analyzer", refuse)


@pytest.mark.parametrize("damage", [_truncate, _flip_last_byte, _garbage], ids=["truncated", "flipped", "garbage"])
def test_damaged_adapter_file_is_one_line_before_any_model_loads(good_adapter, photo, tmp_path, capsys, damage,
                                                                  no_model_loads):
    folder = _copy(good_adapter, tmp_path / "adapter")
    weights = folder / "ip_adapter.safetensors"
    damage(weights)
    code = main(["generate", "--adapter", str(folder), "--face", str(photo), "--prompt", "a photo of a person",
                 "--steps", "1", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert str(weights) in err[0] and "re-export" in err[0], err[0]
    assert ("truncated or corrupt" if damage is not _flip_last_byte else "sha256 mismatch") in err[0], err[0]
    assert not (tmp_path / "out").exists()


def test_damaged_identity_lora_and_lora_folder_are_named(good_adapter, photo, tmp_path, capsys, no_model_loads):
    folder = _copy(good_adapter, tmp_path / "adapter")
    _garbage(folder / "pytorch_lora_weights.safetensors")            # the identity LoRA beside the adapter
    code = main(["generate", "--adapter", str(folder), "--face", str(photo), "--prompt", "x", "--out",
                 str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"{folder / 'pytorch_lora_weights.safetensors'} is truncated or corrupt" in err, err
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "pytorch_lora_weights.safetensors").write_bytes(
        (good_adapter / "ip_adapter.safetensors").read_bytes()[:100])   # a download cut short
    code = main(["generate", "--lora", str(lora), "--prompt", "x", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and f"{lora / 'pytorch_lora_weights.safetensors'} is truncated" in err, err
    assert "rerun the LoRA training command" in err


def test_evaluate_refuses_a_truncated_adapter_before_loading(good_adapter, photo, tmp_path, capsys, no_model_loads):
    folder = _copy(good_adapter, tmp_path / "adapter")
    _truncate(folder / "ip_adapter.safetensors")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a person\n")
    code = main(["evaluate", "--adapter", str(folder), "--faces", str(photo.parent), "--prompts", str(prompts),
                 "--clip-model", "none", "--out", str(tmp_path / "ev")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "ip_adapter.safetensors is truncated or corrupt" in err, err


def test_an_intact_export_records_the_files_it_wrote(good_adapter):
    from accord_face.fingerprint import file_digest

    files = json.loads((good_adapter / "adapter_config.json").read_text())["files"]
    assert files == {"ip_adapter.safetensors": file_digest(good_adapter / "ip_adapter.safetensors")}


# ----------------------------------------------------------------------------- base identity


def test_fingerprint_tolerates_precision_and_tells_bases_apart(tiny_pipeline_dir):
    import torch
    from diffusers import UNet2DConditionModel

    from accord_face.fingerprint import base_fingerprint, fingerprint_difference
    from accord_face.tiny import build_components

    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")
    recorded = base_fingerprint("embedded:tiny", tiny_pipeline_dir, unet)
    for dtype in (torch.float16, torch.bfloat16):   # the same base loaded in another precision
        assert fingerprint_difference(recorded, base_fingerprint("x", None, unet.to(dtype))) is None
    other = build_components("tiny", 1)["unet"]     # same shapes, other weights
    assert fingerprint_difference(recorded, base_fingerprint("x", None, other)) == \
        "the UNet's weights differ (conv_in.weight)"
    tuned = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")
    with torch.no_grad():                            # a "fine-tune": every weight moved by 2 %
        for p in tuned.parameters():
            p.mul_(1.02)
    assert fingerprint_difference(recorded, base_fingerprint("x", None, tuned)) is not None
    bigger = build_components("small", 0)["unet"]
    assert fingerprint_difference(recorded, base_fingerprint("x", None, bigger)) == "the UNet config differs"


def test_generating_on_another_base_of_the_same_shape_warns_naming_both(good_adapter, tiny_pipeline_dir, caplog):
    from accord_face.pipeline import FaceIDGenerator
    from accord_face.tiny import ensure_pipeline

    with caplog.at_level(logging.WARNING, logger="accord_face"):
        same = FaceIDGenerator(good_adapter, device="cpu")
    assert same.base_check == {"trained_on": tiny_pipeline_dir, "same": True, "difference": None}
    assert not [r for r in caplog.records if "was trained on base" in r.getMessage()]
    other = str(ensure_pipeline("tiny", seed=1))     # same shapes as the trained base, other weights
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="accord_face"):
        gen = FaceIDGenerator(good_adapter, pretrained=other, device="cpu")
    lines = [r.getMessage() for r in caplog.records if "was trained on base" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert repr(tiny_pipeline_dir) in lines[0] and repr(other) in lines[0], lines[0]
    assert f"--pretrained {tiny_pipeline_dir}" in lines[0] and "weights differ" in lines[0]
    assert gen.describe()["base_check"]["same"] is False                      # recorded in generate.json
    # it is a warning, not an error: the pipeline works on the other base
    images = gen.generate(__import__("numpy").ones(128, "float32") / 128 ** 0.5, "a photo", seeds=[0], steps=1)
    assert images[0].size == (64, 64)


def test_an_adapter_without_a_fingerprint_is_accepted_quietly(tiny_pipeline_dir, tmp_path, caplog):
    from accord_face.pipeline import FaceIDGenerator

    folder = export_test_adapter(tiny_pipeline_dir, tmp_path / "old")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    del cfg["base_fingerprint"], cfg["files"]                                 # as exported by older versions
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with caplog.at_level(logging.WARNING, logger="accord_face"):
        gen = FaceIDGenerator(folder, device="cpu")
    assert gen.base_check["same"] is None and not caplog.records


def test_the_trainer_records_the_fingerprint_of_its_base():
    """``_adapter_info`` (what the trainer exports) carries the fingerprint set on the frozen parts."""
    from types import SimpleNamespace

    from accord_face.config import load_config
    from accord_face.train import TrainConfig
    from accord_face.train.loop import _adapter_info

    cfg = load_config(TrainConfig, None, [])
    parts = SimpleNamespace(path="/models/base", is_sdxl=False, base_fingerprint={"name": "b"}, image_encoder=None)
    model = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(cross_attention_dim=32)))
    info = _adapter_info(cfg, parts, SimpleNamespace(recognizer={"name": "sface"}), model, 3)
    assert info["base_fingerprint"] == {"name": "b"}
    assert os.path.basename(info["base_model_path"]) == "base"
