"""Decoupled cross-attention on a diffusers UNet, and export/import in diffusers' IP-Adapter format.

Training and inference share one implementation of the attention: diffusers'
own ``IPAdapterAttnProcessor2_0``. Each cross-attention layer gets a second
key/value projection (``to_k_ip``/``to_v_ip``) for the identity tokens,
initialised from the layer's text ``to_k``/``to_v`` (IP-Adapter's recipe: the
adapter starts out reading identity tokens the way the layer reads text).

Export layout (what ``UNet2DConditionLoadersMixin._load_ip_adapter_weights``
reads): one ``ip_adapter.safetensors`` with

    image_proj.proj.0.weight ... image_proj.norm.bias       (the FaceID projection)
    ip_adapter.{1,3,5,...}.to_k_ip.weight / .to_v_ip.weight  (one pair per cross-attention layer)

where the index counts ``unet.attn_processors`` the way diffusers does (it
starts at 1 and advances by 2 at every cross-attention layer), plus
``adapter_config.json`` and a short ``README.md`` model card. Load it with

    pipe.load_ip_adapter(folder, subfolder="", weight_name="ip_adapter.safetensors", image_encoder_folder=None)

and feed ``ip_adapter_image_embeds=identity_image_embeds(id_embeds)``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

__all__ = [
    "WEIGHT_NAME", "CONFIG_NAME", "FORMAT", "install_ip_attention", "ip_attention_processors",
    "ip_attention_parameters", "set_ip_scale", "adapter_state_dict", "export_adapter", "load_adapter_config",
    "load_adapter_state_dict", "load_into_training", "identity_image_embeds", "per_sample_image_embeds",
    "faceid_plus_clip_embeds", "set_faceid_plus_inputs",
]

WEIGHT_NAME = "ip_adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "accord-face-ip-adapter"


def _is_cross_attention(name: str) -> bool:
    # diffusers' own test in _convert_ip_adapter_attn_to_diffusers: self-attention is "attn1".
    return not name.endswith("attn1.processor") and "motion_modules" not in name


def _attention_module(unet: nn.Module, processor_name: str) -> nn.Module:
    return unet.get_submodule(processor_name.removesuffix(".processor"))


def install_ip_attention(unet: nn.Module, num_tokens: int = 4, scale: float = 1.0) -> dict[str, nn.Module]:
    """Put ``IPAdapterAttnProcessor2_0`` on every cross-attention layer of ``unet`` (in place).

    ``to_k_ip.0``/``to_v_ip.0`` are copies of the layer's ``to_k``/``to_v``.
    Self-attention layers keep a fresh instance of their processor class.
    Returns {processor name: IP processor} for the cross-attention layers.
    """
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    procs: dict[str, Any] = {}
    ip_procs: dict[str, nn.Module] = {}
    for name, current in unet.attn_processors.items():
        if not _is_cross_attention(name):
            procs[name] = current.__class__()
            continue
        attn = _attention_module(unet, name)
        proc = IPAdapterAttnProcessor2_0(hidden_size=attn.to_k.out_features,
                                         cross_attention_dim=attn.to_k.in_features,
                                         num_tokens=(num_tokens,), scale=scale)
        with torch.no_grad():
            proc.to_k_ip[0].weight.copy_(attn.to_k.weight)
            proc.to_v_ip[0].weight.copy_(attn.to_v.weight)
        proc.to(device=attn.to_k.weight.device, dtype=torch.float32)  # trainable: always fp32
        procs[name] = proc
        ip_procs[name] = proc
    unet.set_attn_processor(procs)
    return ip_procs


def ip_attention_processors(unet: nn.Module) -> dict[str, nn.Module]:
    """{name: processor} of the cross-attention layers that carry IP weights, in diffusers' order."""
    return {n: p for n, p in unet.attn_processors.items() if _is_cross_attention(n) and hasattr(p, "to_k_ip")}


def ip_attention_parameters(unet: nn.Module) -> list[nn.Parameter]:
    return [p for proc in ip_attention_processors(unet).values() for p in proc.parameters()]


def set_ip_scale(unet: nn.Module, scale: float) -> None:
    """Adapter strength on every IP processor (0 = the base model's text-only attention)."""
    for proc in ip_attention_processors(unet).values():
        proc.scale = [scale] * len(proc.scale)


def adapter_state_dict(encoder: nn.Module, unet: nn.Module) -> dict[str, torch.Tensor]:
    """The flat ``image_proj.`` / ``ip_adapter.`` state dict, keyed as diffusers indexes processors."""
    out = {f"image_proj.{k}": v.detach().float().cpu().contiguous() for k, v in encoder.state_dict().items()}
    key_id = 1
    for name, proc in unet.attn_processors.items():
        if not _is_cross_attention(name):
            continue
        if not hasattr(proc, "to_k_ip"):
            raise ValueError(f"cross-attention layer {name} has no IP weights; call install_ip_attention first")
        out[f"ip_adapter.{key_id}.to_k_ip.weight"] = proc.to_k_ip[0].weight.detach().float().cpu().contiguous()
        out[f"ip_adapter.{key_id}.to_v_ip.weight"] = proc.to_v_ip[0].weight.detach().float().cpu().contiguous()
        key_id += 2
    return out


