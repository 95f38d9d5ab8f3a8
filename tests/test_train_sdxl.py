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
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from accord_face.tiny import make_tokenizer

    tok = make_tokenizer()
    n = len(tok)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 24, cross_attention_dim=48,
        norm_num_groups=1)
    vae = AutoencoderKL(block_out_channels=(8, 16, 16, 16), latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, sample_size=64)
    te = lambda h, p: CLIPTextConfig(vocab_size=n, hidden_size=h, intermediate_size=37, num_hidden_layers=2,
                                     num_attention_heads=4, projection_dim=p, bos_token_id=n - 2, eos_token_id=n - 1,
                                     pad_token_id=n - 1, max_position_embeddings=77)
    pipe = StableDiffusionXLPipeline(unet=unet, vae=vae, text_encoder=CLIPTextModel(te(16, 16)),
                                     text_encoder_2=CLIPTextModelWithProjection(te(32, 24)), tokenizer=tok,
                                     tokenizer_2=tok, scheduler=EulerDiscreteScheduler(
                                         beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"))
    folder = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"
    pipe.save_pretrained(folder)
    return str(folder)


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
