"""The SDXL path of accord_face.pipeline on a tiny StableDiffusionXLPipeline built from small configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from accord_face.pipeline import FaceIDGenerator
from test_pipeline_helpers import as_array, export_test_adapter, grace_hopper


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory):
    """Two text encoders (hidden 32 each -> cross-attention 64), text-time conditioning, 64 px / 8x8 latents."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from accord_face.tiny import make_tokenizer

    tok = make_tokenizer()
    n = len(tok)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, down_block_types=("DownBlock2D",
        "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64, norm_num_groups=1)
    vae = AutoencoderKL(block_out_channels=(8, 16, 16, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=8, sample_size=64)
    cfg = CLIPTextConfig(vocab_size=n, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, projection_dim=32, bos_token_id=n - 2, eos_token_id=n - 1,
                         pad_token_id=n - 1, max_position_embeddings=77)
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=CLIPTextModel(cfg), text_encoder_2=CLIPTextModelWithProjection(cfg),
        tokenizer=tok, tokenizer_2=tok, scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                                                         beta_schedule="scaled_linear"))
    folder = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"
    pipe.save_pretrained(folder)
    return str(folder)


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
