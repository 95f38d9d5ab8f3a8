"""What keeps a training run safe from its surroundings: the output-folder lock, orphan ranks,
the rendezvous port, stop signals, the resume-config check and crash-safe JSON lines.

- ``OutputLock``: ``OUTPUT/.lock`` held with ``flock`` by rank 0 for the whole run; a second run in
  the same folder stops at once with one line (two runs used to interleave their metric rows).
- ``watch_launcher``: a daemon thread that ends a rank when the launcher that started it dies
  (SIGKILL of ``torchrun``/``deepspeed`` used to leave the ranks training to the end).
- ``free_port`` / ``port_in_use_line``: a free port to suggest when a launcher's rendezvous port is taken
  (a lone process needs none: ``loop._init_distributed`` gives it an in-process store).
- ``StopFlag``: SIGTERM/SIGINT ask the loop to checkpoint and leave at the next step boundary.
- ``config_changes``: the keys that differ between the stored run config and the new one.
- ``json_line`` / ``truncate_jsonl``: no bare NaN in JSON lines; replayed steps replace their rows.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Optional

from ..config import ConfigError

log = logging.getLogger("accord_face.train")

__all__ = ["OutputLock", "watch_launcher", "free_port", "port_in_use_line", "StopFlag", "config_changes",
           "RESUMABLE_CHANGES", "json_line", "truncate_jsonl", "atomic_write_text"]


# ---------------------------------------------------------------- output folder
class OutputLock:
    """An exclusive ``flock`` on ``folder/.lock`` (released by the kernel when the process dies)."""

    def __init__(self, folder: Path):
        import fcntl

        self.path = folder / ".lock"
        self._fh = open(self.path, "a+")
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.seek(0)
            owner = self._fh.read().strip() or "unknown"
            self._fh.close()
            raise ConfigError(f"'output_dir': {folder} is in use by another run (pid {owner}); wait for it to end "
                              "or pick another output_dir") from None
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(str(os.getpid()))
        self._fh.flush()

    def release(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def check_output_dir(folder: Path) -> None:
    """Create ``folder`` (and parents) or raise ConfigError naming it; then check it is writable."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"'output_dir': {folder} cannot be created: it or a parent is a file; pick a folder "
                          "path") from None
    except PermissionError:
        raise ConfigError(f"'output_dir': no permission to create {folder}; pick a writable place") from None
    if not folder.is_dir():
        raise ConfigError(f"'output_dir': {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"'output_dir': {folder} is not writable; fix its permissions or pick another folder")


# ---------------------------------------------------------------- ranks and launchers
_LAUNCHERS = ("torch.distributed.run", "torchrun", "deepspeed", "torch.distributed.launch", "accelerate")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ppid_of(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not reaped, counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def launcher_chain(pid: Optional[int] = None) -> list[int]:
    """The ancestors of ``pid`` (default: this process) that are launcher processes, nearest first."""
    chain, current = [], _ppid_of(pid or os.getpid())
    while current > 1 and any(name in _cmdline(current) for name in _LAUNCHERS):
        chain.append(current)
        current = _ppid_of(current)
    return chain


def watch_launcher(interval: float = 1.0) -> Optional[threading.Thread]:
    """Start a daemon thread that kills this rank when any launcher above it dies (no-op without one)."""
    if not Path("/proc").is_dir():
        return None
    parent, chain = os.getppid(), launcher_chain()
    if not chain:
        return None

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent or not all(_alive(p) for p in chain):
                log.error("the launcher (pid %s) is gone: this rank stops (rerun the command to resume)", chain)
                os._exit(1)

    thread = threading.Thread(target=watch, name="launcher-watch", daemon=True)
    thread.start()
    return thread


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use_line(addr: str, port: str | int) -> str:
    """The one line for a launcher whose rendezvous port is taken (another run on this machine)."""
    return (f"rendezvous port {addr}:{port} is in use (another run on this machine?): start the launcher with "
            f"another port, e.g. --master_port {free_port()} (deepspeed / torchrun), or set MASTER_PORT")


# ---------------------------------------------------------------- signals
class StopFlag:
    """SIGTERM/SIGINT set ``requested``; a second signal restores the default action (leave now)."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.requested: Optional[str] = None
        self._old = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in signals:
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name
        log.warning("%s received: checkpointing at the end of this step, then stopping (send it again to stop "
                    "at once)", self.requested)
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------- resume config
# Keys that may change between a run and its resume: how long, how often, what is logged, where, and cost
# knobs that leave the math alone (the latent cache keeps the per-step draws).
RESUMABLE_CHANGES = ("max_steps", "output_dir", "pretrained_model_path", "export_format", "checkpointing.",
                     "logging.", "validation.", "debug.", "data.latent_cache_mb")


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def config_changes(stored: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every key outside ``RESUMABLE_CHANGES`` that differs."""
    a, b = _flatten(stored), _flatten(new)
    changes = []
    for key in sorted(set(a) | set(b)):
        if any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE_CHANGES):
            continue
        if a.get(key) != b.get(key):
            changes.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return changes


# ---------------------------------------------------------------- JSON lines
def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def json_line(row: dict) -> str:
    """One strict-JSON line: NaN/inf become null (``json.dumps`` would write bare ``NaN``)."""
    return json.dumps(_finite(row), allow_nan=False) + "\n"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def truncate_jsonl(path: Path, last_step: int) -> int:
    """Drop rows with ``step > last_step`` (the steps a resume replays) and unparsable tail lines;
    returns how many rows were dropped. Written atomically."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1  # a line cut by a kill
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > last_step:
            dropped += 1
            continue
        kept.append(line + "\n")
    if dropped:
        atomic_write_text(path, "".join(kept))
    return dropped
