"""FaceID-Plus / Plus-V2: diffusers' exact layout, export -> stock ``load_ip_adapter`` round trips (SD1.5, SDXL tiny)."""

import numpy as np
import pytest
import torch

from accord_face import adapter
from accord_face.encoder import FaceIDPlusProjection, build_encoder
from accord_face.family.clip_image import (aligned_face_crop, landmarks_in_stored_image, load_image_encoder)
from accord_face.face import ARCFACE_TEMPLATE
from accord_face.train.models import IdentityAdapterModel


def _perturb(module: torch.nn.Module, scale: float = 0.1) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def test_plus_state_dict_is_the_reference_layout():
    enc = FaceIDPlusProjection(id_dim=128, cross_attention_dim=768, clip_dim=1280)
    keys = set(enc.state_dict())
    # ProjPlusModel / FacePerceiverResampler keys of the reference repository (what diffusers converts).
    for k in ["proj.0.weight", "proj.2.bias", "norm.weight", "perceiver_resampler.proj_in.weight",
              "perceiver_resampler.proj_out.weight", "perceiver_resampler.norm_out.bias",
              "perceiver_resampler.layers.3.0.to_kv.weight", "perceiver_resampler.layers.0.0.norm1.weight",
              "perceiver_resampler.layers.0.1.1.weight", "perceiver_resampler.layers.0.1.3.weight"]:
        assert k in keys, k
    assert enc.state_dict()["perceiver_resampler.layers.0.0.to_q.weight"].shape == (768, 768)   # 12 heads x 64
    assert enc.state_dict()["proj.0.weight"].shape == (256, 128)                              # MLP ratio 2
    with pytest.raises(ValueError, match="4 identity tokens"):
        FaceIDPlusProjection(num_tokens=16)


@pytest.mark.parametrize("shortcut", [False, True])
def test_plus_matches_diffusers_layer_after_conversion(tiny_pipeline_dir, shortcut):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")
    enc = build_encoder("faceid_plusv2" if shortcut else "faceid_plus", id_dim=128, cross_attention_dim=32,
                        num_tokens=4, clip_dim=48, s_scale=0.6)
    _perturb(enc)
    layer = unet._convert_ip_adapter_image_proj_to_diffusers(enc.state_dict(), low_cpu_mem_usage=False)
    assert type(layer).__name__ == "IPAdapterFaceIDPlusImageProjection"
    ids, clip = torch.randn(3, 128), torch.randn(3, 1, 17, 48)
    layer.clip_embeds, layer.shortcut, layer.shortcut_scale = clip, shortcut, 0.6
    with torch.no_grad():
        torch.testing.assert_close(enc(ids, clip), layer(ids), rtol=1e-5, atol=1e-5)
        if shortcut:   # V2 = FaceID tokens + s_scale * resampler: the shortcut term is really there
            x = enc.norm(enc.proj(ids).reshape(-1, 4, 32))
            enc.shortcut = False
            torch.testing.assert_close(enc(ids, clip) * 0.6 + x, layer(ids), rtol=1e-5, atol=1e-5)


def test_landmarks_mapped_into_the_stored_crop():
    # A face whose landmarks are an exact similarity image of the ArcFace template in the stored 100 px jpg,
    # recorded (as prepare_shards does) in original pixels of a 200 px crop box at (50, 60).
    stored = ARCFACE_TEMPLATE * 0.5 + np.array([20.0, 15.0])
    meta = {"landmarks": (stored * 2 + np.array([50.0, 60.0])).tolist(), "crop_box": [50, 60, 250, 260]}
    lm = landmarks_in_stored_image(meta, (100, 100))
    np.testing.assert_allclose(lm, stored, atol=1e-9)
    img = np.zeros((100, 100, 3), np.uint8)
    for x, y in stored:
        img[int(round(y)) - 1:int(round(y)) + 2, int(round(x)) - 1:int(round(x)) + 2] = 255
    crop = aligned_face_crop(img, lm, 224)                   # dots land on the 224 px template
    for x, y in ARCFACE_TEMPLATE * 2:
        assert crop[int(round(y)), int(round(x))].max() > 100, (x, y)
    assert crop.mean() < 20                                  # and nowhere else much
    with pytest.raises(KeyError, match="landmarks"):
        landmarks_in_stored_image({}, (100, 100))


