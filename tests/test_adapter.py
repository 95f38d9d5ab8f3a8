"""Encoder + decoupled attention: export round trip through stock diffusers ``load_ip_adapter``."""

import json

import pytest
import torch

from accord_face import adapter
from accord_face.encoder import FaceIDProjection


def test_faceid_projection_matches_diffusers_module():
    from diffusers.models.embeddings import IPAdapterFaceIDImageProjection

    enc = FaceIDProjection(id_dim=128, cross_attention_dim=32, num_tokens=4)
    assert sorted(enc.state_dict()) == ["norm.bias", "norm.weight", "proj.0.bias", "proj.0.weight",
                                        "proj.2.bias", "proj.2.weight"]
    ref = IPAdapterFaceIDImageProjection(image_embed_dim=128, cross_attention_dim=32, mult=1024 // 128, num_tokens=4)
    mapping = {"proj.0": "ff.net.0.proj", "proj.2": "ff.net.2"}
    sd = {}
    for k, v in enc.state_dict().items():
        for a, b in mapping.items():
            k = k.replace(a, b)
        sd[k] = v
    ref.load_state_dict(sd)
    x = torch.randn(3, 128)
    torch.testing.assert_close(enc(x), ref(x))
    assert enc(x).shape == (3, 4, 32)
    with pytest.raises(ValueError, match="multiple"):
        FaceIDProjection(id_dim=100, cross_attention_dim=32)


def test_install_copies_text_projections(tiny_pipeline_dir):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")
    procs = adapter.install_ip_attention(unet, num_tokens=4)
    assert procs and all(name.endswith("attn2.processor") for name in procs)
    for name, proc in procs.items():
        attn = unet.get_submodule(name.removesuffix(".processor"))
        torch.testing.assert_close(proc.to_k_ip[0].weight, attn.to_k.weight)
        torch.testing.assert_close(proc.to_v_ip[0].weight, attn.to_v.weight)
    keys = [k for k in adapter.adapter_state_dict(FaceIDProjection(128, 32), unet) if k.startswith("ip_adapter.")]
    assert sorted({int(k.split(".")[1]) for k in keys}) == list(range(1, 2 * len(procs), 2))


def test_export_loads_in_stock_diffusers_and_matches(tiny_pipeline_dir, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet").eval()
    adapter.install_ip_attention(unet, num_tokens=4)
    enc = FaceIDProjection(id_dim=128, cross_attention_dim=unet.config.cross_attention_dim, num_tokens=4)
    # Perturb the IP weights so that "loaded" cannot pass by accident with the to_k/to_v copies.
    for proc in adapter.ip_attention_processors(unet).values():
        with torch.no_grad():
            proc.to_k_ip[0].weight.add_(0.1 * torch.randn_like(proc.to_k_ip[0].weight))
            proc.to_v_ip[0].weight.add_(0.1 * torch.randn_like(proc.to_v_ip[0].weight))
    out = adapter.export_adapter(tmp_path / "adapter", enc, unet, {"base_model": tiny_pipeline_dir, "id_embed_dim": 128,
                                                                    "num_tokens": 4})
    info = adapter.load_adapter_config(out)
    assert info["format"] == adapter.FORMAT and info["version"] == 1 and info["num_tokens"] == 4
    assert (out / "README.md").is_file() and not list(tmp_path.glob(".adapter*"))

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    pipe.load_ip_adapter(str(out), subfolder="", weight_name=adapter.WEIGHT_NAME, image_encoder_folder=None)

    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 700])
    text = torch.randn(2, 77, unet.config.cross_attention_dim)
    ident = torch.nn.functional.normalize(torch.randn(2, 128), dim=-1)
    with torch.no_grad():
        ours = unet(x, t, encoder_hidden_states=(text, [enc(ident)])).sample
        embeds = adapter.per_sample_image_embeds(ident)
        theirs = pipe.unet(x, t, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": embeds}).sample
        base = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")(x, t, text).sample
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (theirs - base).abs().max() > 1e-4  # the adapter does change the output

    # Generation with CFG through the stock pipeline (zero identity as the negative branch).
    image = pipe(["a photo of a person"] * 2, num_inference_steps=2, output_type="np",
                 ip_adapter_image_embeds=adapter.identity_image_embeds(ident[0]),
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (2, 64, 64, 3)


def test_load_adapter_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        adapter.load_adapter_config(tmp_path)
    (tmp_path / adapter.CONFIG_NAME).write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(ValueError, match="format"):
        adapter.load_adapter_config(tmp_path)


def test_identity_image_embeds_cfg_layout():
    ident = torch.randn(3, 16)  # three reference embeddings of one person
    (x,) = adapter.identity_image_embeds(ident)
    neg, pos = x.chunk(2)       # what the pipeline does under CFG
    assert x.shape == (2, 3, 16)
    torch.testing.assert_close(pos[0], ident)
    assert not neg.any()
    assert adapter.identity_image_embeds(ident[0], do_classifier_free_guidance=False)[0].shape == (1, 1, 16)
    assert adapter.per_sample_image_embeds(ident)[0].shape == (3, 1, 16)
