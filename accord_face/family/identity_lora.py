"""The identity LoRA trained jointly with the adapter (IP-Adapter-FaceID's released SD1.5 / SDXL / Plus models).

The reference models pair the adapter with a rank-128 LoRA on ``to_q``/``to_k``/``to_v``/``to_out``
of every attention layer of the UNet (self- and cross-attention), trained in the same run; it
raises identity consistency and costs some text control. Here it is a PEFT LoRA
(``unet.add_adapter``) injected after the IP processors are installed, so its parameters sit in
the same module DeepSpeed wraps and train with the same optimizer, checkpoints and ZeRO stage:

    W x  ->  W x + (alpha / rank) * B A x        A: (rank, in) gaussian init, B: (out, rank) zeros

(B = 0: the run starts from the base UNet exactly). ACCORD sees the joint model: DDLoss's
three no-grad branches run through the same LoRA'd UNet (the ``live`` reference), or through
the initial LoRA = base weights (``frozen_initial``).

Export: ``pytorch_lora_weights.safetensors`` beside ``ip_adapter.safetensors`` in the adapter
folder, written by diffusers' own ``save_lora_weights`` (PEFT config incl. ``lora_alpha`` in the
metadata), loaded by ``pipe.load_lora_weights(folder, weight_name=..., adapter_name="identity")``
and scaled separately at generation (``pipe.set_adapters(["identity"], [lora_scale])``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

__all__ = ["LORA_WEIGHTS", "ADAPTER_NAME", "DEFAULT_TARGETS", "add_identity_lora", "has_identity_lora",
           "identity_lora_state", "save_identity_lora", "load_identity_lora"]

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
ADAPTER_NAME = "identity"
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def add_identity_lora(unet: nn.Module, rank: int, alpha: Optional[float] = None,
                      targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS) -> list[nn.Parameter]:
    """Inject a trainable PEFT LoRA into ``unet`` (in place, after ``install_ip_attention``); returns its parameters.

    ``alpha`` None = ``rank`` (scale 1, the reference's ``LoRALinearLayer`` without network alpha).
    The IP processors' ``to_k_ip``/``to_v_ip`` do not match the targets (peft matches name suffixes).
    """
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"lora.rank must be >= 1 for the identity LoRA, got {rank}")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                target_modules=list(targets)))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    if not params:
        raise ValueError(f"lora.targets {list(targets)} matched no UNet module")
    for p in params:
        p.requires_grad_(True)
        p.data = p.data.float()                      # trainable: fp32 masters
    return params


def has_identity_lora(unet: nn.Module) -> bool:
    return bool(getattr(unet, "peft_config", None))


def identity_lora_state(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights in diffusers' layout (``...to_q.lora_A.weight`` -> ``unet.`` keys of save_lora_weights)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(unet)
    return convert_state_dict_to_diffusers({k: v.detach().float().cpu().contiguous() for k, v in sd.items()})


def _metadata(unet: nn.Module) -> dict:
    meta = unet.peft_config["default"].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in meta.items()}


def save_identity_lora(folder: str | Path, unet: nn.Module, is_sdxl: bool) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` with the pipeline class's own ``save_lora_weights``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if is_sdxl else StableDiffusionPipeline
    cls.save_lora_weights(str(folder), unet_lora_layers=identity_lora_state(unet),
                          unet_lora_adapter_metadata=_metadata(unet), weight_name=LORA_WEIGHTS,
                          safe_serialization=True)
    return Path(folder) / LORA_WEIGHTS


def load_identity_lora(pipe, folder: str | Path, scale: float = 1.0) -> bool:
    """Load the adapter folder's identity LoRA into ``pipe`` at ``scale``; False when the folder has none."""
    path = Path(folder) / LORA_WEIGHTS
    if not path.is_file():
        return False
    pipe.load_lora_weights(str(folder), weight_name=LORA_WEIGHTS, adapter_name=ADAPTER_NAME)
    pipe.set_adapters([ADAPTER_NAME], adapter_weights=[float(scale)])
    return True
