"""Which base model an adapter was trained on, and whether the file on disk is the one exported.

``base_fingerprint`` is recorded in ``adapter_config.json`` at export (``base_fingerprint``) and
compared at generate / evaluate time with the base the pipeline actually loaded. An adapter
moved to another base of the same shape loads silently in diffusers; users do that on purpose
(a fine-tune of the same base), so a difference is a warning, not an error.

A fingerprint holds the base's name and folder, the sha256 of the UNet config (keys without a
leading ``_``, canonical JSON) and, for a few UNet tensors that neither the IP processors nor the
identity LoRA touch, their mean absolute value and 32 values at fixed positions. The weights are
compared with a tolerance, not hashed, because the same base loads in fp32, fp16 or bf16:

    same(a, b)  <=>  |a_i - b_i| <= RTOL * max(|a_i|, |b_i|) + ATOL * m   for every sampled value i

with ``m`` the tensor's mean absolute value, RTOL = 8e-3 (bf16 rounds to 2^-9 relative) and
ATOL = 1e-3. A fine-tune that moves sampled weights by more than about 1 % reads as another base.

``file_digest`` (size + sha256) is what the export records for each weight file, so that a file
damaged after export (truncated, a flipped byte) is refused before any model loads.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["base_fingerprint", "fingerprint_difference", "file_digest", "describe_base", "FINGERPRINT_TENSORS"]

# Present in every diffusers UNet2DConditionModel (SD1.x, SD2, SDXL) and outside every LoRA / IP target.
FINGERPRINT_TENSORS = ("conv_in.weight", "time_embedding.linear_1.weight", "conv_out.weight")
SAMPLES = 32
RTOL, ATOL = 8e-3, 1e-3


def _config_sha256(config: Any) -> str:
    public = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
    return hashlib.sha256(json.dumps(public, sort_keys=True, default=str).encode()).hexdigest()


@torch.no_grad()
def base_fingerprint(name: str, path: Optional[str], unet: torch.nn.Module) -> dict[str, Any]:
    """The record for ``adapter_config.json``: name, folder, UNet config hash, sampled weights."""
    params = dict(unet.named_parameters())
    weights = {}
    for key in FINGERPRINT_TENSORS:
        if key not in params:
            continue
        flat = params[key].detach().float().reshape(-1).cpu()
        index = torch.linspace(0, flat.numel() - 1, min(SAMPLES, flat.numel())).long()
        weights[key] = {"numel": int(flat.numel()), "mean_abs": float(flat.abs().mean()),
                        "values": [float(f"{v:.7g}") for v in flat[index].tolist()]}
    return {"name": str(name), "folder": Path(str(path)).name if path else None,
            "unet_config_sha256": _config_sha256(unet.config), "weights": weights}


def describe_base(fp: dict[str, Any]) -> str:
    name, folder = str(fp.get("name")), fp.get("folder")
    return repr(name) + (f" (folder {folder})" if folder and not name.rstrip("/").endswith(folder) else "")


def fingerprint_difference(recorded: dict[str, Any], current: dict[str, Any]) -> Optional[str]:
    """None when ``current`` is the base ``recorded`` describes, else what differs (short text)."""
    if recorded.get("unet_config_sha256") != current.get("unet_config_sha256"):
        return "the UNet config differs"
    rw, cw = recorded.get("weights") or {}, current.get("weights") or {}
    shared = sorted(set(rw) & set(cw))
    if not shared:
        return None if not rw else "no fingerprint tensor in common"
    for key in shared:
        a, b = rw[key], cw[key]
        if a["numel"] != b["numel"] or len(a["values"]) != len(b["values"]):
            return f"the UNet's {key} has another size"
        m = max(a["mean_abs"], b["mean_abs"])
        for x, y in zip(a["values"], b["values"]):
            if abs(x - y) > RTOL * max(abs(x), abs(y)) + ATOL * m:
                return f"the UNet's weights differ ({key})"
    return None


def file_digest(path: str | os.PathLike) -> dict[str, Any]:
    """{"size", "sha256"} of a file (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"size": os.path.getsize(path), "sha256": h.hexdigest()}
