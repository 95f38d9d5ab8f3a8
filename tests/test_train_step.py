"""The trainer's loss assembly against independent computations (in process, no DeepSpeed)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from accord_face import adapter, losses
from accord_face.config import load_config
from accord_face.data import build_dataset, collate
from accord_face.train.config import TrainConfig
from accord_face.train.models import build_model, clip_text_features, encode_text, load_frozen_parts, reference_fn
from accord_face.train.step import compute_losses, prepare_batch, sample_generator

from shards_util import write_shards


@pytest.fixture(scope="module")
def setup(tiny_pipeline_dir, tmp_path_factory):
    shards = write_shards(tmp_path_factory.mktemp("shards"), n_shards=1, per_shard=8)
    cfg = load_config(TrainConfig, "configs/tiny.yaml", [f"pretrained_model={tiny_pipeline_dir}", f"shards={shards}",
                                                        "dropout.identity=0.2", "dropout.caption=0.2", "dropout.both=0.2"])
    parts = load_frozen_parts(cfg, torch.device("cpu"), torch.float32, with_clip=True)
    model = build_model(cfg, parts)
    # Move the IP weights away from their to_k/to_v copies so identity tokens matter.
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    ds = build_dataset(str(shards), resolution=64, shuffle_buffer=0, split_by_node=False, split_by_worker=False)
    batch = collate(list(ds))
    # Pick a step whose draws contain both kept samples and every kind of dropout.
    for step in range(1, 200):
        sb = prepare_batch(batch, parts, cfg, step, torch.device("cpu"), torch.float32)
        if 2 <= int(sb.keep_both.sum()) <= 5 and bool((sb.id_embeds == 0).all(1).any()):
            break
    return cfg, parts, model, batch, sb, step


def _with_losses(cfg, **kw):
    return dataclasses.replace(cfg, losses=dataclasses.replace(cfg.losses, **kw))


def test_dropout_follows_the_per_sample_draws(setup):
    cfg, parts, model, batch, sb, step = setup
    d = cfg.dropout
    for i, key in enumerate(sb.keys):
        g = sample_generator(cfg.seed, step, key)  # draw order: VAE posterior noise, noise, t, dropout u
        torch.randn(sb.x0.shape[1:], generator=g)
        noise = torch.randn(sb.x0.shape[1:], generator=g)
        t = torch.randint(0, 1000, (), generator=g)
        u = float(torch.rand((), generator=g))
        torch.testing.assert_close(sb.noise[i], noise)
        assert int(sb.timesteps[i]) == int(t)
        drop_id = u < d.identity or d.identity + d.caption <= u < d.identity + d.caption + d.both
        drop_cap = d.identity <= u < d.identity + d.caption + d.both
        assert bool((sb.id_embeds[i] == 0).all()) == drop_id
        expect = "" if drop_cap else batch["caption"][i]
        torch.testing.assert_close(sb.text[i], encode_text(parts, [expect], torch.device("cpu"))[0][0])
        assert bool(sb.keep_both[i]) == (not drop_id and not drop_cap)


def test_zero_lambdas_reproduce_plain_ip_adapter_loss(setup):
    cfg, parts, model, batch, sb, step = setup
    out = compute_losses(model, sb, parts, _with_losses(cfg, lambda_dd=0.0, lambda_pd=0.0), step)
    # Plain IP-Adapter: epsilon MSE of the UNet with the identity tokens in the decoupled attention.
    pred = model.unet(sb.noisy, sb.timesteps, encoder_hidden_states=(sb.text, [model.encoder(sb.id_embeds)])).sample
    plain = F.mse_loss(pred.float(), sb.noise.float())
    assert torch.equal(out["loss"], plain)
    assert float(out["dd"]) == 0.0 and float(out["pd"]) == 0.0
    g1 = torch.autograd.grad(out["loss"], model.encoder.proj[0].weight)[0]
    pred = model.unet(sb.noisy, sb.timesteps, encoder_hidden_states=(sb.text, [model.encoder(sb.id_embeds)])).sample
    g2 = torch.autograd.grad(F.mse_loss(pred.float(), sb.noise.float()), model.encoder.proj[0].weight)[0]
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)


def test_dd_term_equals_losses_on_independent_predictions(setup):
    cfg, parts, model, batch, sb, step = setup
    c = _with_losses(cfg, lambda_dd=0.3, lambda_pd=0.0, dd_batch_fraction=1.0)
    out = compute_losses(model, sb, parts, c, step)
    keep = torch.nonzero(sb.keep_both).flatten()
    x, t, ids = sb.noisy[keep], sb.timesteps[keep], sb.id_embeds[keep]
    empty = encode_text(parts, [""] * len(keep), torch.device("cpu"))[0]
    caps = encode_text(parts, [batch["caption"][i] for i in keep.tolist()], torch.device("cpu"))[0]
    with torch.no_grad():
        run = lambda text, idv: model.unet(x, t, encoder_hidden_states=(text, [model.encoder(idv)])).sample
        joint, p, g, n = run(caps, ids), run(empty, ids), run(caps, torch.zeros_like(ids)), \
            run(empty, torch.zeros_like(ids))
    dd, delta = losses.denoising_decouple_loss(joint, p, g, n, x, t, parts.scheduler)
    torch.testing.assert_close(out["dd"].detach(), dd, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out["delta"], delta, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out["loss"].detach(), out["mse"].detach() + 0.3 * dd, rtol=1e-5, atol=1e-7)
    # dd_batch_fraction bounds the subset: ceil(0.25 * 8) = 2 samples.
    half = compute_losses(model, sb, parts, _with_losses(c, dd_batch_fraction=0.25), step)
    assert len(half["delta"]) == min(2, len(keep))


def test_pd_term_uses_text_projection_of_mean_identity_tokens(setup):
    cfg, parts, model, batch, sb, step = setup
    out = compute_losses(model, sb, parts, _with_losses(cfg, lambda_dd=0.0, lambda_pd=1.0), step)
    keep = torch.nonzero(sb.keep_both).flatten()
    with torch.no_grad():
        f_p = parts.clip.text_projection(model.encoder(sb.id_embeds[keep]).mean(dim=1))
    f_s = clip_text_features(parts, [cfg.losses.superclass_prompt], torch.device("cpu"))[0]
    f_g = clip_text_features(parts, [batch["caption"][i] for i in keep.tolist()], torch.device("cpu"))
    cos = lambda a, b: (a * b).sum(-1) / a.norm(dim=-1) / b.norm(dim=-1)
    expect = (cos(f_p, f_g) - cos(f_s[None], f_g)).abs().mean()
    torch.testing.assert_close(out["pd"].detach(), expect, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(out["loss"], model.encoder.norm.weight)
    assert grad.abs().sum() > 0  # PDLoss reaches the identity encoder


@pytest.mark.parametrize("strategy", ["stratified", "k_per_sample"])
def test_other_dd_timestep_strategies(setup, strategy):
    cfg, parts, model, batch, sb, step = setup
    c = _with_losses(cfg, lambda_dd=0.1, lambda_pd=0.0, dd_timesteps=strategy, dd_k=3)
    out = compute_losses(model, sb, parts, c, step)
    m = int(sb.keep_both.sum()) * (3 if strategy == "k_per_sample" else 1)
    t = out["dd_timesteps"]
    assert len(t) == m and torch.isfinite(out["loss"])
    strata = (t * m) // 1000
    assert strata.tolist() == list(range(m))  # one draw per stratum of [0, T)


def test_frozen_initial_reference_keeps_the_starting_weights(setup):
    cfg, parts, model, batch, sb, step = setup
    initial = model.trainable_state()
    ref = reference_fn(model, initial)
    args = (sb.noisy[:2], sb.timesteps[:2], sb.text[:2], sb.id_embeds[:2])
    with torch.no_grad():
        torch.testing.assert_close(ref(*args)[0], model(*args)[0])
        saved = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
        for p in model.trainable_parameters():
            p.add_(0.1)
        moved, frozen = model(*args)[0], ref(*args)[0]
        for n, p in model.named_parameters():
            if n in saved:
                p.copy_(saved[n])
        before = model(*args)[0]
    torch.testing.assert_close(frozen, before)
    assert (moved - frozen).abs().max() > 1e-4


def test_export_from_training_wrapper_matches_stock_pipeline(setup, tmp_path, tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    cfg, parts, model, batch, sb, step = setup
    folder = adapter.export_adapter(tmp_path / "adapter", model.encoder, model.unet, {"num_tokens": 4})
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name=adapter.WEIGHT_NAME, image_encoder_folder=None)
    with torch.no_grad():
        ours, _ = model(sb.noisy, sb.timesteps, sb.text, sb.id_embeds)
        embeds = adapter.per_sample_image_embeds(sb.id_embeds)
        theirs = pipe.unet(sb.noisy, sb.timesteps, encoder_hidden_states=sb.text,
                           added_cond_kwargs={"image_embeds": embeds}).sample
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_validation_sampler_matches_stock_pipeline_with_exported_adapter(setup, tmp_path, tiny_pipeline_dir):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from accord_face.train.validation import sample_images

    cfg, parts, model, batch, sb, step = setup
    ids = batch["face_embedding"][1].repeat(2, 1)  # a pipeline call takes one identity for all its prompts
    prompts = ["a photo of a person", "a woman wearing a red hat"]
    ours = sample_images(model, parts, prompts, ids, 0.7, 3, 4.0, 64, 5, torch.device("cpu"))
    adapter.set_ip_scale(model.unet, 1.0)

    folder = adapter.export_adapter(tmp_path / "adapter", model.encoder, model.unet, {"num_tokens": 4})
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name=adapter.WEIGHT_NAME, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(0.7)
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    theirs = pipe(prompts, num_inference_steps=3, guidance_scale=4.0, latents=latents, output_type="np",
                  ip_adapter_image_embeds=adapter.identity_image_embeds(ids[0])).images
    assert abs(ours.astype(float) / 255 - theirs).max() <= 1.5 / 255
