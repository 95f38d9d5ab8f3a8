"""accord_face.metrics: identity similarity on real photos, CLIP-T on a tiny CLIP, coupling diagnostics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from accord_face import metrics
from data_pipelines.embedded import load_portrait, rephotos
from test_pipeline_helpers import export_test_adapter, save_tiny_clip


# ----------------------------------------------------------------------------- identity


@pytest.fixture(scope="module")
def scorer():
    from accord_face.face import load_face_analyzer

    return metrics.IdentityScorer(load_face_analyzer("opencv-zoo"))


def test_identity_similarity_orders_real_photos(scorer):
    grace = load_portrait("grace_hopper")
    ref = scorer.reference([grace])
    # re-photos of the same portrait, plus a blurred, shrunken one
    same = [im for _, im in rephotos(grace)] + [grace.resize((256, 300)).filter(ImageFilter.GaussianBlur(1))]
    others = [load_portrait("eileen_collins"), load_portrait("cameraman").convert("RGB")]
    same_scores = [scorer.score(ref, im) for im in same]
    other_scores = [scorer.score(ref, im) for im in others]
    assert None not in same_scores + other_scores
    assert min(same_scores) > max(other_scores) + 0.3, (same_scores, other_scores)
    # and from the other side: Eileen's re-photos score higher against her own reference than against Grace's
    eileen_ref = scorer.reference([others[0]])
    for _, im in rephotos(others[0]):
        assert scorer.score(eileen_ref, im) > scorer.score(ref, im)


def test_identity_no_face_is_none_and_reference_is_normalised_mean(scorer):
    from skimage import data

    assert scorer.score(np.ones(128), Image.fromarray(data.coffee())) is None
    assert scorer.reference([Image.fromarray(data.coffee())]) is None
    grace = load_portrait("grace_hopper")
    mirrored = rephotos(grace)[0][1]
    e1, e2 = scorer.embed(grace), scorer.embed(mirrored)
    expected = e1 / np.linalg.norm(e1) + e2 / np.linalg.norm(e2)
    np.testing.assert_allclose(scorer.reference([grace, mirrored]), expected / np.linalg.norm(expected), atol=1e-6)
    assert metrics.cosine(np.array([1.0, 0.0]), np.array([3.0, 3.0])) == pytest.approx(2 ** -0.5)


# ----------------------------------------------------------------------------- CLIP-T


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def test_clip_t_matches_clip_forward_logits(clip_dir):
    from transformers import CLIPModel, CLIPTokenizer

    scorer = metrics.ClipTextScorer.from_pretrained(clip_dir)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)) for _ in range(3)]
    prompts = ["a photo of a person", "a red car on a street", "a dog in the snow"]
    scores = scorer.score(images, prompts)

    # Independent path: CLIPModel.forward's logits = logit_scale * cos(img, txt), on pixels prepared here.
    model = CLIPModel.from_pretrained(clip_dir).eval()
    tok = CLIPTokenizer.from_pretrained(clip_dir)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    pix = []
    for im in images:
        w, h = im.size
        s = 32 / min(w, h)
        im = im.resize((round(w * s), round(h * s)), Image.Resampling.BICUBIC)
        left, top = (im.width - 32) // 2, (im.height - 32) // 2
        arr = torch.from_numpy(np.asarray(im.crop((left, top, left + 32, top + 32)), np.float32) / 255).permute(2, 0, 1)
        pix.append((arr - mean) / std)
    ids = tok(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=torch.stack(pix))
        expected = 100 * out.logits_per_image.diagonal() / model.logit_scale.exp()
    np.testing.assert_allclose(scores, expected.numpy(), atol=0.05)
    assert all(-100 <= s <= 100 for s in scores)


def test_clip_tokenizer_of_wrong_size_is_refused(clip_dir):
    from transformers import CLIPModel, CLIPTokenizer

    from accord_face.tiny import tokenizer_vocab

    vocab, merges = tokenizer_vocab(words=("a", "photo"))
    small = CLIPTokenizer(vocab=vocab, merges=merges)
    with pytest.raises(ValueError, match="tokenizer .* has .* tokens but the model expects"):
        metrics.ClipTextScorer(CLIPModel.from_pretrained(clip_dir), small, None, name="x")


# ----------------------------------------------------------------------------- coupling diagnostics


@pytest.fixture(scope="module")
def ip_pipe(tiny_pipeline_dir, tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    adapter = export_test_adapter(tiny_pipeline_dir, tmp_path_factory.mktemp("ad") / "a", seed=1)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    pipe.load_ip_adapter(str(adapter), subfolder="", weight_name="ip_adapter.safetensors", image_encoder_folder=None)
    return pipe


def _inputs(pipe, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(b, 4, 8, 8, generator=g)
    ids = F.normalize(torch.randn(b, 128, generator=g), dim=-1)
    text, _ = pipe.encode_prompt(["a photo of a person on a beach", "a painting of a man"][:b], "cpu", 1, False)
    null, _ = pipe.encode_prompt([""], "cpu", 1, False)
    return latents, text, null, ids


def test_dependence_discrepancy_matches_epsilon_space_form(ip_pipe):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(ip_pipe.scheduler.config)
    latents, text, null, ids = _inputs(ip_pipe)
    ip_pipe.set_ip_adapter_scale(1.0)
    res = metrics.dependence_discrepancy(ip_pipe.unet, sched, latents, text, null, ids, num_timesteps=2, seed=7)
    assert res.timesteps == [250, 750]

    # Independent: four separate UNet calls, then DESIGN.md's epsilon-space form
    #   Delta_t = w_t [||e_pg-e_p||^2 + ||e_pg-e_g||^2 - ||e_pg-e_0||^2]
    #   w_t = beta_t^2 / (2 sigma_t^2 alpha_t (1-abar_t))
    T = 1000
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(7))
    acp, betas = sched.alphas_cumprod.double(), sched.betas.double()
    total = torch.zeros(2, dtype=torch.float64)
    for t in res.timesteps:
        tb = torch.full((2,), t)
        x_t = sched.add_noise(latents, noise, tb)
        zero = torch.zeros_like(ids)
        with torch.no_grad():
            eps = {k: ip_pipe.unet(x_t, tb, encoder_hidden_states=c,
                                   added_cond_kwargs={"image_embeds": [i[:, None]]}).sample.double()
                   for k, c, i in [("pg", text, ids), ("p", null.expand(2, -1, -1), ids), ("g", text, zero),
                                   ("0", null.expand(2, -1, -1), zero)]}
        beta, abar, abar_prev = betas[t], acp[t], acp[t - 1]
        sigma2 = beta * (1 - abar_prev) / (1 - abar)
        w = beta ** 2 / (2 * sigma2 * (1 - beta) * (1 - abar))
        sq = lambda a, b: (eps[a] - eps[b]).pow(2).flatten(1).sum(1)  # noqa: E731
        delta = w * (sq("pg", "p") + sq("pg", "g") - sq("pg", "0"))
        total += (t + 1) / T * delta.abs()
        assert res.abs_delta_by_t[t] == pytest.approx(float(delta.abs().mean()), rel=2e-3)
    assert res.discrepancy == pytest.approx(float((total * T / 2).mean()), rel=2e-3)
    assert res.discrepancy > 0


def test_dependence_discrepancy_vanishes_without_identity_branch(ip_pipe):
    # scale 0: U_pg = U_g and U_p = U_0, so Delta_t = (||U_g-U_0||^2 + 0 - ||U_g-U_0||^2) / 2 sigma^2 = 0
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(ip_pipe.scheduler.config)
    latents, text, null, ids = _inputs(ip_pipe, seed=3)
    ip_pipe.set_ip_adapter_scale(0.0)
    try:
        res = metrics.dependence_discrepancy(ip_pipe.unet, sched, latents, text, null, ids, num_timesteps=2)
    finally:
        ip_pipe.set_ip_adapter_scale(1.0)
    assert abs(res.discrepancy) < 1e-6 and all(abs(v) < 1e-6 for v in res.delta_by_quartile.values())


def test_prior_cosine_gap_matches_manual_cosines(tiny_pipeline_dir):
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    from accord_face.tiny import projection_model_path

    path = projection_model_path(tiny_pipeline_dir)
    model, tok = CLIPTextModelWithProjection.from_pretrained(path).eval(), CLIPTokenizer.from_pretrained(path)
    tokens = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(0))  # (B, K, E)
    caps = ["a photo of a man on a beach", "a watercolor painting"]
    with torch.no_grad():
        gap = metrics.prior_cosine_gap(tokens, model, tok, caps, "a photo of a person")
        ids = tok(["a photo of a person", *caps], padding="max_length", max_length=77, return_tensors="pt").input_ids
        f = model(ids).text_embeds
        f_p = tokens.mean(1) @ model.text_projection.weight.T
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    gaps = [cos(f_p[i], f[1 + j]) - cos(f[0], f[1 + j]) for i in range(3) for j in range(2)]
    assert gap["abs_gap"] == pytest.approx(np.mean(np.abs(gaps)), abs=1e-5)
    assert gap["signed_gap"] == pytest.approx(np.mean(gaps), abs=1e-5)
    with pytest.raises(ValueError, match="width 16"):
        metrics.prior_cosine_gap(tokens[..., :16], model, tok, caps)


def test_diagnostic_timesteps_grid():
    assert metrics.diagnostic_timesteps(1000, 4).tolist() == [125, 375, 625, 875]
    assert metrics.mean_or_nan([None, 1.0, 3.0]) == 2.0 and np.isnan(metrics.mean_or_nan([None]))
