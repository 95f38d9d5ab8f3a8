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

A trained identity LoRA (``pytorch_lora_weights.safetensors`` in the adapter folder) goes where
each loader looks for it: into the ``ip_adapter.{i}.to_*_lora`` keys of the FaceID file (tencent's
``IPAdapterFaceID`` applies them; ``i`` counts ``unet.attn_processors``: down, up, then mid blocks,
``attn1`` before ``attn2``; the peft scale ``alpha / rank`` folded into ``up``, since those layers
have no alpha), and into a separate kohya-layout ``accord-faceid_<sd15|sdxl>_lora.safetensors``:
ComfyUI_IPAdapter_plus applies the FaceID LoRA from ComfyUI's ``models/loras`` as an ordinary
LoRA, found by its unified loader with ``re.search("faceid.sd15.lora.safetensors$")`` once the
ipadapter file matches ``"faceid.sd15.(safetensors|bin)$"`` (FaceID-Portrait:
``"portrait.sd15.(safetensors|bin)$"``, no LoRA) -- hence the file names
``accord-faceid_sd15.safetensors`` / ``accord-faceid-portrait_sd15.safetensors`` (``sdxl`` for SDXL).

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
           "COMFYUI_FACEID_NAME", "COMFYUI_PORTRAIT_NAME", "COMFYUI_LORA_NAME", "KOHYA_NAME", "comfyui_names",
           "identity_lora_for_ipadapter", "attention_order_key"]

EXPORT_FORMATS = ("diffusers", "comfyui", "kohya")
FACEID_ID_DIM = 512       # MLPProjModel(id_embeddings_dim=512) in both loaders
FACEID_HIDDEN = 1024      # id_embeddings_dim * 2
FACEID_TOKENS = (4, 16)   # FaceID (with LoRA keys) / FaceID-Portrait (without)
COMFYUI_FACEID_NAME = "accord-faceid_sd15.safetensors"            # SD1.5 names; comfyui_names() for SDXL
COMFYUI_PORTRAIT_NAME = "accord-faceid-portrait_sd15.safetensors"
COMFYUI_LORA_NAME = "accord-faceid_sd15_lora.safetensors"
IDENTITY_LORA_NAME = "pytorch_lora_weights.safetensors"             # family.identity_lora.LORA_WEIGHTS
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
    if not path:
        log(adapter_format_note(adapter_dir))
        return path
    log(f"exported {path} (ComfyUI_IPAdapter_plus / tencent IP-Adapter layout: ComfyUI/models/ipadapter)")
    lora = [p for p in path.parent.glob("accord-faceid_*_lora.safetensors")]
    if lora and (Path(adapter_dir) / IDENTITY_LORA_NAME).is_file():
        log(f"exported {lora[0]} (the identity LoRA for ComfyUI/models/loras; the unified FaceID loader applies it)")
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


def comfyui_names(portrait: bool, is_sdxl: bool) -> tuple[str, str]:
    """(ipadapter file, FaceID LoRA file) named so ComfyUI_IPAdapter_plus's unified loader finds both."""
    base = "sdxl" if is_sdxl else "sd15"
    ip = f"accord-faceid-portrait_{base}.safetensors" if portrait else f"accord-faceid_{base}.safetensors"
    return ip, f"accord-faceid_{base}_lora.safetensors"


_IDENTITY_LORA_KEY = re.compile(r"unet\.(?P<attn>(?:down_blocks|up_blocks|mid_block)\..+\.attn[12])\."
                                r"(?P<proj>to_q|to_k|to_v|to_out(?:\.0)?)\.lora\.(?P<kind>down|up)\.weight")
_BLOCK_ORDER = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}


def attention_order_key(path: str) -> tuple:
    """Sort key putting attention module paths in ``unet.attn_processors`` order (diffusers registers
    ``down_blocks`` and ``up_blocks`` before ``mid_block``; inside, by the numeric indices, attn1 before attn2)."""
    parts = path.split(".")
    return _BLOCK_ORDER[parts[0]], tuple(int(p) for p in parts if p.isdigit()), parts[-1]


