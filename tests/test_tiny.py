"""The embedded default pipeline: builds offline, saves, reloads, generates."""

import json

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from accord_face import tiny


def test_tokenizer_vocab_survives_save_and_offline_reload(tiny_pipeline_dir):
    vocab, merges = tiny.tokenizer_vocab()
    tok = CLIPTokenizer.from_pretrained(tiny_pipeline_dir, subfolder="tokenizer", local_files_only=True)
    # An offline load can silently return a near-empty tokenizer; check the size we wrote.
    assert len(tok) == len(vocab) > 512
    ids = tok("a photo of sks person").input_ids
    assert ids[0] == vocab["<|startoftext|>"] and ids[-1] == vocab["<|endoftext|>"]
    assert ids[1:-1] == [vocab[w + "</w>"] for w in ["a", "photo", "of", "sks", "person"]]
    # Words outside the list still tokenize (byte fallback) and decode back.
    assert tok.decode(tok("zebra crossing").input_ids, skip_special_tokens=True) == "zebra crossing"


def test_pipeline_reloads_offline_and_generates(tiny_pipeline_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    images = [pipe("a photo of a person", num_inference_steps=2, output_type="np",
                   generator=torch.Generator().manual_seed(7)).images for _ in range(2)]
    assert images[0].shape == (1, 64, 64, 3) and np.isfinite(images[0]).all()
    np.testing.assert_array_equal(images[0], images[1])


def test_projection_model_shares_the_text_tower(tiny_pipeline_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    proj_path = tiny.projection_model_path(tiny_pipeline_dir)
    clip = CLIPTextModelWithProjection.from_pretrained(proj_path, local_files_only=True)
    ids = pipe.tokenizer(["a photo of a person"], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(clip(ids).last_hidden_state, pipe.text_encoder(ids).last_hidden_state)
    assert clip.config.projection_dim == pipe.unet.config.cross_attention_dim


def test_build_is_deterministic_in_seed():
    a, b, c = (tiny.build_components("tiny", seed=s) for s in (3, 3, 4))
    for name in ("unet", "vae", "text_encoder"):
        sa, sb, sc = (m[name].state_dict() for m in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())


def test_resolve_pretrained_caches_and_passes_through(tmp_path):
    path = tiny.resolve_pretrained("embedded:tiny:5", root=tmp_path)
    marker = json.loads((tmp_path / "embedded-tiny-seed5" / tiny.MARKER).read_text())
    assert path == str(tmp_path / "embedded-tiny-seed5") and marker["seed"] == 5
    mtime = (tmp_path / "embedded-tiny-seed5" / "unet" / "config.json").stat().st_mtime
    assert tiny.resolve_pretrained("embedded:tiny:5", root=tmp_path) == path
    assert (tmp_path / "embedded-tiny-seed5" / "unet" / "config.json").stat().st_mtime == mtime
    assert tiny.resolve_pretrained("runwayml/stable-diffusion-v1-5") == "runwayml/stable-diffusion-v1-5"
    assert not list(tmp_path.glob(".embedded-*"))  # no temporary build folder left behind


def test_sd15_spec_has_sd15_shapes():
    spec = tiny.SIZES["sd15"]
    assert spec.unet_channels == (320, 640, 1280, 1280) and spec.text_hidden == 768 and spec.latent_size == 64
