"""The identity LoRA: trained in the same module as the adapter, exported beside it, loaded by stock diffusers."""

import json

import numpy as np
import pytest
import torch

from accord_face import adapter
from accord_face.encoder import build_encoder
from accord_face.family.identity_lora import (LORA_WEIGHTS, add_identity_lora, load_identity_lora,
                                              save_identity_lora)
from accord_face.family.clip_image import load_image_encoder
from accord_face.train.models import IdentityAdapterModel


def _model(base_dir: str, kind: str):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet").eval()
    cad = unet.config.cross_attention_dim
    enc = build_encoder(kind, id_dim=128, cross_attention_dim=cad, num_tokens=4, hidden_dim=256, clip_dim=48)
    model = IdentityAdapterModel(unet, enc, num_tokens=4).eval()
    params = add_identity_lora(unet, rank=4, alpha=8.0)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))                    # B != 0: the LoRA does something
        for proc in adapter.ip_attention_processors(unet).values():
            for p in proc.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model, params


def test_lora_targets_attention_not_ip_weights(tiny_pipeline_dir):
    model, params = _model(tiny_pipeline_dir, "faceid")
    names = [n for n, p in model.unet.named_parameters() if p.requires_grad]
    assert any("attn1.to_q.lora_A" in n for n in names) and any("attn2.to_out.0.lora_B" in n for n in names)
    assert not any("_ip" in n and "lora" in n for n in names)
    assert {id(p) for p in params} <= {id(p) for p in model.trainable_parameters()}
    from diffusers import UNet2DConditionModel

    fresh = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")
    with pytest.raises(ValueError, match="not found|matched no UNet module"):
        add_identity_lora(fresh, rank=2, targets=["no_such_layer"])
    with pytest.raises(ValueError, match="rank"):
        add_identity_lora(fresh, rank=0)


@pytest.mark.parametrize("kind,sdxl", [("faceid", False), ("faceid_plusv2", False), ("faceid_plusv2", True)],
                         ids=["faceid-sd15", "plusv2-sd15", "plusv2-sdxl"])
def test_lora_exports_beside_adapter_and_loads_with_scale(tiny_pipeline_dir, tmp_path, kind, sdxl):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from accord_face.tiny import save_sdxl_pipeline

    base = str(save_sdxl_pipeline(tmp_path / "sdxl")) if sdxl else tiny_pipeline_dir
    model, _ = _model(base, kind)
    out = adapter.export_adapter(tmp_path / "adapter", model.encoder, model.unet, {"base_model": base},
                                 extra=lambda d: save_identity_lora(d, model.unet, sdxl))
    assert (out / LORA_WEIGHTS).is_file() and (out / adapter.WEIGHT_NAME).is_file()
    from safetensors import safe_open
    with safe_open(str(out / LORA_WEIGHTS), "pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert keys and all(k.startswith("unet.") for k in keys) and meta["unet.lora_alpha"] == 8.0 and meta["unet.r"] == 4

    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    pipe = cls.from_pretrained(base, **({} if sdxl else {"safety_checker": None}))
    pipe.load_ip_adapter(str(out), subfolder="", weight_name=adapter.WEIGHT_NAME, image_encoder_folder=None)
    b, cad = 2, model.unet.config.cross_attention_dim
    x, t, text = torch.randn(b, 4, 8, 8), torch.tensor([20, 800]), torch.randn(b, 77, cad)
    ident = torch.nn.functional.normalize(torch.randn(b, 128), dim=-1)
    added = {"text_embeds": torch.randn(b, 32), "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * b).float()} \
        if sdxl else {}
    clip = torch.randn(b, 1, 17, 48) if kind == "faceid_plusv2" else None
    if clip is not None:
        adapter.set_faceid_plus_inputs(pipe.unet, clip, shortcut=True, s_scale=1.0)

    def theirs():
        with torch.no_grad():
            return pipe.unet(x, t, encoder_hidden_states=text,
                             added_cond_kwargs={**added, "image_embeds": adapter.per_sample_image_embeds(ident)}).sample

    without = theirs()
    assert load_identity_lora(pipe, out, scale=1.0)
    with_lora = theirs()
    with torch.no_grad():
        ours, _ = model(x, t, text, ident, added or None, clip_embeds=clip)
        model.unet.disable_adapters()
        ours_off, _ = model(x, t, text, ident, added or None, clip_embeds=clip)
        model.unet.enable_adapters()
    torch.testing.assert_close(with_lora, ours, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(without, ours_off, rtol=1e-4, atol=1e-5)
    assert (with_lora - without).abs().max() > 1e-5                      # the LoRA changes the output
    pipe.set_adapters(["identity"], adapter_weights=[0.0])               # --lora-scale 0 = adapter alone
    torch.testing.assert_close(theirs(), without, rtol=1e-4, atol=1e-5)
    pipe.set_adapters(["identity"], adapter_weights=[0.5])
    half = theirs()
    assert 0 < (half - without).abs().max() < (with_lora - without).abs().max()


def test_no_lora_file_no_load(tmp_path):
    assert load_identity_lora(object(), tmp_path) is False


def test_generator_switches_the_identity_lora_off_for_the_base_draw(tiny_pipeline_dir, tmp_path):
    """``set_identity_lora(False)``: the UNet of an adapter+LoRA generator equals the LoRA-free one (an
    adapter-scale-0 arm of an evaluation is then the base model); True restores the LoRA."""
    from accord_face.pipeline import FaceIDGenerator

    model, _ = _model(tiny_pipeline_dir, "faceid")
    out = adapter.export_adapter(tmp_path / "adapter", model.encoder, model.unet,
                                 {"base_model": tiny_pipeline_dir, "encoder": "faceid", "num_tokens": 4,
                                  "id_embed_dim": 128, "recognizer": {"name": None, "embedding_dim": 128},
                                  "cross_attention_dim": model.unet.config.cross_attention_dim},
                                 extra=lambda d: save_identity_lora(d, model.unet, False))
    gen = FaceIDGenerator(out, tiny_pipeline_dir, "cpu")
    assert gen.identity_lora
    cad = gen.pipe.unet.config.cross_attention_dim
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([20, 800]), torch.randn(2, 77, cad)
    ident = torch.nn.functional.normalize(torch.randn(2, 128), dim=-1)

    def unet():
        with torch.no_grad():
            return gen.pipe.unet(x, t, encoder_hidden_states=text,
                                 added_cond_kwargs={"image_embeds": adapter.per_sample_image_embeds(ident)}).sample

    on = unet()
    gen.set_identity_lora(False)
    off = unet()
    with torch.no_grad():
        model.unet.disable_adapters()
        ours_off, _ = model(x, t, text, ident, None)
        model.unet.enable_adapters()
    torch.testing.assert_close(off, ours_off, rtol=1e-4, atol=1e-5)
    assert (on - off).abs().max() > 1e-5
    gen.set_identity_lora(True)
    torch.testing.assert_close(unet(), on)
