"""Export formats checked against the rules of the loaders that read them.

The loaders themselves (ComfyUI, ComfyUI_IPAdapter_plus, tencent-ailab/IP-Adapter) are not
installable here, so their detection and loading rules are re-implemented below, each with
the file it comes from; kohya files additionally go through diffusers' own kohya loader.
"""

import json

import pytest
import torch
from torch import nn

from accord_face import adapter
from accord_face.encoder import FaceIDProjection
from accord_face.export_formats import (COMFYUI_FACEID_NAME, COMFYUI_PORTRAIT_NAME, KOHYA_NAME, ExportError,
                                        adapter_format_note, export_adapter_as, export_lora_as,
                                        faceid_ipadapter_state, kohya_lora_state)
from accord_face.tiny import build_components


def tiny_adapter_state(id_dim=512, hidden=1024, tokens=4, seed=0):
    """A diffusers-layout adapter state dict from the project's own modules, on the tiny UNet."""
    torch.manual_seed(seed)
    unet = build_components("tiny", 0)["unet"]
    adapter.install_ip_attention(unet, num_tokens=tokens)
    enc = FaceIDProjection(id_dim, unet.config.cross_attention_dim, tokens, hidden)
    return adapter.adapter_state_dict(enc, unet), unet, enc


def split(state):
    """How both loaders split a flat safetensors file (IPAdapterPlus utils.ipadapter_model_loader,
    tencent IPAdapterFaceID.load_ip_adapter): ``image_proj.`` and ``ip_adapter.`` prefixes."""
    return ({k[len("image_proj."):]: v for k, v in state.items() if k.startswith("image_proj.")},
            {k[len("ip_adapter."):]: v for k, v in state.items() if k.startswith("ip_adapter.")})


def comfyui_detect(state):
    """ComfyUI_IPAdapter_plus IPAdapterPlus.py, ipadapter_execute: model-type detection from keys."""
    image_proj, ip = split(state)
    is_full = "proj.3.weight" in image_proj
    is_plus = is_full or "latents" in image_proj or "perceiver_resampler.proj_in.weight" in image_proj
    is_portrait = ("proj.2.weight" in image_proj and "proj.3.weight" not in image_proj
                   and "0.to_q_lora.down.weight" not in ip)
    is_faceid = is_portrait or "0.to_q_lora.down.weight" in ip
    tokens = 16 if (is_plus and not is_faceid) or is_portrait else 4
    return {"faceid": is_faceid, "portrait": is_portrait, "plus": is_plus, "tokens": tokens,
            "cross_attention_dim": ip["1.to_k_ip.weight"].shape[1]}


class MLPProjModelFaceId(nn.Module):
    """Both loaders' FaceID projection (IPAdapterPlus image_proj_models.py; tencent ip_adapter_faceid.py)."""

    def __init__(self, cross_attention_dim, id_embeddings_dim=512, num_tokens=4):
        super().__init__()
        self.cross_attention_dim, self.num_tokens = cross_attention_dim, num_tokens
        self.proj = nn.Sequential(nn.Linear(id_embeddings_dim, id_embeddings_dim * 2), nn.GELU(),
                                  nn.Linear(id_embeddings_dim * 2, cross_attention_dim * num_tokens))
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, x):
        return self.norm(self.proj(x).reshape(-1, self.num_tokens, self.cross_attention_dim))


