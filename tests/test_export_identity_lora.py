"""The identity LoRA of a FaceID adapter in the ComfyUI / tencent export: in the FaceID file's LoRA keys (each
processor gets its own module's update, scale folded in) and as the kohya-layout LoRA file that
ComfyUI_IPAdapter_plus's unified loader picks up by name (rules re-implemented in test_export_formats.py)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from accord_face import adapter
from accord_face.encoder import FaceIDProjection
from accord_face.export_formats import (COMFYUI_FACEID_NAME, COMFYUI_LORA_NAME, COMFYUI_PORTRAIT_NAME, ExportError,
                                        attention_order_key, comfyui_names, export_adapter_as)
from accord_face.family.identity_lora import LORA_WEIGHTS, add_identity_lora, save_identity_lora
from test_export_formats import comfyui_detect, comfyui_unet_lora_names, split, tencent_processors, unet_output

# ComfyUI_IPAdapter_plus IPAdapterPlus.py, IPAdapterUnifiedLoader (get_ipadapter_file / get_lora_file): re.search,
# case-insensitive, over the file names of models/ipadapter and models/loras.
UNIFIED = {("faceid", False): ("faceid.sd15.(safetensors|bin)$", "faceid.sd15.lora.safetensors$"),
           ("faceid", True): ("faceid.sdxl.(safetensors|bin)$", "faceid.sdxl.lora.safetensors$"),
           ("portrait", False): ("portrait.sd15.(safetensors|bin)$", None),
           ("portrait", True): ("portrait.sdxl.(safetensors|bin)$", None)}


def _found(pattern, name):
    return re.search(pattern, name, re.IGNORECASE) is not None


def test_names_are_the_ones_the_unified_loader_searches_for():
    for (kind, sdxl), (ip_pattern, lora_pattern) in UNIFIED.items():
        ip, lora = comfyui_names(kind == "portrait", sdxl)
        assert _found(ip_pattern, ip), (ip, ip_pattern)
        other = [p for (k, s), (p, _) in UNIFIED.items() if (k, s) != (kind, sdxl)]
        assert not any(_found(p, ip) for p in other), ip          # no other preset picks it up
        if lora_pattern:
            assert _found(lora_pattern, lora) and not _found(ip_pattern, lora)
    assert comfyui_names(False, False) == (COMFYUI_FACEID_NAME, COMFYUI_LORA_NAME)
    assert comfyui_names(True, False)[0] == COMFYUI_PORTRAIT_NAME


def _trained_adapter(pipeline_dir, folder, tokens=4, rank=4, alpha=8.0):
    """An adapter folder as the trainer exports it with a trained (non-zero) identity LoRA."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    adapter.install_ip_attention(unet, num_tokens=tokens)
    torch.manual_seed(0)
    enc = FaceIDProjection(512, unet.config.cross_attention_dim, tokens, 1024)
    add_identity_lora(unet, rank=rank, alpha=alpha)
    gen = torch.Generator().manual_seed(1)
    for n, p in unet.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=gen) * 0.1
    adapter.export_adapter(folder, enc, unet, {"base_model": pipeline_dir, "is_sdxl": False},
                           extra=lambda d: save_identity_lora(d, unet, False))
    return unet


