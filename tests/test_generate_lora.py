"""`accord-face generate --lora DIR --lora-scale S`: a trained LoRA through stock diffusers."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from accord_face.cli import main


@pytest.fixture(scope="module")
def lora_dir(tiny_pipeline_dir, tmp_path_factory):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    from accord_face.lora.export import export_lora
    from accord_face.lora.models import LoraModels

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    gen = torch.Generator().manual_seed(0)
    for n, p in pipe.unet.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=gen)
    folder = tmp_path_factory.mktemp("run") / "lora"
    export_lora(LoraModels(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
                           tiny_pipeline_dir), folder)
    return folder


def _generate(lora_dir, out, scale):
    assert main(["generate", "--lora", str(lora_dir), "--lora-scale", str(scale), "--prompt", "a photo of a dog",
                 "--steps", "2", "--guidance", "1", "--out", str(out)]) == 0
    return np.asarray(Image.open(out / "p00_seed0.png"))


def test_lora_scale_zero_is_the_base_model_and_one_is_not(lora_dir, tiny_pipeline_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    base = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    base.set_progress_bar_config(disable=True)
    ref = np.asarray(base("a photo of a dog", num_inference_steps=2, guidance_scale=1.0, height=64, width=64,
                          generator=torch.Generator().manual_seed(0)).images[0])
    off = _generate(lora_dir, tmp_path / "s0", 0.0)
    on = _generate(lora_dir, tmp_path / "s1", 1.0)
    assert np.abs(off.astype(int) - ref.astype(int)).max() <= 1
    assert np.abs(on.astype(int) - ref.astype(int)).mean() > 1.0
    summary = json.loads((tmp_path / "s1" / "generate.json").read_text())
    assert summary["lora"] == str(lora_dir) and summary["lora_scale"] == 1.0
    assert summary["base_model"] == tiny_pipeline_dir   # read from the LoRA's lora_config.json
