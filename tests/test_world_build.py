"""The world build reuses the committed assets: seeding the cache from them, continuing the base UNet."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "accord_face" / "world" / "assets"


@pytest.fixture()
def assets_copy(tmp_path, monkeypatch):
    """A private copy of the committed assets (the assets stage writes where it reads)."""
    copy = tmp_path / "assets"
    shutil.copytree(ASSETS, copy)
    monkeypatch.setenv("ACCORD_FACE_WORLD_ASSETS", str(copy))
    return copy


def _cfg(tmp_path, *overrides):
    from accord_face.config import load_config
    from accord_face.world.config import WorldConfig

    return load_config(WorldConfig, None, [f"cache_dir={tmp_path / 'cache'}", *overrides])


def test_seeding_fills_every_matching_stage_and_the_assets_stage_writes_them_back_bit_for_bit(tmp_path,
                                                                                               assets_copy):
    from accord_face.world.build import stage_done
    from accord_face.world.stages import SEEDABLE, run_assets, seed_from_assets

    cfg = _cfg(tmp_path)
    assert seed_from_assets(cfg) == list(SEEDABLE)
    assert all(stage_done(cfg, s) for s in SEEDABLE)
    assert seed_from_assets(cfg) == []            # already cached: nothing to do
    run_assets(cfg)
    for name in ("clip.safetensors", "vae.safetensors", "unet.safetensors", "judge.safetensors",
                 "detector.onnx", "recognizer_a.onnx", "recognizer_b.onnx"):
        assert (assets_copy / name).read_bytes() == (ASSETS / name).read_bytes(), name
    before, after = (json.loads((p / "world.json").read_text()) for p in (ASSETS, assets_copy))
    assert after["metrics"] == before["metrics"] and after["vae_scaling_factor"] == before["vae_scaling_factor"]
    assert {k: {f: v for f, v in sec.items() if f != "continue_from"} for k, sec in after["config"].items()} \
        == before["config"]
    assert "use_assets=false" in after["rebuild"]


def test_seeding_leaves_out_a_changed_stage_and_the_stages_that_depend_on_it(tmp_path, assets_copy):
    from accord_face.world.stages import seed_from_assets

    seeded = seed_from_assets(_cfg(tmp_path, "vae.steps=7"))
    assert "vae" not in seeded and "unet" not in seeded          # the UNet is trained on the VAE's latents
    assert {"clip", "detector", "recognizer_a", "recognizer_b", "judge"} <= set(seeded)


def test_continue_from_assets_refuses_what_the_committed_unet_was_not_trained_for(tmp_path, assets_copy):
    from accord_face.config import ConfigError
    from accord_face.world.stages import committed_unet

    with pytest.raises(ConfigError, match="must exceed the committed UNet's 1800 steps"):
        committed_unet(_cfg(tmp_path, "unet.continue_from=assets", "unet.steps=1800"), 96)
    with pytest.raises(ConfigError, match="another vae config"):
        committed_unet(_cfg(tmp_path, "unet.continue_from=assets", "unet.steps=2000", "vae.steps=7"), 96)
    with pytest.raises(ConfigError, match="unet.channels"):
        committed_unet(_cfg(tmp_path, "unet.continue_from=assets", "unet.steps=2000", "unet.channels=[32,64,64]"), 96)
    with pytest.raises(ConfigError, match="continue_from must be '' or 'assets' or a world assets folder"):
        _cfg(tmp_path, "unet.continue_from=checkpoint")
    # a folder of world assets (as the assets stage writes them) is continued from its own record, not the
    # committed one: here a copy whose record says 1850 steps
    other = tmp_path / "assets-unet1850"
    shutil.copytree(assets_copy, other)
    rec = json.loads((other / "world.json").read_text())
    rec["config"]["unet"]["steps"] = 1850
    (other / "world.json").write_text(json.dumps(rec))
    with pytest.raises(ConfigError, match="must exceed the UNet's 1850 steps"):
        committed_unet(_cfg(tmp_path, f"unet.continue_from={other}", "unet.steps=1850"), 96)
    state, done = committed_unet(_cfg(tmp_path, f"unet.continue_from={other}", "unet.steps=1900"), 96)
    assert done == 1850 and state


def test_a_continued_unet_starts_from_the_committed_weights_not_from_random_ones(tmp_path, assets_copy):
    """Two steps from the committed UNet stay next to it (EMA and warm-up); two steps from random weights do not:
    the continuation really starts where the committed model ended."""
    import dataclasses

    from accord_face.world.assemble import build_parts
    from accord_face.world.pool import render_pool
    from accord_face.world.stages import committed_unet
    from accord_face.world.unet import train_unet

    cfg = _cfg(tmp_path, "unet.continue_from=assets", "unet.steps=1802", "unet.batch_size=2")
    parts = build_parts(assets_copy)
    pool = render_pool(range(3), 2, 0, progress=False)
    state, start = committed_unet(cfg, 96)
    assert start == 1800

    def distance(unet) -> float:
        return max(float((unet.state_dict()[k] - v).abs().max()) for k, v in state.items())

    torch.set_num_threads(1)
    kw = dict(pool=pool, vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
              progress=False)
    continued = train_unet(cfg.unet, work=tmp_path / "w1", init=(state, start), **kw)
    scratch = train_unet(dataclasses.replace(cfg.unet, steps=2), work=tmp_path / "w2", **kw)
    assert distance(continued) < 1e-3 < distance(scratch)
    assert not (tmp_path / "w1" / "unet_ckpt.pt").exists()     # a finished stage leaves no checkpoint


def test_world_evaluate_refuses_an_unknown_sampler_in_one_line_with_exit_2(tmp_path, capsys):
    from accord_face.world.__main__ import main

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--adapter", str(adapter), "--scheduler", "heun", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("world evaluate: error: --scheduler 'heun'") and "ddim" in err[-1]