def test_trained_identity_lora_lands_in_every_processor_tencent_builds(tiny_pipeline_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    folder = tmp_path / "adapter"
    unet = _trained_adapter(tiny_pipeline_dir, folder, rank=4, alpha=8.0)
    path = export_adapter_as(folder, "comfyui")                 # default lora_rank 128: the trained rank wins
    from safetensors.torch import load_file

    out = load_file(str(path))
    assert path == folder / COMFYUI_FACEID_NAME and comfyui_detect(out)["faceid"] and not comfyui_detect(out)["portrait"]
    _, ip = split(out)
    fresh = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")
    procs = tencent_processors(fresh, rank=4)
    procs.load_state_dict(ip)                                   # strict: every key, right shapes
    names = list(fresh.attn_processors)
    assert [n.removesuffix(".processor") for n in names] == sorted(
        (n.removesuffix(".processor") for n in names), key=attention_order_key)
    for i, name in enumerate(names):                            # processor i = the i-th attention module
        attn = unet.get_submodule(name.removesuffix(".processor"))
        for proj, tencent in (("to_q", "to_q_lora"), ("to_k", "to_k_lora"), ("to_v", "to_v_lora"),
                              ("to_out", "to_out_lora")):
            layer = attn.to_out[0] if proj == "to_out" else getattr(attn, proj)
            peft_delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
            lora = getattr(procs[i], tencent)
            torch.testing.assert_close(lora.up.weight @ lora.down.weight, peft_delta)
    assert peft_delta.abs().max() > 0 and layer.scaling["default"] == 2.0


def test_the_lora_file_for_comfyui_loras_reloads_to_the_same_unet(tiny_pipeline_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    folder = tmp_path / "adapter"
    _trained_adapter(tiny_pipeline_dir, folder, rank=4, alpha=8.0)
    lines = []
    from accord_face.export_formats import after_adapter_export

    after_adapter_export(folder, "comfyui", lines.append)
    lora = folder / COMFYUI_LORA_NAME
    assert any(str(lora) in ln and "models/loras" in ln for ln in lines), lines
    sd = load_file(str(lora))
    base = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    names = {k.split(".")[0] for k in sd}
    assert names <= comfyui_unet_lora_names(base.unet) and len(names) == 32     # ComfyUI maps every module
    assert {float(v) for k, v in sd.items() if k.endswith(".alpha")} == {8.0}

    def loaded(file_or_dir, **kw):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
        pipe.load_lora_weights(str(file_or_dir), **kw)
        return unet_output(pipe)

    reference = loaded(folder, weight_name=LORA_WEIGHTS)
    assert (reference - unet_output(base)).abs().max() > 1e-3
    torch.testing.assert_close(loaded(lora), reference, atol=1e-5, rtol=1e-4)


def test_portrait_keeps_no_lora_keys_and_still_gets_the_lora_file(tiny_pipeline_dir, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "adapter"
    _trained_adapter(tiny_pipeline_dir, folder, tokens=16)
    path = export_adapter_as(folder, "comfyui")
    assert path.name == COMFYUI_PORTRAIT_NAME and comfyui_detect(load_file(str(path)))["portrait"]
    assert (folder / COMFYUI_LORA_NAME).is_file()


def test_a_lora_on_some_attention_layers_only_is_refused(tiny_pipeline_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "adapter"
    _trained_adapter(tiny_pipeline_dir, folder)
    lora = folder / LORA_WEIGHTS
    sd = {k: v for k, v in load_file(str(lora)).items() if "mid_block" not in k}
    from safetensors import safe_open

    with safe_open(str(lora), "pt") as f:
        meta = f.metadata()
    save_file(sd, str(lora), metadata=meta)
    with pytest.raises(ExportError, match="covers 6 attention layers, the adapter has 8"):
        export_adapter_as(folder, "comfyui")
    assert not (folder / COMFYUI_FACEID_NAME).exists()
    assert json.loads(meta["lora_adapter_metadata"])["unet.r"] == 4


def test_export_command_names_both_files(tiny_pipeline_dir, tmp_path, capsys):
    from accord_face.cli import main

    folder = tmp_path / "adapter"
    _trained_adapter(tiny_pipeline_dir, folder)
    assert main(["export", "--adapter", str(folder), "--format", "comfyui"]) == 0
    out = capsys.readouterr().out
    assert str(folder / COMFYUI_FACEID_NAME) in out and f"{folder / COMFYUI_LORA_NAME} (identity LoRA" in out


def test_attention_order_matches_diffusers_on_an_sdxl_shaped_unet():
    """SDXL-like layout (several transformer layers per block, more than 10 in one): the sort key puts the
    paths in unet.attn_processors order, numeric indices compared as numbers."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16, 32), layers_per_block=2, norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 11), cross_attention_dim=8, attention_head_dim=2)
    paths = [n.removesuffix(".processor") for n in unet.attn_processors]
    assert any(".transformer_blocks.10." in p for p in paths)
    assert sorted(reversed(paths), key=attention_order_key) == paths
