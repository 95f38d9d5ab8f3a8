"""Files in the layouts other loaders read: ComfyUI_IPAdapter_plus / tencent IP-Adapter FaceID, kohya LoRA.

``diffusers`` (always written) is what ``pipe.load_ip_adapter`` / ``pipe.load_lora_weights``
read. The other formats are written beside it:

``comfyui`` for an identity adapter: one ``ip-adapter-faceid*_accord.safetensors`` with
the flat ``image_proj.*`` / ``ip_adapter.*`` keys that both ComfyUI_IPAdapter_plus
(``IPAdapterPlus.py: ipadapter_execute``) and tencent-ailab/IP-Adapter
(``ip_adapter/ip_adapter_faceid.py``, ``ip_adapter_faceid_separate.py``) read:

- Both build the projection as ``Linear(512, 1024) - GELU - Linear(1024, K*cad)`` +
  ``LayerNorm(cad)`` (``MLPProjModel(id_embeddings_dim=512)``), so only an adapter on
  512-d (ArcFace) embeddings with hidden size 1024 loads there.
- ComfyUI tells FaceID (4 tokens) from FaceID-Portrait (16 tokens) by one key:
  ``ip_adapter.0.to_q_lora.down.weight`` present = FaceID with LoRA, absent = Portrait.
  So K = 4 files carry the FaceID LoRA keys (``{i}.to_{q,k,v,out}_lora.{down,up}.weight``
  for every attention processor i, which tencent's ``IPAdapterFaceID`` loads strictly,
  at its ``lora_rank``), zero matrices when no identity LoRA was trained (exactly the
  base model's attention); K = 16 files carry none (tencent's separate
  ``IPAdapterFaceID(num_tokens=16, n_cond=...)``). Other K load in neither.

``kohya`` for a LoRA: ``lora_unet_<module path with _>.lora_down.weight`` /
``.lora_up.weight`` / ``.alpha`` (text encoder: ``lora_te_``), the names ComfyUI's
``comfy/lora.py: model_lora_keys_unet`` and A1111 map onto the UNet. ``.alpha`` is a
scalar with ``alpha / rank`` = the trained LoRA scale. (diffusers'
``convert_state_dict_to_kohya`` writes ``alpha = rank``, i.e. scale 1, which is wrong
whenever ``lora.alpha != lora.rank``.) ``comfyui`` for a LoRA is the same file.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

__all__ = ["EXPORT_FORMATS", "ExportError", "FaceIDShapes", "faceid_shapes", "ipadapter_problems",
           "ipadapter_config_problems", "faceid_ipadapter_state", "kohya_lora_state", "write_safetensors",
           "export_adapter_as", "export_lora_as", "adapter_format_note", "after_adapter_export",
           "COMFYUI_FACEID_NAME", "COMFYUI_PORTRAIT_NAME", "KOHYA_NAME"]

EXPORT_FORMATS = ("diffusers", "comfyui", "kohya")
FACEID_ID_DIM = 512       # MLPProjModel(id_embeddings_dim=512) in both loaders
FACEID_HIDDEN = 1024      # id_embeddings_dim * 2
FACEID_TOKENS = (4, 16)   # FaceID (with LoRA keys) / FaceID-Portrait (without)
COMFYUI_FACEID_NAME = "ip-adapter-faceid_accord.safetensors"
COMFYUI_PORTRAIT_NAME = "ip-adapter-faceid-portrait_accord.safetensors"
KOHYA_NAME = "lora_kohya.safetensors"
LORA_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")


class ExportError(ValueError):
    """An export that cannot be written (message names the file, the reason and the fix)."""


@dataclass
class FaceIDShapes:
    """What an IP-Adapter FaceID state dict holds, read from its tensor shapes."""

    id_dim: int
    hidden: int
    cross_attention_dim: int
    num_tokens: int
    hidden_sizes: dict[int, int]   # {odd processor index: attention hidden size}
    kind: str = "faceid"           # "faceid_plus" when the projection has a perceiver resampler


def faceid_shapes(state: dict[str, torch.Tensor]) -> FaceIDShapes:
    """Shapes of a diffusers-layout FaceID file (``image_proj.proj.{0,2}``, ``image_proj.norm``, ``ip_adapter.{i}``)."""
    need = ["image_proj.proj.0.weight", "image_proj.proj.2.weight", "image_proj.norm.weight"]
    missing = [k for k in need if k not in state]
    if missing:
        raise ExportError(f"not an IP-Adapter FaceID state dict: keys {missing} missing")
    hidden, id_dim = state["image_proj.proj.0.weight"].shape
    cad = state["image_proj.norm.weight"].shape[0]
    sizes = {}
    for key, value in state.items():
        m = re.fullmatch(r"ip_adapter\.(\d+)\.to_k_ip\.weight", key)
        if m:
            sizes[int(m.group(1))] = int(value.shape[0])
    if not sizes:
        raise ExportError("not an IP-Adapter FaceID state dict: no ip_adapter.{i}.to_k_ip.weight keys")
    kind = "faceid_plus" if any(k.startswith("image_proj.perceiver_resampler.") for k in state) else "faceid"
    return FaceIDShapes(int(id_dim), int(hidden), int(cad), int(state["image_proj.proj.2.weight"].shape[0]) // cad,
                        dict(sorted(sizes.items())), kind)


def ipadapter_config_problems(id_dim: int, hidden: int, num_tokens: int, kind: str = "faceid") -> list[str]:
    """``ipadapter_problems`` from an encoder config, before training: export_format=comfyui fails early."""
    return ipadapter_problems(FaceIDShapes(id_dim, hidden, 0, num_tokens, {1: 0},
                                           "faceid" if kind in ("faceid", "faceid_portrait") else kind))


def after_adapter_export(adapter_dir: str | os.PathLike, fmt: str, log, lora_rank: int = 128) -> Optional[Path]:
    """The trainers' hook after each diffusers export: one line on where it loads, plus the ``fmt`` file."""
    path = export_adapter_as(adapter_dir, fmt, lora_rank=lora_rank)
    log(f"exported {path} (ComfyUI_IPAdapter_plus / tencent IP-Adapter layout)" if path
        else adapter_format_note(adapter_dir))
    return path


