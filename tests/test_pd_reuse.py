"""PDLoss without a second CLIP pass: f_g from the conditioning text forward equals the two-pass value."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from accord_face.config import load_config
from accord_face.data import build_dataset, collate
from accord_face.train.config import TrainConfig
from accord_face.train.models import build_model, link_pd_text_features, load_frozen_parts
from accord_face.train.step import compute_losses, prepare_batch

from shards_util import write_shards

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(tiny_pipeline_dir, tmp_path_factory):
    shards = write_shards(tmp_path_factory.mktemp("pd_shards"), n_shards=1, per_shard=6)
    cfg = load_config(TrainConfig, "configs/tiny.yaml", [f"pretrained_model={tiny_pipeline_dir}", f"shards={shards}",
                                                        "dropout.caption=0.3", "losses.lambda_dd=0",
                                                        "losses.lambda_pd=1.0"])
    parts = load_frozen_parts(cfg, CPU, torch.float32, with_clip=True)
    model = build_model(cfg, parts)
    batch = collate(list(build_dataset(str(shards), resolution=64, shuffle_buffer=0, split_by_node=False,
                                       split_by_worker=False)))
    for step in range(1, 100):  # a step with kept samples and at least one dropped caption
        sb = prepare_batch(batch, parts, cfg, step, CPU, torch.float32)
        if sb.keep_both.any() and not sb.keep_both.all():
            break
    return cfg, parts, model, batch, sb, step


def _two_pass_pd(parts, model, sb, captions, superclass):
    """The old PDLoss: an independent CLIP (own copy of the tower) re-encodes every kept caption and c_s."""
    from transformers import CLIPTextModelWithProjection

    from accord_face.tiny import projection_model_path

    clip = CLIPTextModelWithProjection.from_pretrained(projection_model_path(parts.path)).eval()
    tok = parts.clip_tokenizer
    keep = torch.nonzero(sb.keep_both).flatten()
    ids = tok([captions[i] for i in keep.tolist()] + [superclass], padding="max_length",
              max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        feats = clip(ids).text_embeds
        f_p = clip.text_projection(model.encoder(sb.id_embeds[keep]).mean(dim=1))
    f_g, f_s = feats[:-1], feats[-1]
    cos = torch.nn.functional.cosine_similarity
    return (cos(f_p, f_g, dim=-1) - cos(f_s[None], f_g, dim=-1)).abs().mean()


def test_shared_tower_is_detected_and_held_once(setup):
    cfg, parts, model, batch, sb, step = setup
    assert parts.pd_from_conditioning
    assert parts.clip.text_model is parts.text_encoders[0]
    assert sb.text_features is not None and sb.text_features.shape == (len(sb.keys), parts.clip.config.projection_dim)


def test_pd_from_conditioning_equals_two_pass_value_without_a_clip_forward(setup):
    cfg, parts, model, batch, sb, step = setup
    calls = []
    hook = parts.clip.register_forward_hook(lambda *a: calls.append(1))
    try:
        compute_losses(model, sb, parts, cfg, step)           # first call may compute and cache f_s
        calls.clear()
        out = compute_losses(model, sb, parts, cfg, step)
    finally:
        hook.remove()
    assert calls == []                                        # no CLIP pass at all in a step
    expect = _two_pass_pd(parts, model, sb, batch["caption"], cfg.losses.superclass_prompt)
    torch.testing.assert_close(out["pd"].detach(), expect, rtol=1e-5, atol=1e-6)
    # the fallback (second pass through parts.clip) gives the same number
    old = compute_losses(model, dataclasses.replace(sb, text_features=None), parts, cfg, step)
    torch.testing.assert_close(out["pd"].detach(), old["pd"].detach(), rtol=1e-5, atol=1e-6)


def test_different_tower_falls_back_to_a_second_pass(setup):
    cfg, parts, model, batch, sb, step = setup
    other = copy.copy(parts)
    other.clip = copy.deepcopy(parts.clip)
    other.clip.text_model = copy.deepcopy(parts.text_encoders[0])
    w = other.clip.text_model.final_layer_norm.weight  # a random change (a uniform scale would leave cosines equal)
    with torch.no_grad():
        w.add_(0.5 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    other.pd_from_conditioning, other.feature_cache = False, {}
    link_pd_text_features(other)
    assert not other.pd_from_conditioning and other.clip.text_model is not parts.text_encoders[0]
    sb2 = prepare_batch(batch, other, cfg, step, CPU, torch.float32)
    assert sb2.text_features is None
    out = compute_losses(model, sb2, other, cfg, step)
    same = compute_losses(model, sb, parts, cfg, step)
    assert not torch.allclose(out["pd"], same["pd"])          # the other CLIP's features were used


def test_sdxl_reuses_text_encoder_2_text_embeds(tmp_path):
    from accord_face.tiny import save_sdxl_pipeline

    folder = save_sdxl_pipeline(tmp_path / "sdxl", text_hidden=(16, 32), pooled_dim=24)
    shards = write_shards(tmp_path / "shards", n_shards=1, per_shard=3)
    cfg = load_config(TrainConfig, "configs/sdxl_faceid.yaml",
                      [f"pretrained_model={folder}", f"shards={shards}", "resolution=64", "encoder.id_embed_dim=128"])
    parts = load_frozen_parts(cfg, CPU, torch.float32, with_clip=True)
    assert parts.pd_from_conditioning
    batch = collate(list(build_dataset(str(shards), resolution=64, shuffle_buffer=0, split_by_node=False,
                                       split_by_worker=False)))
    sb = prepare_batch(batch, parts, cfg, 1, CPU, torch.float32)
    tok = parts.clip_tokenizer
    ids = tok(batch["caption"], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        expect = parts.clip(ids).text_embeds
    keep = sb.keep_both
    torch.testing.assert_close(sb.text_features[keep], expect[keep], rtol=1e-5, atol=1e-6)
