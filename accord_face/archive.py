"""A committed copy of an experiment's small per-run files, so that a fresh checkout resumes it.

Experiments keep their working files in an ignored folder (``testbed_out/...``); what a finished run
leaves that the analysis needs (its records, metrics, the calibration) is also gzipped into a folder
under ``docs/`` that is committed. On start the experiment restores what its working folder lacks,
so a new session reuses every finished run instead of training it again.

Both directions are atomic per file (temp file + rename, the temp name carries the pid, because
several processes of one experiment may archive at once) and only copy what changed.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["save", "restore", "ignored_by_git"]


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def save(out: Path, archive: Path, files: Iterable[Path]) -> int:
    """Gzip each of ``files`` (paths under ``out``) to ``archive/<relative path>.gz``.

    Files that do not exist are skipped; an archived copy with the same content is left alone.
    Returns the number of files written."""
    n = 0
    for f in files:
        if not f.is_file():
            continue
        dest = archive / f"{f.relative_to(out)}.gz"
        data = f.read_bytes()
        if dest.is_file() and gzip.decompress(dest.read_bytes()) == data:
            continue
        _write_atomic(dest, gzip.compress(data, mtime=0))
        n += 1
    return n


def restore(out: Path, archive: Path) -> int:
    """Un-gzip every ``archive/**/*.gz`` whose counterpart under ``out`` is missing. Returns the count."""
    if not archive.is_dir():
        return 0
    n = 0
    for f in sorted(archive.rglob("*.gz")):
        dest = out / f.relative_to(archive).with_suffix("")
        if dest.exists():
            continue
        _write_atomic(dest, gzip.decompress(f.read_bytes()))
        n += 1
    return n


def ignored_by_git(path: Path) -> bool:
    """True when git would ignore ``path`` (an archive that git ignores is lost with the checkout).

    False outside a git checkout or without git."""
    import subprocess

    path = path.absolute()
    cwd = next(p for p in path.parents if p.is_dir())
    try:
        r = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=cwd, capture_output=True)
    except OSError:
        return False
    return r.returncode == 0