def ipadapter_problems(shapes: FaceIDShapes) -> list[str]:
    """Why ComfyUI_IPAdapter_plus and tencent's IPAdapterFaceID cannot load this adapter (empty: they can)."""
    problems = []
    if shapes.id_dim != FACEID_ID_DIM:
        problems.append(f"they build the projection for {FACEID_ID_DIM}-d ArcFace embeddings, this adapter takes "
                        f"{shapes.id_dim}-d ones (train on arcface shards: encoder.id_embed_dim=512)")
    if shapes.hidden != FACEID_HIDDEN:
        problems.append(f"they fix the projection's hidden size to {FACEID_HIDDEN}, this adapter has {shapes.hidden} "
                        "(encoder.hidden_dim=1024)")
    if shapes.num_tokens not in FACEID_TOKENS:
        problems.append(f"they know 4 (FaceID) or 16 (FaceID-Portrait) identity tokens, this adapter has "
                        f"{shapes.num_tokens} (encoder.num_tokens=4 or 16)")
    odd = list(shapes.hidden_sizes)
    if shapes.kind != "faceid":
        problems.append(f"only plain FaceID / FaceID-Portrait projections are converted, this is {shapes.kind}")
    if odd != list(range(1, 2 * len(odd), 2)):
        problems.append(f"its ip_adapter indices {odd[:4]}... are not 1, 3, 5, ... (self- and cross-attention "
                        "alternating, as in SD1.x/SDXL UNets)")
    return problems


