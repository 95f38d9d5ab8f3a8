"""Checkpoint folders: naming, the completeness marker with file hashes, safe loading, picking, pruning.

A checkpoint is ``OUTPUT/checkpoints/step-00000042/`` written by
``engine.save_checkpoint`` (every rank writes its part). Only after every rank
has finished does rank 0 write ``COMPLETE`` (temp name + rename), holding the
size and sha256 of every file in the folder. ``resume_from_checkpoint=latest`` only considers
folders holding that marker, so a run killed mid-save is never resumed from a
half-written checkpoint, and a file changed after the save is refused before
DeepSpeed opens it.

DeepSpeed writes its files with ``torch.save`` and reads them back with
``torch.load(weights_only=False)``, i.e. by unpickling: a crafted file would run
code. ``make_loads_safe(engine)`` makes every read of the engine a
``torch.load(weights_only=True)`` that admits only the few plain DeepSpeed
value classes its ZeRO state holds (``SAFE_GLOBALS``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from ..config import ConfigError

__all__ = ["tag_for", "mark_complete", "is_complete", "read_marker", "complete_checkpoints", "find_resume",
           "prune", "file_hashes", "verify", "scan", "safe_torch_load", "make_loads_safe", "CheckpointError", "MARKER"]

MARKER = "COMPLETE"
_TAG = re.compile(r"^step-(\d{8})$")


class CheckpointError(ConfigError):
    """A checkpoint that must not be resumed (tampered, corrupt, written by another layout)."""


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def file_hashes(folder: Path) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of every file under ``folder`` except the marker."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MARKER, MARKER + ".tmp")):
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        out[str(path.relative_to(folder))] = {"size": path.stat().st_size, "sha256": digest.hexdigest()}
    return out


def mark_complete(folder: Path, info: dict) -> None:
    """Write ``COMPLETE`` (info + the hashes of the folder's files) atomically: temp name, fsync, rename."""
    tmp = folder / (MARKER + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(json.dumps({**info, "files": file_hashes(folder)}, indent=2))
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(folder / MARKER)


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def read_marker(folder: Path) -> dict:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{folder / MARKER}: unreadable ({err}); delete {folder} to resume from an older "
                              "checkpoint") from None


def verify(folder: Path) -> dict:
    """The marker of ``folder`` after checking every file it lists (size + sha256); raises CheckpointError.

    Files not in the marker are refused too (nothing may be added after the save).
    Markers written before hashes were recorded (no "files") are accepted as they are.
    """
    marker = read_marker(folder)
    expected = marker.get("files")
    if expected is None:
        return marker
    actual = file_hashes(folder)
    for name in sorted(set(expected) | set(actual)):
        if name not in actual:
            problem = "is missing"
        elif name not in expected:
            problem = "was added after the checkpoint was saved"
        elif actual[name] != expected[name]:
            problem = "differs from the sha256 recorded when it was saved"
        else:
            continue
        raise CheckpointError(f"{folder / name} {problem}; refusing to load {folder} (delete it to resume from "
                              "an older checkpoint, or start a new output_dir)")
    return marker


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _TAG.match(p.name)) and is_complete(p)]
    return sorted(found)


def find_resume(root: Path, resume: str) -> Optional[Path]:
    """``latest``/``force`` (``auto``: the old name of latest): newest complete checkpoint or None; ``none``: None;
    else that folder (must be complete)."""
    if resume == "none":
        return None
    if resume in ("latest", "auto", "force"):
        found = complete_checkpoints(root)
        return found[-1][1] if found else None
    folder = Path(resume)
    if not is_complete(folder):
        what = "does not exist" if not folder.exists() else f"is not a complete checkpoint (no {MARKER} marker)"
        raise FileNotFoundError(f"resume_from_checkpoint={resume}: {folder} {what}; use latest or one of "
                                f"{[str(p) for _, p in complete_checkpoints(root)]}")
    return folder


def prune(root: Path, keep_last: int, current: Optional[str] = None) -> None:
    """Delete complete checkpoints older than the newest ``keep_last`` (0 keeps all) and every incomplete
    ``step-*`` folder (a save that was killed) except ``current``, the one being written now."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        if _TAG.match(p.name) and p.is_dir() and not is_complete(p) and p.name != current:
            shutil.rmtree(p, ignore_errors=True)
    if keep_last <= 0:
        return
    for _, folder in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(folder, ignore_errors=True)


def _safe_globals() -> list:
    """The plain value classes DeepSpeed's ZeRO optimizer state pickles (an int enum, a (start, numel)
    record, the loss scalers); nothing that runs code when rebuilt."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def scan(folder: Path) -> None:
    """Refuse, without unpickling anything, a ``*.pt`` file of ``folder`` that names a class outside
    ``_safe_globals()`` (a crafted pickle) or is not a torch zip checkpoint; cheap (reads the pickle opcodes)."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    allowed = {f"{c.__module__}.{c.__qualname__}" for c in _safe_globals()}
    for path in sorted(folder.rglob("*.pt")):
        try:
            unsafe = sorted(set(get_unsafe_globals_in_checkpoint(path)) - allowed)
        except (ValueError, RuntimeError, OSError) as err:
            raise CheckpointError(f"{path}: refused, not a torch checkpoint ({' '.join(str(err).split())[:120]}); "
                                  "delete its checkpoint folder to resume from an older one") from None
        if unsafe:
            raise CheckpointError(f"{path}: refused, it needs {', '.join(unsafe[:3])}, which a weights-only load "
                                  "does not allow; it was not written by this trainer or was changed since (delete "
                                  "its checkpoint folder to resume from an older one)")


def safe_torch_load(path: str, map_location=None):
    """``torch.load(weights_only=True)`` admitting only ``_safe_globals()``; a file needing anything else
    (a crafted pickle) raises CheckpointError naming the file, and nothing in it runs."""
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        found = re.search(r"(?:unsupported )?GLOBAL (\S+)", str(err))
        what = f"it needs {found.group(1)}, which a weights-only load does not allow" if found else \
            f"it does not load as weights ({' '.join(str(err).split())[:160]})"
        raise CheckpointError(f"{path}: refused, {what}; it was not written by this trainer or was changed since "
                              "(delete its checkpoint folder to resume from an older one)") from None


def make_loads_safe(engine) -> None:
    """Route every checkpoint read of a DeepSpeed ``engine`` through ``safe_torch_load``."""
    engine.checkpoint_engine.load = safe_torch_load