MODEL_CARD = """# accord-face identity adapter

IP-Adapter-FaceID-style identity encoder trained with accord-face
(ACCORD regularization, arXiv 2503.01122).

- base model: `{base_model}`
- recognizer: `{recognizer}` ({id_embed_dim}-d normalised embedding), {num_tokens} identity tokens
- losses: {losses}
- training steps: {train_steps}

```python
from diffusers import StableDiffusionPipeline
from accord_face.adapter import identity_image_embeds
pipe = StableDiffusionPipeline.from_pretrained("{base_model_path}")
pipe.load_ip_adapter("<this folder>", subfolder="", weight_name="{weight_name}", image_encoder_folder=None)
image = pipe("a photo of a person", ip_adapter_image_embeds=identity_image_embeds(face_embedding)).images[0]
```
"""


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    import ctypes
    import errno
    import os

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _clean_stale_temps(folder: Path) -> None:
    """Remove ``.NAME.tmp.<pid>.*`` folders of exporters that are no longer running (killed mid-export)."""
    import os

    for stale in folder.parent.glob(f".{folder.name}.tmp.*"):
        pid = stale.name[len(f".{folder.name}.tmp."):].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
                continue  # its exporter still runs
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        shutil.rmtree(stale, ignore_errors=True)
    shutil.rmtree(folder.with_name(f".{folder.name}.old"), ignore_errors=True)  # left by older versions