def tencent_processors(unet, rank=None):
    """tencent IPAdapterFaceID.set_ip_adapter: one processor per unet.attn_processors entry, with the
    parameters of LoRAAttnProcessor / LoRAIPAttnProcessor (attention_processor_faceid.py; rank=None:
    ip_adapter_faceid_separate.py's AttnProcessor / IPAttnProcessor, no LoRA)."""
    from diffusers.models.lora import LoRALinearLayer

    cfg = unet.config
    procs = []
    for name in unet.attn_processors:
        cad = None if name.endswith("attn1.processor") else cfg.cross_attention_dim
        if name.startswith("mid_block"):
            hidden = cfg.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(cfg.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden = cfg.block_out_channels[int(name[len("down_blocks.")])]
        p = nn.Module()
        if rank is not None:
            p.to_q_lora = LoRALinearLayer(hidden, hidden, rank)
            p.to_k_lora = LoRALinearLayer(cad or hidden, hidden, rank)
            p.to_v_lora = LoRALinearLayer(cad or hidden, hidden, rank)
            p.to_out_lora = LoRALinearLayer(hidden, hidden, rank)
        if cad is not None:
            p.to_k_ip = nn.Linear(cad, hidden, bias=False)
            p.to_v_ip = nn.Linear(cad, hidden, bias=False)
        procs.append(p)
    return nn.ModuleList(procs)


def test_faceid_file_is_detected_as_faceid_by_comfyui_and_loads_strictly_in_tencent():
    state, unet, enc = tiny_adapter_state(tokens=4)
    assert comfyui_detect(state)["portrait"], "the diffusers layout is what ComfyUI takes for Portrait (16 tokens)"
    out = faceid_ipadapter_state(state, lora_rank=8)
    det = comfyui_detect(out)
    assert det == {"faceid": True, "portrait": False, "plus": False, "tokens": 4,
                   "cross_attention_dim": unet.config.cross_attention_dim}
    image_proj, ip = split(out)
    proj = MLPProjModelFaceId(det["cross_attention_dim"], 512, det["tokens"])
    proj.load_state_dict(image_proj)                      # strict, as both loaders do
    x = torch.randn(3, 512)
    torch.testing.assert_close(proj(x), enc(x))           # same function, not only the same shapes
    tencent_processors(unet, rank=8).load_state_dict(ip)  # strict: every LoRA and IP key, right shapes
    n_cross = sum(not n.endswith("attn1.processor") for n in unet.attn_processors)
    for number in range(n_cross):                         # CrossAttentionPatch: k_key = str(number*2+1)+"_to_k_ip"
        assert f"{number * 2 + 1}.to_k_ip.weight" in ip and f"{number * 2 + 1}.to_v_ip.weight" in ip
    assert all(v.abs().sum() == 0 for k, v in ip.items() if "_lora." in k), "untrained identity LoRA must be zeros"
    with pytest.raises(RuntimeError):                     # the loader's rank must match the file's
        tencent_processors(unet, rank=4).load_state_dict(ip)


def test_identity_lora_lands_in_the_processor_tencent_reads():
    state, unet, _ = tiny_adapter_state(tokens=4)
    down, up = torch.randn(8, 64), torch.randn(64, 8)     # processor 0: down_blocks.1 self-attention, hidden 64
    ip = split(faceid_ipadapter_state(state, lora_rank=8, identity_lora={0: {"to_q": (down, up)}}))[1]
    procs = tencent_processors(unet, rank=8)
    procs.load_state_dict(ip)
    torch.testing.assert_close(procs[0].to_q_lora.down.weight, down)
    torch.testing.assert_close(procs[0].to_q_lora.up.weight, up)
    with pytest.raises(ExportError, match="shapes"):
        faceid_ipadapter_state(state, lora_rank=8, identity_lora={1: {"to_k": (torch.zeros(8, 64), up)}})
    with pytest.raises(ExportError, match="indices"):
        faceid_ipadapter_state(state, lora_rank=8, identity_lora={99: {}})


def test_portrait_file_has_no_lora_keys_and_loads_in_both():
    state, unet, enc = tiny_adapter_state(tokens=16)
    out = faceid_ipadapter_state(state)
    det = comfyui_detect(out)
    assert det["faceid"] and det["portrait"] and det["tokens"] == 16
    image_proj, ip = split(out)
    MLPProjModelFaceId(det["cross_attention_dim"], 512, 16).load_state_dict(image_proj)
    result = tencent_processors(unet, rank=None).load_state_dict(ip, strict=False)  # separate.py loads strict=False
    assert not result.missing_keys and not result.unexpected_keys, "a missing key would stay random there"


@pytest.mark.parametrize("kwargs, reason", [({"id_dim": 128}, "512-d ArcFace"), ({"hidden": 512}, "hidden size"),
                                            ({"tokens": 8}, "16 \\(FaceID-Portrait\\)")])
def test_shapes_the_loaders_cannot_build_are_refused_with_the_reason(kwargs, reason, tmp_path):
    state, unet, enc = tiny_adapter_state(**kwargs)
    with pytest.raises(ExportError, match=reason):
        faceid_ipadapter_state(state)
    folder = adapter.export_adapter(tmp_path / "adapter", enc, unet, {"base_model": "x"})
    note = adapter_format_note(folder)
    assert "diffusers-only" in note and "ComfyUI" in note
    with pytest.raises(ExportError):
        export_adapter_as(folder, "comfyui")
    assert not any(p.name.startswith("ip-adapter") for p in folder.iterdir()), "nothing half-written"


def test_export_adapter_as_writes_the_file_beside_the_diffusers_one(tmp_path):
    from safetensors.torch import load_file

    for tokens, name in ((4, COMFYUI_FACEID_NAME), (16, COMFYUI_PORTRAIT_NAME)):
        _, unet, enc = tiny_adapter_state(tokens=tokens)
        folder = adapter.export_adapter(tmp_path / f"a{tokens}", enc, unet, {"base_model": "x"})
        assert "also writes" in adapter_format_note(folder)
        path = export_adapter_as(folder, "comfyui", lora_rank=4)
        assert path == folder / name
        assert comfyui_detect(load_file(str(path)))["tokens"] == tokens
    assert export_adapter_as(folder, "diffusers") is None
    with pytest.raises(ExportError, match="LoRA"):
        export_adapter_as(folder, "kohya")


# ----------------------------------------------------------------------------- kohya LoRA


def comfyui_unet_lora_names(unet):
    """ComfyUI comfy/lora.py model_lora_keys_unet: "lora_unet_" + diffusers weight name, '.' -> '_'."""
    return {"lora_unet_" + k[:-len(".weight")].replace(".", "_") for k in unet.state_dict() if k.endswith(".weight")}


@pytest.fixture(scope="module")
def lora_export(tiny_pipeline_dir, tmp_path_factory):
    """A UNet LoRA with alpha (16) != rank (4) and non-zero B, exported by the project's export_lora."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    from accord_face.lora.export import export_lora
    from accord_face.lora.models import LoraModels

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights="gaussian"))
    gen = torch.Generator().manual_seed(0)
    for n, p in pipe.unet.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=gen) * 0.1
    folder = tmp_path_factory.mktemp("lora") / "lora"
    export_lora(LoraModels(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
                           tiny_pipeline_dir), folder)
    return folder


def unet_output(pipe):
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    text = pipe.encode_prompt("a photo of a dog", "cpu", 1, False)[0]
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([500]), encoder_hidden_states=text).sample


def test_kohya_lora_keys_alpha_and_reload_through_diffusers(lora_export, tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    path = export_lora_as(lora_export, "kohya")
    assert path == lora_export / KOHYA_NAME and export_lora_as(lora_export, "comfyui") == path
    sd = load_file(str(path))
    base = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    names = {k.split(".")[0] for k in sd}
    assert names <= comfyui_unet_lora_names(base.unet) and len(names) == 32
    for name in names:
        down, up, alpha = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"], sd[f"{name}.alpha"]
        assert alpha.ndim == 0 and float(alpha) == 16.0 and down.shape[0] == 4 and up.shape[1] == 4

    def loaded(file_or_dir, **kw):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
        pipe.load_lora_weights(str(file_or_dir), **kw)
        return unet_output(pipe)

    reference = loaded(lora_export, weight_name="pytorch_lora_weights.safetensors")
    assert (reference - unet_output(base)).abs().max() > 1e-2
    torch.testing.assert_close(loaded(path), reference, atol=1e-5, rtol=1e-4)
    # diffusers' own PEFT -> kohya conversion writes alpha = rank: a quarter of the strength here.
    from peft.utils import get_peft_model_state_dict

    peft_pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    peft_pipe.load_lora_weights(str(lora_export), weight_name="pytorch_lora_weights.safetensors")
    peft_sd = get_peft_model_state_dict(peft_pipe.unet, adapter_name=next(iter(peft_pipe.unet.peft_config)))
    naive = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_sd.items()})
    assert {float(v) for k, v in naive.items() if k.endswith(".alpha")} == {4.0}
    save_file({k: v.contiguous() for k, v in naive.items()}, str(path.with_name("naive.safetensors")))
    assert (loaded(path.with_name("naive.safetensors")) - reference).abs().max() > 1e-3


def test_kohya_state_names_text_encoder_keys_as_comfyui_maps_them():
    # comfy/lora.py model_lora_keys_clip: "lora_te_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"
    state = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight":
             torch.zeros(2, 8),
             "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight":
             torch.zeros(8, 2)}
    out = kohya_lora_state(state, {"text_encoder.lora_alpha": 1.0, "text_encoder.use_rslora": True})
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert set(out) == {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"}
    assert float(out[f"{name}.alpha"]) == pytest.approx(2 ** 0.5)   # rslora: scale alpha/sqrt(r) -> alpha = sqrt(2)
    with pytest.raises(ExportError, match="layout"):
        kohya_lora_state({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, {})
    meta = json.dumps({"unet.lora_alpha": 8, "unet.alpha_pattern": {"to_q": 2}})
    out = kohya_lora_state({"unet.a.to_q.lora.down.weight": torch.zeros(4, 3),
                            "unet.a.to_k.lora.down.weight": torch.zeros(4, 3)}, json.loads(meta))
    assert float(out["lora_unet_a_to_q.alpha"]) == 2.0 and float(out["lora_unet_a_to_k.alpha"]) == 8.0


# ----------------------------------------------------------------------------- trainers


def test_encoder_config_refuses_comfyui_for_shapes_the_loaders_cannot_build():
    from accord_face.config import ConfigError, load_config
    from accord_face.train import TrainConfig

    with pytest.raises(ConfigError, match="512-d ArcFace"):
        load_config(TrainConfig, None, ["export_format=comfyui", "encoder.id_embed_dim=128"])
    cfg = load_config(TrainConfig, None, ["export_format=comfyui", "encoder.id_embed_dim=512", "encoder.num_tokens=16"])
    assert cfg.export_format == "comfyui"


def test_lora_trainer_writes_the_kohya_file_and_says_where_it_loads(tiny_pipeline_dir, tmp_path):
    from accord_face.config import load_config
    from accord_face.lora import LoraTrainConfig, train_lora

    lines = []
    cfg = load_config(LoraTrainConfig, None, [
        f"pretrained_model={tiny_pipeline_dir}", f"output_dir={tmp_path}", "max_steps=1", "data.synthetic=subject",
        "data.synthetic_count=2", "validation.num_inference_steps=1", "validation.num_validation_images=1",
        "validation.validation_prompts=['sks']", "accord.lambda_dd=0", "export_format=kohya", "lora.alpha=8"])
    train_lora(cfg, log=lines.append)
    kohya = tmp_path / "lora" / KOHYA_NAME
    assert kohya.is_file() and any(str(kohya) in line and "kohya" in line for line in lines)
    from safetensors.torch import load_file

    assert {float(v) for k, v in load_file(str(kohya)).items() if k.endswith(".alpha")} == {8.0}
    # the encoder trainer's output layout
    assert (tmp_path / "metrics.jsonl").is_file() and (tmp_path / "samples" / "step-00000001.png").is_file()
    assert list((tmp_path / "logs").glob("events.out.tfevents.*")) and (tmp_path / "checkpoints" / "step-00000001").is_dir()


def test_lora_report_to_wandb_without_wandb_is_a_config_error():
    import importlib.util

    from accord_face.config import ConfigError, load_config
    from accord_face.lora import LoraTrainConfig

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(ConfigError, match="pip install wandb"):
        load_config(LoraTrainConfig, None, ["report_to=wandb"])
