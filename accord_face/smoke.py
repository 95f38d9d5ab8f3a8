"""A training-free smoke of the ACCORD losses on a real (embedded) pipeline.

Loads a pipeline folder with diffusers, runs the UNet on one noisy latent under
the four conditions DDLoss needs (joint, target only, text only, null), and
evaluates both losses. The "target" here is a text stand-in (an identity word
appended to the caption), since no trained identity encoder is involved yet.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import losses


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """Prompts -> text encoder hidden states (N, L, D), padded to the tokenizer's max length."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def run_loss_smoke(pipeline_dir: str | Path, seed: int = 0, batch: int = 4,
                   caption: str = "a photo of a man on a beach", target: str = "a photo of sks person",
                   superclass: str = "a photo of a person") -> dict[str, float]:
    """Evaluate DDLoss and PDLoss once on random latents; return the numbers."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from .tiny import projection_model_path

    pipeline_dir = str(pipeline_dir)
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet").eval()
    tokenizer = CLIPTokenizer.from_pretrained(pipeline_dir, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(pipeline_dir, subfolder="text_encoder").eval()
    scheduler = DDPMScheduler.from_pretrained(pipeline_dir, subfolder="scheduler")

    gen = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    x0 = torch.randn(batch, unet.config.in_channels, size, size, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
    x_t = scheduler.add_noise(x0, noise, t)

    joint = f"{target} {caption.removeprefix('a photo of')}"
    cond = encode_prompts(tokenizer, text_encoder, [joint, target, caption, ""])  # (4, L, D)
    with torch.no_grad():
        preds = [unet(x_t, t, encoder_hidden_states=c.expand(batch, -1, -1)).sample for c in cond]
    dd, delta = losses.denoising_decouple_loss(*preds, x_t, t, scheduler)

    result = {"dd_loss": float(dd), "delta_mean": float(delta.mean()), "timesteps": t.tolist()}
    proj_path = projection_model_path(pipeline_dir)
    if proj_path:
        clip = CLIPTextModelWithProjection.from_pretrained(proj_path).eval()
        ptok = CLIPTokenizer.from_pretrained(proj_path)
        with torch.no_grad():
            ids = ptok([target, superclass, caption], padding="max_length", max_length=ptok.model_max_length,
                       truncation=True, return_tensors="pt").input_ids
            f = clip(ids).text_embeds  # (3, D)
        result["pd_loss"] = float(losses.prior_decouple_loss(f[:1], f[1], f[2:3]))
    return result
