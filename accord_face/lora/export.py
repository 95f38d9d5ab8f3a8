"""Export in diffusers' LoRA layout, and resumable training checkpoints.

Export (``<output_dir>/lora``):
- ``pytorch_lora_weights.safetensors`` written by ``StableDiffusionPipeline.save_lora_weights``
  from ``get_peft_model_state_dict`` + ``convert_state_dict_to_diffusers``. The
  peft ``LoraConfig`` (rank, ``lora_alpha``, targets) goes into the safetensors
  metadata (``lora_adapter_metadata``), which ``load_lora_weights`` reads back,
  so alpha != rank reloads with the trained scale.
- ``learned_embeds.safetensors`` (``{token: (1, D)}``) when a token was learned,
  loadable by ``pipe.load_textual_inversion(folder, weight_name=...)``.
- ``lora_config.json``: the base model folder (``accord-face generate --lora`` loads it).

``trainable_state`` / ``load_trainable_state`` are what a checkpoint holds of the
models (``accord_face.lora.checkpoints``: accelerate ``save_state`` / ``load_state``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .models import LoraModels

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
TOKEN_WEIGHTS = "learned_embeds.safetensors"
LORA_CONFIG = "lora_config.json"


def _adapter_metadata(model: torch.nn.Module) -> dict:
    """The peft LoraConfig as a JSON-safe dict (sets -> sorted lists)."""
    meta = model.peft_config["default"].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in meta.items()}


def _has_lora(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "peft_config", None))


def _replace_dir(tmp: Path, folder: Path) -> None:
    """Put the finished ``tmp`` folder in the place of ``folder`` with no moment without one.

    Files are fsynced and given umask permissions (not mkdtemp's 0700); an existing ``folder`` is
    swapped with ``tmp`` in one ``renameat2(RENAME_EXCHANGE)`` (elsewhere: file by file with
    ``os.replace``), and the old content, now in ``tmp``, is removed by the caller.
    """
    import os

    from ..adapter import _exchange

    umask = os.umask(0)
    os.umask(umask)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        f.chmod(0o666 & ~umask)
    tmp.chmod(0o777 & ~umask)
    if not folder.is_dir():
        tmp.rename(folder)
    elif not _exchange(tmp, folder):
        names = {f.name for f in tmp.iterdir()}
        for stale in folder.iterdir():
            if stale.is_file() and stale.name not in names:
                stale.unlink()
        for name in sorted(names):
            os.replace(tmp / name, folder / name)


def _temp_dir(folder: Path) -> Path:
    """A fresh ``.NAME.tmp.<pid>.*`` sibling of ``folder``, after removing those of dead writers."""
    import os

    from ..adapter import _clean_stale_temps

    _clean_stale_temps(folder)
    return Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp.{os.getpid()}.", dir=folder.parent))


def learned_token_state(models: LoraModels) -> dict[str, torch.Tensor]:
    """{token: (k, D)} for the learned token(s), in diffusers' textual-inversion layout."""
    if not models.placeholder_ids:
        return {}
    table = models.text_encoder.get_input_embeddings().weight
    token = models.tokenizer.convert_ids_to_tokens(models.placeholder_ids[0])
    return {token: table[models.placeholder_ids].detach().float().cpu().clone()}


def export_lora(models: LoraModels, folder: str | Path) -> Path:
    """Write the diffusers-loadable LoRA (and learned token) to ``folder``, atomically."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_dir(folder)
    try:
        def layers(model):
            sd = get_peft_model_state_dict(model)
            return convert_state_dict_to_diffusers({k: v.detach().float().cpu() for k, v in sd.items()})

        te = models.text_encoder if _has_lora(models.text_encoder) else None
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=layers(models.unet), text_encoder_lora_layers=layers(te) if te else None,
            unet_lora_adapter_metadata=_adapter_metadata(models.unet),
            text_encoder_lora_adapter_metadata=_adapter_metadata(te) if te else None,
            weight_name=LORA_WEIGHTS, safe_serialization=True,
        )
        token = learned_token_state(models)
        if token:
            save_file(token, str(tmp / TOKEN_WEIGHTS))
        (tmp / LORA_CONFIG).write_text(json.dumps({"base_model_path": models.pretrained}, indent=2) + "\n")
        _replace_dir(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_into_pipeline(pipe, folder: str | Path, scale: float | None = None, adapter_name: str | None = None):
    """Load an exported folder into a ``StableDiffusionPipeline`` (token first, then LoRA).

    ``scale`` (with ``adapter_name``) sets the LoRA strength through ``pipe.set_adapters``.
    """
    folder = Path(folder)
    if (folder / TOKEN_WEIGHTS).is_file():
        pipe.load_textual_inversion(str(folder), weight_name=TOKEN_WEIGHTS)
    pipe.load_lora_weights(str(folder), weight_name=LORA_WEIGHTS, adapter_name=adapter_name)
    if scale is not None:
        pipe.set_adapters([adapter_name or "default_0"], adapter_weights=[scale])
    return pipe


def lora_base_model(folder: str | Path) -> str | None:
    """The base model a LoRA folder was trained on: its lora_config.json, else the run's config.yaml."""
    import yaml

    folder = Path(folder)
    if (folder / LORA_CONFIG).is_file():
        return json.loads((folder / LORA_CONFIG).read_text()).get("base_model_path")
    run_cfg = folder.parent / "config.yaml"
    if run_cfg.is_file():
        return (yaml.safe_load(run_cfg.read_text()) or {}).get("pretrained_model")
    return None


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------

def trainable_state(models: LoraModels) -> dict[str, torch.Tensor]:
    """Every trainable weight, prefixed by component (peft names, adapter name removed)."""
    from peft.utils import get_peft_model_state_dict

    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(models.unet).items()}
    if _has_lora(models.text_encoder):
        state.update({f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(models.text_encoder).items()})
    if models.placeholder_ids:
        state["token_embedding"] = models.text_encoder.get_input_embeddings().weight[models.placeholder_ids]
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def load_trainable_state(models: LoraModels, state: dict[str, torch.Tensor]) -> None:
    from peft.utils import set_peft_model_state_dict

    def part(prefix):
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    result = set_peft_model_state_dict(models.unet, part("unet."))
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
    if missing:
        raise ValueError(f"checkpoint LoRA keys do not match the UNet (different lora.rank/targets?): {missing[:3]}")
    if _has_lora(models.text_encoder):
        set_peft_model_state_dict(models.text_encoder, part("text_encoder."))
    if models.placeholder_ids:
        with torch.no_grad():
            table = models.text_encoder.get_input_embeddings().weight
            table[models.placeholder_ids] = state["token_embedding"].to(table)