def export_adapter(folder: str | Path, encoder: nn.Module, unet: nn.Module, config: dict[str, Any],
                   before_swap: Any = None, extra: Any = None) -> Path:
    """Write ``ip_adapter.safetensors`` + ``adapter_config.json`` + ``README.md`` into ``folder`` atomically.

    Everything is written into a temporary sibling folder (fsynced), which then takes the place of
    ``folder`` in one ``renameat2(RENAME_EXCHANGE)``: at every instant ``folder`` holds a complete
    adapter, the old one or the new one (where the exchange is unsupported, each file is replaced
    by ``os.replace``, so each file is always whole). ``files`` in the config records the size and
    sha256 of every ``*.safetensors`` written (checked by ``accord-face generate``). Permissions follow the umask (0755 / 0644),
    not ``mkdtemp``'s 0700. ``config`` is the adapter_config.json content; "format" and "version"
    are filled in. ``before_swap``: a test hook called when the new files are ready.
    ``extra(tmp_folder)`` writes further files into the same atomic folder (the identity LoRA's
    ``pytorch_lora_weights.safetensors``).
    """
    import os

    from safetensors.torch import save_file

    from .fingerprint import file_digest

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_temps(folder)
    info = {"format": FORMAT, "version": 1, **config}
    umask = os.umask(0)
    os.umask(umask)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp.{os.getpid()}.", dir=folder.parent))
    try:
        save_file(adapter_state_dict(encoder, unet), str(tmp / WEIGHT_NAME), metadata={"format": "pt"})
        if extra is not None:
            extra(tmp)
        # Size + sha256 of every weight file: generate refuses a file damaged after export.
        info["files"] = {f.name: file_digest(f) for f in sorted(tmp.glob("*.safetensors"))}
        (tmp / CONFIG_NAME).write_text(json.dumps(info, indent=2, sort_keys=False) + "\n")
        (tmp / "README.md").write_text(MODEL_CARD.format(
            base_model=info.get("base_model"), base_model_path=info.get("base_model_path"),
            recognizer=(info.get("recognizer") or {}).get("name"), id_embed_dim=info.get("id_embed_dim"),
            num_tokens=info.get("num_tokens"), losses=info.get("losses"), train_steps=info.get("train_steps"),
            weight_name=WEIGHT_NAME))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            f.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)
        if before_swap is not None:
            before_swap()
        if not folder.is_dir():
            tmp.rename(folder)
        elif not _exchange(tmp, folder):
            names = {f.name for f in tmp.iterdir()}
            for stale in folder.iterdir():        # e.g. a LoRA file the new export does not have
                if stale.is_file() and stale.name not in names:
                    stale.unlink()
            for name in sorted(names):
                os.replace(tmp / name, folder / name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # after an exchange: the previous adapter
    return folder


def load_adapter_config(folder: str | Path) -> dict[str, Any]:
    """Read and check ``folder/adapter_config.json``."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {folder} an adapter folder written by accord-face "
                                "(OUTPUT/adapter)?")
    info = json.loads(path.read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{path}: format is {info.get('format')!r}, expected {FORMAT!r}")
    if info.get("version") != 1:
        raise ValueError(f"{path}: version {info.get('version')!r} is not supported (this code reads version 1)")
    return info


def load_adapter_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return load_file(str(path))


def load_into_training(state: dict[str, torch.Tensor], encoder: nn.Module, unet: nn.Module) -> None:
    """Inverse of ``adapter_state_dict``: load exported weights into an encoder + IP-attention UNet."""
    encoder.load_state_dict({k.removeprefix("image_proj."): v for k, v in state.items() if k.startswith("image_proj.")})
    key_id = 1
    for name, proc in ip_attention_processors(unet).items():
        with torch.no_grad():
            proc.to_k_ip[0].weight.copy_(state[f"ip_adapter.{key_id}.to_k_ip.weight"])
            proc.to_v_ip[0].weight.copy_(state[f"ip_adapter.{key_id}.to_v_ip.weight"])
        key_id += 2


def identity_image_embeds(id_embeds: torch.Tensor, do_classifier_free_guidance: bool = True,
                          dtype: torch.dtype | None = None, device: torch.device | str | None = None
                          ) -> list[torch.Tensor]:
    """ONE identity's embedding(s) -> the ``ip_adapter_image_embeds`` list a diffusers pipeline takes.

    id_embeds: (D,) or (N, D), N reference embeddings of the same person (N = 1
    usually; N > 1 gives N*K identity tokens, diffusers' multi-image FaceID).
    Returns ``[x]`` with x (2, N, D) = cat([zeros, id]) under CFG (the pipeline
    splits it with ``chunk(2)``: negative first), else (1, N, D).

    The pipeline repeats x for every prompt of the call, so one call = one
    identity (any number of prompts / images per prompt). The zero embedding
    is the unconditional identity: the trainer's "dropped identity" is the same
    zeros, so guidance contrasts exactly what training taught. For a direct
    UNet call with a different identity per batch row use
    ``per_sample_image_embeds``.
    """
    if id_embeds.ndim == 1:
        id_embeds = id_embeds[None]
    if id_embeds.ndim != 2:
        raise ValueError(f"id_embeds must be (D,) or (N, D) for one identity, got {tuple(id_embeds.shape)}")
    x = id_embeds[None]                                        # (1, N, D)
    if do_classifier_free_guidance:
        x = torch.cat([torch.zeros_like(x), x], dim=0)         # (2, N, D), negative first
    return [x.to(device=device, dtype=dtype or x.dtype)]


def per_sample_image_embeds(id_embeds: torch.Tensor) -> list[torch.Tensor]:
    """(B, D), one identity per batch row -> ``added_cond_kwargs["image_embeds"]`` for a direct UNet call: [(B, 1, D)]."""
    if id_embeds.ndim != 2:
        raise ValueError(f"id_embeds must be (B, D), got {tuple(id_embeds.shape)}")
    return [id_embeds[:, None, :]]


def faceid_plus_clip_embeds(clip_embeds: torch.Tensor, null_embeds: torch.Tensor, batch: int,
                            do_classifier_free_guidance: bool = True) -> torch.Tensor:
    """ONE identity's CLIP face states -> the tensor a loaded FaceID-Plus layer reads as ``.clip_embeds``.

    clip_embeds: (n, L, H) penultimate CLIP states of the n face crops; null_embeds: (1, L, H) of the
    zero pixel tensor (the dropped identity, also the trainer's). ``batch`` = prompts x images per
    prompt of the call (diffusers repeats ``ip_adapter_image_embeds`` that often but not this attribute).
    Returns (2*batch, n, L, H) = cat([null] * batch, [clip] * batch), negative first, or (batch, n, L, H).
    """
    if clip_embeds.ndim != 3 or null_embeds.ndim != 3:
        raise ValueError(f"clip_embeds must be (n, L, H) and null_embeds (1, L, H), got {tuple(clip_embeds.shape)} "
                         f"and {tuple(null_embeds.shape)}")
    pos = clip_embeds[None].expand(batch, -1, -1, -1)                  # (batch, n, L, H)
    if not do_classifier_free_guidance:
        return pos
    neg = null_embeds.expand(clip_embeds.shape[0], -1, -1)[None].expand(batch, -1, -1, -1)
    return torch.cat([neg, pos]).to(clip_embeds.dtype)


def set_faceid_plus_inputs(unet: nn.Module, clip_embeds: torch.Tensor, shortcut: bool, s_scale: float = 1.0,
                           index: int = 0) -> nn.Module:
    """Drive diffusers' loaded ``IPAdapterFaceIDPlusImageProjection``: ``.clip_embeds``, ``.shortcut`` (V2), ``.shortcut_scale``."""
    proj = getattr(unet, "encoder_hid_proj", None)
    layers = getattr(proj, "image_projection_layers", None)
    if layers is None or len(layers) <= index or not hasattr(layers[index], "clip_embeds"):
        raise ValueError("the UNet has no loaded FaceID-Plus projection: call pipe.load_ip_adapter(...) with a "
                         "FaceID-Plus adapter first")
    layer = layers[index]
    layer.clip_embeds = clip_embeds.to(device=next(layer.parameters()).device, dtype=next(layer.parameters()).dtype)
    layer.shortcut, layer.shortcut_scale = bool(shortcut), float(s_scale)
    return layer