def _roundtrip(base_dir: str, sdxl: bool, kind: str, tmp_path) -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    image_encoder = load_image_encoder("embedded:clip-vision")
    unet = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet").eval()
    cad = unet.config.cross_attention_dim
    enc = build_encoder(kind, id_dim=128, cross_attention_dim=cad, num_tokens=4, clip_dim=image_encoder.hidden_size,
                        s_scale=0.7)
    model = IdentityAdapterModel(unet, enc, num_tokens=4).eval()
    _perturb(enc, 0.05)
    for proc in adapter.ip_attention_processors(unet).values():
        _perturb(proc, 0.1)
    out = adapter.export_adapter(tmp_path / "adapter", enc, unet, {"base_model": base_dir, "encoder": kind})

    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    pipe = cls.from_pretrained(base_dir, **({} if sdxl else {"safety_checker": None}))
    pipe.load_ip_adapter(str(out), subfolder="", weight_name=adapter.WEIGHT_NAME, image_encoder_folder=None)

    b = 2
    crops = torch.randint(0, 256, (b, 3, image_encoder.image_size, image_encoder.image_size), dtype=torch.uint8)
    clip = image_encoder(crops)[:, None]                                     # (B, 1, L, H)
    ident = torch.nn.functional.normalize(torch.randn(b, 128), dim=-1)
    x, t = torch.randn(b, 4, 8, 8), torch.tensor([10, 700])
    text = torch.randn(b, 77, cad)
    added = {"text_embeds": torch.randn(b, 32), "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * b).float()} \
        if sdxl else None
    with torch.no_grad():
        ours, _ = model(x, t, text, ident, added, clip_embeds=clip)
        adapter.set_faceid_plus_inputs(pipe.unet, clip, shortcut=kind == "faceid_plusv2", s_scale=0.7)
        theirs = pipe.unet(x, t, encoder_hidden_states=text, added_cond_kwargs={
            **(added or {}), "image_embeds": adapter.per_sample_image_embeds(ident)}).sample
        adapter.set_faceid_plus_inputs(pipe.unet, torch.zeros_like(clip), shortcut=kind == "faceid_plusv2", s_scale=0.7)
        other = pipe.unet(x, t, encoder_hidden_states=text, added_cond_kwargs={
            **(added or {}), "image_embeds": adapter.per_sample_image_embeds(ident)}).sample
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert (other - theirs).abs().max() > 1e-5        # the CLIP face states do reach the output

    # A CFG pipeline call: negative = zero embedding + CLIP(zero pixels), 2 prompts x 1 image.
    null = image_encoder.null_embeds()
    adapter.set_faceid_plus_inputs(pipe.unet, adapter.faceid_plus_clip_embeds(clip[0], null, batch=2),
                                   shortcut=kind == "faceid_plusv2", s_scale=0.7)
    images = pipe(["a photo of a person"] * 2, num_inference_steps=2, output_type="np", guidance_scale=5.0,
                  ip_adapter_image_embeds=adapter.identity_image_embeds(ident[0]),
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 64, 64, 3) and np.isfinite(images).all()


@pytest.mark.parametrize("kind", ["faceid_plus", "faceid_plusv2"])
def test_plus_roundtrip_sd15(tiny_pipeline_dir, tmp_path, kind):
    _roundtrip(tiny_pipeline_dir, False, kind, tmp_path)


def test_plusv2_roundtrip_sdxl(tmp_path):
    from accord_face.tiny import save_sdxl_pipeline

    base = str(save_sdxl_pipeline(tmp_path / "sdxl"))
    _roundtrip(base, True, "faceid_plusv2", tmp_path)


def test_clip_embeds_cfg_layout():
    clip, null = torch.randn(3, 5, 8), torch.randn(1, 5, 8)
    x = adapter.faceid_plus_clip_embeds(clip, null, batch=2)
    assert x.shape == (4, 3, 5, 8)
    torch.testing.assert_close(x[0, 1], null[0])
    torch.testing.assert_close(x[3], clip)
    with pytest.raises(ValueError, match="n, L, H"):
        adapter.faceid_plus_clip_embeds(clip[0], null, batch=1)


def test_image_encoder_null_is_zero_pixels():
    enc = load_image_encoder("embedded:clip-vision")
    zeros = torch.zeros(1, 3, enc.image_size, enc.image_size)
    torch.testing.assert_close(enc.null_embeds(), enc.model(zeros, output_hidden_states=True).hidden_states[-2])
    # normalise() of a mean-grey uint8 image is ~0, i.e. the null crop is the mean colour, not black
    grey = torch.tensor([round(m * 255) for m in (0.48145466, 0.4578275, 0.40821073)]).view(1, 3, 1, 1)
    assert enc.normalise(grey.expand(1, 3, 4, 4)).abs().max() < 0.01
    with pytest.raises(FileNotFoundError, match="image_encoder_path"):
        load_image_encoder("/nonexistent/clip")
