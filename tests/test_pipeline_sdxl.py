"""The SDXL path of accord_face.pipeline on a tiny StableDiffusionXLPipeline built from small configs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from accord_face.pipeline import FaceIDGenerator
from test_pipeline_helpers import as_array, export_test_adapter, grace_hopper


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory):
    """Two text encoders (hidden 32 each -> cross-attention 64), text-time conditioning, 64 px / 8x8 latents."""
    from accord_face.tiny import save_sdxl_pipeline

    return str(save_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl", text_hidden=(32, 32), pooled_dim=32))


@pytest.fixture(scope="module")
def sdxl_adapter(tiny_sdxl_dir, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    return export_test_adapter(tiny_sdxl_dir, tmp_path_factory.mktemp("sdxl_adapter") / "a", unet=unet, is_sdxl=True)


@pytest.fixture(scope="module")
def sdxl_gen(sdxl_adapter):
    return FaceIDGenerator(sdxl_adapter, device="cpu")


def _unit(seed: int) -> np.ndarray:
    e = np.random.default_rng(seed).standard_normal(128).astype(np.float32)
    return e / np.linalg.norm(e)


def test_sdxl_adapter_loads_and_generates_reproducibly(sdxl_adapter, sdxl_gen):
    assert json.loads((sdxl_adapter / "adapter_config.json").read_text())["cross_attention_dim"] == 64
    assert sdxl_gen.is_sdxl and sdxl_gen.describe()["pipeline"] == "StableDiffusionXLPipeline"
    e = _unit(0)
    a, b = (as_array(sdxl_gen.generate(e, "a photo of a person", seeds=[1], steps=2, guidance=4.0)[0])
            for _ in range(2))
    c = as_array(sdxl_gen.generate(-e, "a photo of a person", seeds=[1], steps=2, guidance=4.0)[0])
    assert a.shape == (64, 64, 3) and np.array_equal(a, b) and np.abs(a - c).mean() > 0.5


def test_sdxl_coupling_diagnostics(sdxl_adapter, sdxl_gen, tmp_path):
    from accord_face.evaluate import EvaluateConfig, coupling_diagnostics

    photo = tmp_path / "grace.jpg"
    grace_hopper().save(photo)
    cfg = EvaluateConfig(adapter=str(sdxl_adapter), faces=str(tmp_path), prompts="unused", coupling_samples=2,
                         coupling_timesteps=2)
    out = coupling_diagnostics(sdxl_gen, cfg, {"grace": [photo]}, ["a photo of a person", "an oil painting"],
                               {"grace": _unit(1)})
    dd, pd = out["dd"], out["pd"]
    assert dd["num_samples"] == 2 and np.isfinite(dd["discrepancy"]) and dd["discrepancy"] > 0
    # SDXL's PDLoss mapping: text_encoder_2's projection on the last 32 of the 64 token dims
    assert pd["pd_mapping"] == "text_projection_mean_tail" and 0 < pd["abs_gap"] <= 2
    assert pd["projection_model"].endswith("(text_encoder_2)")
