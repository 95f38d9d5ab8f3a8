"""uint8 pixels from the loader (4x less worker IPC) give the trainer the same latents as float pixels."""

from __future__ import annotations

import torch

from accord_face.config import load_config
from accord_face.data import build_dataset, collate, load_image, pixels_to_unit_range
from accord_face.train.config import TrainConfig
from accord_face.train.models import load_frozen_parts
from accord_face.train.step import prepare_batch

from shards_util import write_shards


def test_uint8_pixels_convert_to_the_float_pixels_bit_for_bit(tmp_path):
    shards = write_shards(tmp_path / "shards", n_shards=1, per_shard=3, size=80)  # 80 px: resized to 64
    kw = dict(resolution=64, shuffle_buffer=0, split_by_node=False, split_by_worker=False, random_flip=True)
    f32 = list(build_dataset(str(shards), **kw))
    u8 = list(build_dataset(str(shards), pixels_uint8=True, **kw))
    assert [s["__key__"] for s in f32] == [s["__key__"] for s in u8]
    for a, b in zip(f32, u8):
        assert a["pixel_values"].dtype == torch.float32 and b["pixel_values"].dtype == torch.uint8
        assert b["pixel_values"].shape == (3, 64, 64)
        assert torch.equal(pixels_to_unit_range(b["pixel_values"]), a["pixel_values"])
    # the independent formula, on a real JPEG decode
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)).save(buf, format="PNG")
    raw = torch.from_numpy(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).copy())
    expect = raw.permute(2, 0, 1).double() * (2 / 255) - 1
    torch.testing.assert_close(load_image(buf.getvalue(), 64).double(), expect, rtol=0, atol=1e-6)
    assert torch.equal(load_image(buf.getvalue(), 64, as_uint8=True), raw.permute(2, 0, 1))


def test_prepare_batch_gives_the_same_latents_from_uint8(tiny_pipeline_dir, tmp_path):
    shards = write_shards(tmp_path / "shards", n_shards=1, per_shard=2)
    cfg = load_config(TrainConfig, "configs/tiny.yaml", [f"pretrained_model={tiny_pipeline_dir}", f"shards={shards}"])
    parts = load_frozen_parts(cfg, torch.device("cpu"), torch.float32, with_clip=False)
    kw = dict(resolution=64, shuffle_buffer=0, split_by_node=False, split_by_worker=False)
    f32 = collate(list(build_dataset(str(shards), **kw)))
    u8 = collate(list(build_dataset(str(shards), pixels_uint8=True, **kw)))
    assert u8["pixel_values"].dtype == torch.uint8
    a = prepare_batch(f32, parts, cfg, 3, torch.device("cpu"), torch.float32)
    b = prepare_batch(u8, parts, cfg, 3, torch.device("cpu"), torch.float32)
    assert torch.equal(a.x0, b.x0) and torch.equal(a.noisy, b.noisy)
