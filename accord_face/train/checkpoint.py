"""Checkpoint folders: naming, the completeness marker, picking the newest complete one, pruning.

A checkpoint is ``OUTPUT/checkpoints/step-00000042/`` written by
``engine.save_checkpoint`` (every rank writes its part). Only after every rank
has finished does rank 0 write ``COMPLETE`` (temp name + rename). ``--resume
auto`` only considers folders holding that marker, so a run killed mid-save is
never resumed from a half-written checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Optional

__all__ = ["tag_for", "mark_complete", "is_complete", "complete_checkpoints", "find_resume", "prune"]

MARKER = "COMPLETE"
_TAG = re.compile(r"^step-(\d{8})$")


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def mark_complete(folder: Path, info: dict) -> None:
    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(folder / MARKER)


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _TAG.match(p.name)) and is_complete(p)]
    return sorted(found)


def find_resume(root: Path, resume: str) -> Optional[Path]:
    """``auto``: newest complete checkpoint or None; ``none``: None; else that folder (must be complete)."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(root)
        return found[-1][1] if found else None
    folder = Path(resume)
    if not is_complete(folder):
        raise FileNotFoundError(f"resume={resume}: {folder} is not a complete checkpoint (no {MARKER} marker); "
                                f"use resume=auto or one of {[str(p) for _, p in complete_checkpoints(root)]}")
    return folder


def prune(root: Path, keep_last: int) -> None:
    """Delete complete checkpoints older than the newest ``keep_last`` (0 keeps all)."""
    if keep_last <= 0:
        return
    for _, folder in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(folder, ignore_errors=True)