def identity_lora_for_ipadapter(lora: dict[str, torch.Tensor], metadata: dict, shapes: FaceIDShapes
                                ) -> tuple[int, dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]]:
    """The adapter folder's identity LoRA (diffusers layout, peft metadata) -> (rank, {processor i: {proj: (down, up)}})
    for ``faceid_ipadapter_state``:

        up_i  =  (alpha / rank) * B        down_i  =  A        (tencent's LoRALinearLayer applies up @ down, no alpha)

    i = the position of the attention module in ``unet.attn_processors`` order; every self- and cross-attention
    layer of the adapter must be covered (else the indices would not line up)."""
    by_module: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, value in lora.items():
        m = _IDENTITY_LORA_KEY.fullmatch(key)
        if not m:
            raise ExportError(f"identity LoRA key {key!r} is not a UNet attention projection "
                              "(unet.<block>...attn1|attn2.to_q|k|v|out.0.lora.down|up.weight)")
        proj = m["proj"].removesuffix(".0")
        by_module.setdefault(m["attn"], {}).setdefault(proj, {})[m["kind"]] = value
    paths = sorted(by_module, key=attention_order_key)
    need = 2 * len(shapes.hidden_sizes)
    if len(paths) != need:
        raise ExportError(f"the identity LoRA covers {len(paths)} attention layers, the adapter has {need}: "
                          "ComfyUI/tencent index the FaceID LoRA by attention layer, so lora.targets must cover "
                          "every self- and cross-attention (to_q / to_k / to_v / to_out.0)")
    ranks = {int(p["down"].shape[0]) for projs in by_module.values() for p in projs.values()}
    if len(ranks) != 1:
        raise ExportError(f"the identity LoRA has several ranks {sorted(ranks)}; tencent's FaceID layers take one")
    rank = ranks.pop()
    out: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for index, path in enumerate(paths):
        for proj, pair in by_module[path].items():
            module = f"{path}.{proj}.0" if proj == "to_out" else f"{path}.{proj}"
            scale = _peft_scale(metadata, "unet", module, rank)
            out.setdefault(index, {})[proj] = (pair["down"].float(), pair["up"].float() * scale)
    return rank, out


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
    """Write ``fmt`` beside the diffusers export of an identity adapter; returns the ipadapter file (None for
    diffusers).

    With a trained identity LoRA in the folder its rank replaces ``lora_rank``, its weights fill the FaceID
    LoRA keys (4 tokens), and the kohya-layout LoRA file for ComfyUI's ``models/loras`` is written beside
    the ipadapter file (``comfyui_names``)."""
    from .adapter import CONFIG_NAME, WEIGHT_NAME

    if fmt == "diffusers":
        return None
    if fmt != "comfyui":
        raise ExportError(f"export format {fmt!r} is for LoRAs; an identity adapter exports as diffusers or comfyui")
    folder = Path(adapter_dir)
    state, _ = _read(folder / WEIGHT_NAME)
    shapes = faceid_shapes(state)
    portrait = shapes.num_tokens == 16
    is_sdxl = bool(json.loads((folder / CONFIG_NAME).read_text()).get("is_sdxl")) \
        if (folder / CONFIG_NAME).is_file() else False
    ip_name, lora_name = comfyui_names(portrait, is_sdxl)
    identity, lora_state, lora_meta = None, None, {}
    if (folder / IDENTITY_LORA_NAME).is_file():
        lora_state, raw = _read(folder / IDENTITY_LORA_NAME)
        lora_meta = json.loads(raw.get("lora_adapter_metadata", "{}"))
        if not ipadapter_problems(shapes) and not portrait:
            lora_rank, identity = identity_lora_for_ipadapter(lora_state, lora_meta, shapes)
    converted = faceid_ipadapter_state(state, lora_rank=lora_rank, identity_lora=identity)
    target = Path(out) if out else folder / ip_name
    if lora_state is not None:    # ComfyUI applies the FaceID LoRA from models/loras, as a kohya-layout LoRA
        write_safetensors(target.parent / lora_name, kohya_lora_state(lora_state, lora_meta),
                          {"ss_network_module": "networks.lora",
                           "accord_face": json.dumps({"layout": "kohya", "role": "FaceID identity LoRA"})})
    note = "FaceID-Portrait, 16 tokens" if portrait else \
        f"FaceID, 4 tokens, LoRA rank {lora_rank}" + (" (trained identity LoRA)" if identity else " (zeros)")
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