def faceid_ipadapter_state(state: dict[str, torch.Tensor], lora_rank: int = 128,
                           identity_lora: Optional[dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = None
                           ) -> dict[str, torch.Tensor]:
    """The ComfyUI_IPAdapter_plus / tencent FaceID state dict of a diffusers-layout adapter.

    K = 16 (Portrait): the input keys unchanged (no LoRA keys: that is how ComfyUI detects Portrait).
    K = 4: plus ``ip_adapter.{i}.{proj}_lora.{down,up}.weight`` for every processor i = 0 .. 2N-1
    (self-attention at even i with the hidden size of cross-attention i + 1; down (r, in), up (out, r),
    the ``LoRALinearLayer`` tencent's processors hold). ``identity_lora[i][proj] = (down, up)``
    supplies trained matrices (scale folded into ``up``: tencent applies them without alpha);
    the rest are zeros, which adds exactly nothing to the attention.
    """
    shapes = faceid_shapes(state)
    problems = ipadapter_problems(shapes)
    if problems:
        raise ExportError("cannot write a ComfyUI/tencent FaceID file: " + "; ".join(problems))
    out = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    if shapes.num_tokens == 16:
        if identity_lora:
            raise ExportError("a 16-token (FaceID-Portrait) file has no LoRA keys in ComfyUI's layout; "
                              "export the identity LoRA separately (export_format=kohya on the LoRA)")
        return out
    if lora_rank < 1:
        raise ExportError(f"lora_rank must be >= 1, got {lora_rank}")
    identity_lora = identity_lora or {}
    cad = shapes.cross_attention_dim
    for cross, hidden in shapes.hidden_sizes.items():
        for index, kv_in in ((cross - 1, hidden), (cross, cad)):      # self-attention, then cross-attention
            given = identity_lora.get(index, {})
            for proj in LORA_PROJECTIONS:
                in_features = kv_in if proj in ("to_k", "to_v") else hidden
                down, up = given.get(proj, (torch.zeros(lora_rank, in_features), torch.zeros(hidden, lora_rank)))
                if tuple(down.shape) != (lora_rank, in_features) or tuple(up.shape) != (hidden, lora_rank):
                    raise ExportError(f"identity LoRA {index}.{proj}: shapes {tuple(down.shape)}, {tuple(up.shape)} "
                                      f"!= ({lora_rank}, {in_features}), ({hidden}, {lora_rank})")
                out[f"ip_adapter.{index}.{proj}_lora.down.weight"] = down.detach().float().cpu().contiguous()
                out[f"ip_adapter.{index}.{proj}_lora.up.weight"] = up.detach().float().cpu().contiguous()
    unknown = set(identity_lora) - {i for c in shapes.hidden_sizes for i in (c - 1, c)}
    if unknown:
        raise ExportError(f"identity LoRA for processor indices {sorted(unknown)} that the adapter does not have")
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------- kohya LoRA

_DIFFUSERS_LORA_KEY = re.compile(
    r"(?P<part>unet|text_encoder|text_encoder_2)\.(?P<module>.+?)\."
    r"(?P<kind>lora\.down|lora\.up|lora_linear_layer\.down|lora_linear_layer\.up|lora_A|lora_B)\.weight")
_KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}


