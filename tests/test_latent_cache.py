"""data.latent_cache_mb: the VAE posterior is encoded once per distinct image, the per-step draw is unchanged."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from accord_face.config import load_config
from accord_face.data import build_dataset, collate
from accord_face.train.config import TrainConfig
from accord_face.train.guard import config_changes
from accord_face.train.latent_cache import LatentCache
from accord_face.train.models import load_frozen_parts
from accord_face.train.step import prepare_batch

from shards_util import write_shards

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(tiny_pipeline_dir, tmp_path_factory):
    shards = write_shards(tmp_path_factory.mktemp("shards"), n_shards=1, per_shard=6)
    cfg = load_config(TrainConfig, "configs/tiny.yaml", [f"pretrained_model={tiny_pipeline_dir}", f"shards={shards}"])
    parts = load_frozen_parts(cfg, CPU, torch.float32, with_clip=True)
    ds = build_dataset(str(shards), resolution=64, shuffle_buffer=0, split_by_node=False, split_by_worker=False)
    return cfg, parts, collate(list(ds))


class CountingVAE(torch.nn.Module):
    """The real VAE, counting the images it encodes."""

    def __init__(self, vae):
        super().__init__()
        self.vae, self.encoded = vae, 0

    def encode(self, x):
        self.encoded += len(x)
        return self.vae.encode(x)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.vae, name)


def test_cached_steps_draw_the_same_latents_and_encode_each_image_once(setup):
    cfg, parts, batch = setup
    plain = [prepare_batch(batch, parts, cfg, step, CPU, torch.float32) for step in (1, 2, 3)]
    vae = CountingVAE(parts.vae)
    cached = dataclasses.replace(parts, vae=vae, latent_cache=LatentCache(64))
    got = [prepare_batch(batch, cached, cfg, step, CPU, torch.float32) for step in (1, 2, 3)]
    n = len(batch["__key__"])
    assert vae.encoded == n                                  # step 1 encodes, steps 2 and 3 reuse
    assert (cached.latent_cache.hits, cached.latent_cache.misses) == (2 * n, n)
    for a, b in zip(plain, got):
        torch.testing.assert_close(b.x0, a.x0, rtol=1e-5, atol=1e-6)   # same posterior, same per-step draw
        torch.testing.assert_close(b.noisy, a.noisy, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[0].x0, got[1].x0)          # the draw still changes from step to step
    assert "hits 12 of 18" in cached.latent_cache.summary()


def test_another_image_is_another_entry_and_the_bound_holds(setup):
    cfg, parts, batch = setup
    flipped = dict(batch, pixel_values=batch["pixel_values"].flip(-1))
    one = 2 * 4 * 8 * 8 * 4                                  # (mean, std) of a 4 x 8 x 8 fp32 latent
    small = LatentCache(2.5 * one / 2**20)                   # room for two images
    vae = CountingVAE(parts.vae)
    cached = dataclasses.replace(parts, vae=vae, latent_cache=small)
    a = prepare_batch(batch, cached, cfg, 1, CPU, torch.float32)
    b = prepare_batch(flipped, cached, cfg, 1, CPU, torch.float32)
    ref = prepare_batch(flipped, parts, cfg, 1, CPU, torch.float32)
    assert len(small.entries) == 2 and small.bytes == 2 * one
    torch.testing.assert_close(b.x0, ref.x0, rtol=1e-5, atol=1e-6)   # a flip is not served the unflipped entry
    assert not torch.allclose(a.x0, b.x0)
    prepare_batch(batch, cached, cfg, 2, CPU, torch.float32)        # past the bound: encoded again, still right
    assert vae.encoded == 3 * len(batch["__key__"]) - 2


def test_the_cache_size_is_checked_and_may_change_on_resume():
    with pytest.raises(ValueError, match="data.latent_cache_mb is -1.0; use 0"):
        load_config(TrainConfig, "configs/tiny.yaml", ["data.latent_cache_mb=-1"])
    assert config_changes({"data": {"latent_cache_mb": 0.0}}, {"data": {"latent_cache_mb": 256.0}}) == []
    assert config_changes({"data": {}}, {"data": {"latent_cache_mb": 256.0}}) == []      # a run from before it
    with pytest.raises(ValueError, match="must be > 0"):
        LatentCache(0)
