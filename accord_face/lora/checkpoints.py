"""LoRA training checkpoints through accelerate (the ``train_dreambooth_lora.py`` pattern).

    OUTPUT/checkpoints/step-NNNNNNNN/
        optimizer.bin, random_states_0.pkl (+ scaler.pt with fp16)   accelerator.save_state
        trainable.safetensors                                        the save-state hook: LoRA (+ token) weights
        state.json                                                   step, loss; written last

As in diffusers' examples, the UNet is not ``prepare``-d (only the LoRA weights train), so a
save-state pre-hook writes the trainable weights and a load-state pre-hook reads them back;
``checkpoints_total_limit`` prunes the oldest before a save (room for the new one).

What the project adds around ``save_state``: it writes into a temporary sibling folder that is
swapped in whole when complete (``export._replace_dir``), so the newest ``step-*`` folder is always
loadable after a kill; accelerate writes into the final folder directly, and a kill mid-save left a
folder that ``load_state`` then fails on. Checkpoints of the previous release (``optimizer.pt``)
still resume.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .export import _replace_dir, _temp_dir, load_trainable_state, trainable_state
from .models import LoraModels

__all__ = ["CHECKPOINT_PREFIX", "register_hooks", "save_checkpoint", "load_checkpoint", "list_checkpoints",
           "prune_checkpoints", "find_resume"]

CHECKPOINT_PREFIX = "step-"
WEIGHTS = "trainable.safetensors"
STATE = "state.json"


@contextlib.contextmanager
def _quiet_accelerate():
    """accelerate logs every file of a save / load at INFO; the trainer prints one line per checkpoint."""
    loggers = [logging.getLogger(n) for n in ("accelerate.accelerator", "accelerate.checkpointing")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def register_hooks(accelerator, models: LoraModels) -> None:
    """save_state / load_state also write / read the trainable LoRA weights (diffusers' save/load model hooks)."""

    def save_hook(_models, _weights, output_dir):
        if accelerator.is_main_process:
            save_file(trainable_state(models), str(Path(output_dir) / WEIGHTS))

    def load_hook(_models, input_dir):
        load_trainable_state(models, load_file(str(Path(input_dir) / WEIGHTS)))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints (with state.json), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def prune_checkpoints(root: Path, total_limit: int, room: int = 0) -> list[Path]:
    """Delete the oldest complete checkpoints so that at most ``total_limit - room`` stay (0 = keep all)."""
    if total_limit <= 0:
        return []
    found = list_checkpoints(root)
    doomed = found[:max(0, len(found) - max(total_limit - room, 0))]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


def save_checkpoint(accelerator, root: str | Path, step: int, extra: dict, total_limit: int = 2) -> Path:
    """``accelerator.save_state`` into ``root/step-NNNNNNNN`` (swapped in complete), after pruning to make room.

    Main process only, as in diffusers' examples (accelerate writes from the main process).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    prune_checkpoints(root, total_limit, room=1)
    final = root / f"{CHECKPOINT_PREFIX}{step:08d}"   # the encoder trainer's step-N width
    tmp = _temp_dir(final)
    try:
        with _quiet_accelerate():
            accelerator.save_state(str(tmp))
        (tmp / STATE).write_text(json.dumps({"step": step, **extra}, indent=2))
        _replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_checkpoint(accelerator, path: str | Path, models: LoraModels, optimizer: torch.optim.Optimizer) -> dict:
    """Restore weights, optimizer, RNG (and fp16 scaler) from a checkpoint folder; returns its state.json."""
    path = Path(path)
    if (path / "optimizer.pt").is_file() and not (path / "optimizer.bin").is_file():   # the previous release's
        load_trainable_state(models, load_file(str(path / WEIGHTS)))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    else:
        with _quiet_accelerate():
            accelerator.load_state(str(path))
    return json.loads((path / STATE).read_text())


def find_resume(root: Path, resume: str) -> Path | None:
    """``latest`` / ``force``: the newest complete checkpoint or None; ``none``: None; else that folder.

    FileNotFoundError names a folder that is not a complete checkpoint.
    """
    if resume == "none":
        return None
    if resume in ("latest", "force"):
        found = list_checkpoints(root)
        return found[-1] if found else None
    folder = Path(resume)
    if not (folder / STATE).is_file():
        what = "does not exist" if not folder.exists() else f"is not a complete checkpoint (no {STATE})"
        raise FileNotFoundError(f"checkpointing.resume_from_checkpoint={resume}: {folder} {what}; use latest or "
                                f"one of {[str(p) for p in list_checkpoints(root)]}")
    return folder