def _peft_scale(meta: dict, part: str, module: str, rank: int) -> float:
    """The LoRA scale peft applied: alpha / r, or alpha / sqrt(r) with rslora; per-module alpha_pattern wins."""
    alpha = meta.get(f"{part}.lora_alpha")
    if alpha is None:
        return 1.0   # no metadata: diffusers' own default (alpha = rank)
    for pattern, value in (meta.get(f"{part}.alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){re.escape(pattern)}$", module):
            alpha = value
    return float(alpha) / (math.sqrt(rank) if meta.get(f"{part}.use_rslora") else rank)


def kohya_lora_state(state: dict[str, torch.Tensor], metadata: dict) -> dict[str, torch.Tensor]:
    """diffusers-layout LoRA (``unet.<module>.lora.down.weight`` ...) -> kohya layout with a scalar ``.alpha``.

        kohya applies   W + (alpha / rank) * up @ down,   so   alpha = rank * scale_peft

    ``metadata`` is the parsed ``lora_adapter_metadata`` (``{"unet.lora_alpha": ..., "unet.r": ...}``).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _DIFFUSERS_LORA_KEY.fullmatch(key)
        if not m:
            raise ExportError(f"LoRA key {key!r} is not in diffusers' layout (unet.<module>.lora.down.weight)")
        name = f"{_KOHYA_PREFIX[m['part']]}_{m['module'].replace('.', '_')}"
        is_down = m["kind"].endswith(("down", "_A"))
        out[f"{name}.{'lora_down' if is_down else 'lora_up'}.weight"] = value.detach().float().cpu().contiguous()
        if is_down:
            rank = int(value.shape[0])
            out[f"{name}.alpha"] = torch.tensor(rank * _peft_scale(metadata, m["part"], m["module"], rank))
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------- files


def write_safetensors(path: str | os.PathLike, state: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    """safetensors file written under a temporary name and renamed when complete."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "pt", **(metadata or {})})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    if not path.is_file():
        raise ExportError(f"{path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def adapter_format_note(adapter_dir: str | os.PathLike) -> str:
    """One line for the export log: where the diffusers file loads, and whether export_format=comfyui can help."""
    from .adapter import WEIGHT_NAME

    state, _ = _read(Path(adapter_dir) / WEIGHT_NAME)
    shapes = faceid_shapes(state)
    problems = ipadapter_problems(shapes)
    if problems:
        return (f"{Path(adapter_dir) / WEIGHT_NAME} is diffusers-only (pipe.load_ip_adapter): ComfyUI_IPAdapter_plus "
                f"and tencent's IPAdapterFaceID cannot load it: {'; '.join(problems)}")
    kind = "FaceID-Portrait" if shapes.num_tokens == 16 else "FaceID"
    return (f"{Path(adapter_dir) / WEIGHT_NAME} is diffusers' layout; export_format=comfyui also writes a {kind} "
            "file for ComfyUI_IPAdapter_plus and tencent's IP-Adapter")


def export_adapter_as(adapter_dir: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None,
                      lora_rank: int = 128) -> Optional[Path]:
    """Write ``fmt`` beside the diffusers export of an identity adapter; returns the file (None for diffusers)."""
    from .adapter import WEIGHT_NAME

    if fmt == "diffusers":
        return None
    if fmt != "comfyui":
        raise ExportError(f"export format {fmt!r} is for LoRAs; an identity adapter exports as diffusers or comfyui")
    state, _ = _read(Path(adapter_dir) / WEIGHT_NAME)
    converted = faceid_ipadapter_state(state, lora_rank=lora_rank)
    portrait = faceid_shapes(state).num_tokens == 16
    target = Path(out) if out else Path(adapter_dir) / (COMFYUI_PORTRAIT_NAME if portrait else COMFYUI_FACEID_NAME)
    note = "FaceID-Portrait, 16 tokens" if portrait else f"FaceID, 4 tokens, LoRA rank {lora_rank}"
    return write_safetensors(target, converted, {"accord_face": json.dumps({"layout": "ip-adapter-faceid",
                                                                            "variant": note})})


def export_lora_as(lora_dir: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None) -> Optional[Path]:
    """Write the kohya-layout file beside a diffusers LoRA export (``comfyui`` = the same file)."""
    from .lora.export import LORA_WEIGHTS

    if fmt == "diffusers":
        return None
    if fmt not in ("kohya", "comfyui"):
        raise ExportError(f"unknown export format {fmt!r}; choose one of {list(EXPORT_FORMATS)}")
    state, meta = _read(Path(lora_dir) / LORA_WEIGHTS)
    metadata = json.loads(meta.get("lora_adapter_metadata", "{}"))
    target = Path(out) if out else Path(lora_dir) / KOHYA_NAME
    return write_safetensors(target, kohya_lora_state(state, metadata), {"ss_network_module": "networks.lora"})
