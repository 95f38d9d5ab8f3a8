"""Which exceptions of a training run are the user's to fix, and the one line that says so.

``user_error(err)`` returns that line (path + cause + what to do) or None for a genuine bug, whose
traceback the caller should show. Disk full, quota, read-only or unwritable places, refused
checkpoints and unusable data are the user's to fix.
"""

from __future__ import annotations

import errno
from typing import Optional

__all__ = ["user_error", "disk_error", "DISK_ERRNOS"]

DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EFBIG: "the file is larger than allowed (ulimit -f?)", errno.EROFS: "the file system is read-only",
               errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
               errno.ENOTDIR: "a part of the path is a file, not a folder", errno.EISDIR: "the path is a folder"}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _errno_of(err: BaseException) -> Optional[int]:
    """The errno of ``err`` or of what caused it; also from messages of wrapped C++/Rust writers."""
    seen = 0
    while err is not None and seen < 5:
        if isinstance(err, OSError) and err.errno is not None:
            return err.errno
        text = str(err)
        for code, name in ((errno.ENOSPC, "No space left on device"), (errno.EFBIG, "File too large"),
                           (errno.EDQUOT, "Disk quota exceeded"), (errno.EROFS, "Read-only file system")):
            if name in text:
                return code
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def user_error(err: BaseException) -> Optional[str]:
    """One line for an error the user can fix, else None."""
    from ..config import ConfigError
    from .checkpoint import CheckpointError

    if isinstance(err, (ConfigError, CheckpointError)):
        return _one_line(err)
    return disk_error(err)


def disk_error(err: BaseException, resumes: str = "the last complete checkpoint",
               output: str = "output_dir") -> Optional[str]:
    """One line for a disk-full / quota / ``ulimit -f`` / permission error (path, cause, fix), else None.

    ``resumes``: what the rerun continues from; ``output``: the flag or key naming the output folder."""
    code = _errno_of(err)
    if code not in DISK_ERRNOS:
        return None
    where = getattr(err, "filename", None)
    fix = f"free space (or raise the limit) and rerun the same command: it resumes from {resumes}" \
        if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else \
        "pick a folder path whose parents are folders" if code in (errno.ENOTDIR, errno.EISDIR) else \
        f"make the output folder writable or pick another {output}"
    return _one_line(f"{str(where) + ': ' if where else ''}{DISK_ERRNOS[code]} ({type(err).__name__}: "
                     f"{str(err)[:200]}); {fix}")
