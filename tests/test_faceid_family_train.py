"""The family in the trainer's step: FaceID-Plus CLIP states under dropout and ACCORD, Portrait photo draws."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from accord_face import losses
from accord_face.config import load_config
from accord_face.data import build_dataset, collate
from accord_face.family.portrait import IdentityBank, draw_count, person_of
from accord_face.family.trainer import attach_family_parts
from accord_face.train.config import ShardInfo, TrainConfig
from accord_face.train.models import build_model, load_frozen_parts
from accord_face.train.step import compute_losses, prepare_batch

from shards_util import write_shards

CPU = torch.device("cpu")


def _info(shards) -> ShardInfo:
    from accord_face.data import list_shards

    return ShardInfo(urls=list_shards(str(shards)), embedding_key="sface.npy", embedding_dim=128,
                     recognizer={"name": "sface"})


@pytest.fixture(scope="module")
def plus(tiny_pipeline_dir, tmp_path_factory):
    shards = write_shards(tmp_path_factory.mktemp("shards"), n_shards=1, per_shard=8)
    cfg = load_config(TrainConfig, "configs/tiny_faceid_plusv2.yaml", [
        f"pretrained_model={tiny_pipeline_dir}", f"shards={shards}", "dropout.identity=0.3", "dropout.caption=0.2",
        "dropout.both=0.1"])
    parts = load_frozen_parts(cfg, CPU, torch.float32, with_clip=False)
    attach_family_parts(cfg, parts, _info(shards), CPU, torch.float32)
    model = build_model(cfg, parts)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    ds = build_dataset(str(shards), resolution=64, shuffle_buffer=0, split_by_node=False, split_by_worker=False,
                       face_crop_size=parts.image_encoder.image_size)
    batch = collate(list(ds))
    for step in range(1, 300):   # a step with kept samples and dropped identities
        sb = prepare_batch(batch, parts, cfg, step, CPU, torch.float32)
        dropped = (sb.id_embeds == 0).all(-1)
        if 2 <= int(sb.keep_both.sum()) and bool(dropped.any()):
            break
    return cfg, parts, model, batch, sb, step


def test_plus_batch_has_face_crops_and_clip_states(plus):
    cfg, parts, model, batch, sb, step = plus
    s = parts.image_encoder.image_size
    assert batch["face_pixels"].shape == (8, 3, s, s) and batch["face_pixels"].dtype == torch.uint8
    live = parts.image_encoder(batch["face_pixels"]).float()                     # (B, L, H)
    dropped = (sb.id_embeds == 0).all(-1)
    null = parts.image_encoder.null_embeds().float()[0]
    for i in range(len(sb.keys)):
        # the dropped-identity convention: zero embedding AND CLIP(zero pixels), never the real crop
        torch.testing.assert_close(sb.clip[i, 0], null if dropped[i] else live[i])
    assert not torch.allclose(live[0], null)


def test_dd_branches_use_the_dropped_identity_convention(plus):
    cfg, parts, model, batch, sb, step = plus
    calls = []

    def ref(noisy, t, text, ids, added=None, clip_embeds=None):
        calls.append((ids.clone(), clip_embeds.clone()))
        return model(noisy, t, text, ids, added, clip_embeds=clip_embeds)

    c = dataclasses.replace(cfg, losses=dataclasses.replace(cfg.losses, lambda_dd=1.0, lambda_pd=0.0))
    out = compute_losses(model, sb, parts, c, step, ref=ref)
    assert len(calls) == 1
    ids, clip = calls[0]
    idx = torch.nonzero(sb.keep_both).flatten()
    m = len(idx)
    null = sb.clip_null[0, 0]
    torch.testing.assert_close(ids[:m], sb.id_embeds[idx])                  # p: identity only
    torch.testing.assert_close(clip[:m], sb.clip[idx])
    assert not ids[m:].any()                                                # g and 0: no identity ...
    for row in clip[m:]:
        torch.testing.assert_close(row[0], null)                            # ... = CLIP(zero pixels)
    # and the DD term equals losses.denoising_decouple_loss on independently computed branches
    with torch.no_grad():
        e = torch.zeros_like(sb.id_embeds[idx])
        nulls = sb.clip_null.expand(m, 1, -1, -1)
        p, _ = model(sb.noisy[idx], sb.timesteps[idx], sb.text_empty.expand(m, -1, -1), sb.id_embeds[idx],
                     clip_embeds=sb.clip[idx])
        g, _ = model(sb.noisy[idx], sb.timesteps[idx], sb.text[idx], e, clip_embeds=nulls)
        n, _ = model(sb.noisy[idx], sb.timesteps[idx], sb.text_empty.expand(m, -1, -1), e, clip_embeds=nulls)
        joint, _ = model(sb.noisy[idx], sb.timesteps[idx], sb.text[idx], sb.id_embeds[idx], clip_embeds=sb.clip[idx])
    dd, _ = losses.denoising_decouple_loss(joint.float(), p.float(), g.float(), n.float(), sb.noisy[idx],
                                           sb.timesteps[idx], parts.scheduler)
    torch.testing.assert_close(out["dd"].detach(), dd, rtol=1e-4, atol=1e-6)
    out["loss"].backward()
    assert model.encoder.perceiver_resampler.proj_in.weight.grad.abs().sum() > 0


def test_portrait_bank_draws_same_person(tmp_path):
    shards = write_shards(tmp_path / "shards", n_shards=2, per_shard=6, people=3)   # 4 photos per person
    bank = IdentityBank.from_shards(_info(shards).urls, "sface.npy", max_photos=3, progress=False)
    assert bank.stats() == {"people": 3, "photos": 12, "multi_photo_people": 3}
    ds = build_dataset(str(shards), resolution=64, shuffle_buffer=0, split_by_node=False, split_by_worker=False)
    batch = collate(list(ds)[:4])
    for k in (1, 3):
        x = bank.draw(batch["__key__"], batch["meta"], batch["face_embedding"], seed=0, step=5, k=k)
        assert x.shape == (4, k, 128)
        for i, meta in enumerate(batch["meta"]):
            torch.testing.assert_close(x[i, 0], batch["face_embedding"][i])        # own photo first
            keys, embs = bank.people[person_of(meta, batch["__key__"][i])]
            for j in range(1, k):                                                  # others: same person, not itself
                match = [kk for kk, e in zip(keys, embs) if torch.equal(e, x[i, j])]
                assert match and match[0] != batch["__key__"][i]
            if k == 3:
                assert not torch.equal(x[i, 1], x[i, 2])                            # without replacement (3 others)
    again = bank.draw(batch["__key__"], batch["meta"], batch["face_embedding"], seed=0, step=5, k=3)
    assert torch.equal(again, bank.draw(batch["__key__"], batch["meta"], batch["face_embedding"], 0, 5, k=3))
    counts = {draw_count(0, s, 3) for s in range(1, 60)}
    assert counts == {1, 2, 3}


def test_portrait_step_trains_with_n_photos(tiny_pipeline_dir, tmp_path):
    shards = write_shards(tmp_path / "shards", n_shards=1, per_shard=6, people=2)
    cfg = load_config(TrainConfig, "configs/tiny_faceid_portrait.yaml", [
        f"pretrained_model={tiny_pipeline_dir}", f"shards={shards}", "losses.lambda_dd=0.1"])
    parts = load_frozen_parts(cfg, CPU, torch.float32, with_clip=True)
    attach_family_parts(cfg, parts, _info(shards), CPU, torch.float32)
    model = build_model(cfg, parts)
    batch = collate(list(build_dataset(str(shards), resolution=64, shuffle_buffer=0, split_by_node=False,
                                       split_by_worker=False))[:4])
    seen = set()
    for step in range(1, 12):
        sb = prepare_batch(batch, parts, cfg, step, CPU, torch.float32)
        k = draw_count(cfg.seed, step, 3)
        assert sb.id_embeds.shape == (4, k, 128)
        if k in seen:
            continue
        seen.add(k)
        out = compute_losses(model, sb, parts, cfg, step)
        pred, tokens = model(sb.noisy, sb.timesteps, sb.text, sb.id_embeds)
        assert tokens.shape == (4, 16 * k, 32)                 # n photos x 16 tokens
        assert torch.isfinite(out["loss"])
    assert {1, 3} <= seen
