"""The trainer's SDXL path (two text encoders, pooled embeds, time ids) on a tiny SDXL-shaped pipeline."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from accord_face import adapter
from accord_face.config import load_config
from accord_face.data import build_dataset, collate
from accord_face.train.config import TrainConfig
from accord_face.train.models import build_model, load_frozen_parts
from accord_face.train.step import compute_losses, prepare_batch

from shards_util import write_shards


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    """Text encoders of hidden 16 and 32 (cross-attention 48), text-time conditioning, 64 px."""
    from accord_face.tiny import save_sdxl_pipeline

    return str(save_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl", text_hidden=(16, 32), pooled_dim=24))


def test_sdxl_step_and_export_match_stock_pipeline(sdxl_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    shards = write_shards(tmp_path / "shards", n_shards=1, per_shard=4)
    cfg = load_config(TrainConfig, "configs/sdxl_faceid.yaml",
                      [f"pretrained_model={sdxl_dir}", f"shards={shards}", "resolution=64", "encoder.id_embed_dim=128"])
    parts = load_frozen_parts(cfg, torch.device("cpu"), torch.float32, with_clip=True)
    assert parts.is_sdxl and parts.clip is parts.text_encoders[1]
    model = build_model(cfg, parts)
    batch = collate(list(build_dataset(str(shards), resolution=64, shuffle_buffer=0, split_by_node=False,
                                       split_by_worker=False)))
    sb = prepare_batch(batch, parts, cfg, 1, torch.device("cpu"), torch.float32)
    assert sb.text.shape == (4, 77, 48) and sb.pooled.shape == (4, 24) and sb.time_ids.shape == (4, 6)
    c = dataclasses.replace(cfg, losses=dataclasses.replace(cfg.losses, lambda_warmup_steps=0, dd_batch_fraction=1.0))
    out = compute_losses(model, sb, parts, c, 1)
    assert torch.isfinite(out["loss"]) and out["pd"] > 0 and len(out["delta"]) == int(sb.keep_both.sum())
    out["loss"].backward()
    assert model.encoder.proj[0].weight.grad.abs().sum() > 0

    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = adapter.export_adapter(tmp_path / "adapter", model.encoder, model.unet, {"is_sdxl": True})
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name=adapter.WEIGHT_NAME, image_encoder_folder=None)
    with torch.no_grad():
        ours, _ = model(sb.noisy, sb.timesteps, sb.text, sb.id_embeds, sb.added())
        embeds = adapter.per_sample_image_embeds(sb.id_embeds)
        theirs = pipe.unet(sb.noisy, sb.timesteps, encoder_hidden_states=sb.text,
                           added_cond_kwargs={**sb.added(), "image_embeds": embeds}).sample
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
