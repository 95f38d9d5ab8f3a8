"""Checks of user input that run before any model loads: paths, devices, hub reachability, spelling.

Each check raises ``UsageError`` with one line that names the flag (or key), the cause and
the fix; the command-line entry points print it and exit with status 2.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Iterable, Optional

__all__ = ["UsageError", "did_you_mean", "check_adapter_dir", "check_lora_dir", "check_photo", "check_folder",
           "check_file", "check_device", "check_hub_reachable", "check_safetensors", "check_weight_files",
           "ADAPTER_WEIGHTS", "LORA_WEIGHTS"]

ADAPTER_WEIGHTS = "ip_adapter.safetensors"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


class UsageError(ValueError):
    """Bad user input (message: one line naming flag, cause and fix)."""


def did_you_mean(word: str, choices: Iterable[str], cutoff: float = 0.6) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` (difflib ratio >= cutoff), else ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _missing(path: Path, flag: str, what: str) -> UsageError:
    parent = path.parent
    close = []
    if parent.is_dir():
        close = difflib.get_close_matches(path.name, [q.name for q in parent.iterdir() if not q.name.startswith(".")],
                                          n=1, cutoff=0.6)
    hint = f" (did you mean {parent / close[0]}?)" if close else ""
    return UsageError(f"{flag} {path}: no such {what}{hint}")


def check_adapter_dir(path: str | os.PathLike, flag: str = "--adapter") -> Path:
    """An exported identity-adapter folder; names the likely mistake (file, run folder, LoRA folder)."""
    p = Path(path)
    if p.is_file():
        raise UsageError(f"{flag} {p} is a file; pass the folder that holds it: {flag} {p.parent}")
    if not p.exists():
        raise _missing(p, flag, "adapter folder")
    if (p / ADAPTER_WEIGHTS).is_file():
        return p
    if (p / "adapter" / ADAPTER_WEIGHTS).is_file():
        raise UsageError(f"{flag} {p} is a training run folder; did you mean {flag} {p / 'adapter'}?")
    if (p / LORA_WEIGHTS).is_file() or (p / "lora" / LORA_WEIGHTS).is_file():
        lora = p if (p / LORA_WEIGHTS).is_file() else p / "lora"
        raise UsageError(f"{flag} {p} holds a LoRA, not an identity adapter; pass it as --lora {lora}")
    raise UsageError(f"{flag} {p} has no {ADAPTER_WEIGHTS}; pass the trainer's OUTPUT/adapter folder")


def check_lora_dir(path: str | os.PathLike, flag: str = "--lora") -> Path:
    """An exported LoRA folder (``pytorch_lora_weights.safetensors``)."""
    p = Path(path)
    if p.is_file():
        raise UsageError(f"{flag} {p} is a file; pass the folder that holds it: {flag} {p.parent}")
    if not p.exists():
        raise _missing(p, flag, "LoRA folder")
    if (p / LORA_WEIGHTS).is_file():
        return p
    if (p / "lora" / LORA_WEIGHTS).is_file():
        raise UsageError(f"{flag} {p} is a training run folder; did you mean {flag} {p / 'lora'}?")
    if (p / ADAPTER_WEIGHTS).is_file() or (p / "adapter" / ADAPTER_WEIGHTS).is_file():
        raise UsageError(f"{flag} {p} holds an identity adapter, not a LoRA; pass it as --adapter")
    raise UsageError(f"{flag} {p} has no {LORA_WEIGHTS}; pass the LoRA trainer's OUTPUT/lora folder")


def check_photo(path: str | os.PathLike, flag: str = "--face", suffixes: tuple[str, ...] = ()) -> Path:
    """A photo file; a folder gets the hint to name its files."""
    p = Path(path)
    if p.is_dir():
        first = next((q for q in sorted(p.iterdir()) if q.suffix.lower() in suffixes), None)
        example = f" (e.g. {flag} {first})" if first else ""
        raise UsageError(f"{flag} {p} is a folder; {flag} takes photo files, one flag per photo{example}")
    if not p.is_file():
        raise _missing(p, flag, "photo")
    return p


def check_folder(path: str | os.PathLike, flag: str, what: str) -> Path:
    """A folder; a file gets ``what`` explained."""
    p = Path(path)
    if p.is_file():
        raise UsageError(f"{flag} {p} is a file; {flag} takes {what}")
    if not p.is_dir():
        raise _missing(p, flag, "folder")
    return p


def check_file(path: str | os.PathLike, flag: str, what: str) -> Path:
    """A file; a folder gets ``what`` explained."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {p} is a folder; {flag} takes {what}")
    if not p.is_file():
        raise _missing(p, flag, "file")
    return p


def check_device(device: Optional[str], flag: str = "--device") -> None:
    """A torch device this build can use (cuda on a CPU-only torch is the common mistake)."""
    if not device or device == "cpu":
        return
    import torch

    kind = device.split(":")[0]
    if kind == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no GPU is visible"
            raise UsageError(f"{flag} {device}: this torch ({torch.__version__}) is {build}; use {flag} cpu, or install "
                             "the CUDA build of the same torch (README, Install)")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {device}: only {torch.cuda.device_count()} GPU(s) visible; use cuda:0 .. "
                             f"cuda:{torch.cuda.device_count() - 1}")
    elif kind == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UsageError(f"{flag} {device}: MPS is not available here; use {flag} cpu")
    elif kind not in ("cpu", "xpu", "meta"):
        raise UsageError(f"{flag} {device}: not a torch device{did_you_mean(kind, ['cpu', 'cuda', 'mps'])}")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_hub_reachable(name: str, flag: str, probe: str = "model_index.json", subfolder: str = "") -> None:
    """``name`` is a local folder, an embedded model, or a hub id that is cached or reachable.

    Offline (``HF_HUB_OFFLINE=1``), an uncached hub id cannot load: say so now instead of
    after loading everything else. ``probe`` is a file every such model has.
    """
    if not name or name in ("none", "auto") or name.startswith("embedded:"):
        return
    p = Path(name)
    if p.exists():
        if p.is_file():
            raise UsageError(f"{flag} {name} is a file; pass a model folder or hub id")
        return
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise _missing(p, flag, "model folder (nor a hub id <owner>/<name>)")
    if not _offline():
        return
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, f"{subfolder}/{probe}" if subfolder else probe)
    if not isinstance(cached, str):
        raise UsageError(f"{flag} {name}: not a local folder and not in the hub cache, and HF_HUB_OFFLINE=1 forbids "
                         "downloading it; pass a local folder, or run once with network access (unset HF_HUB_OFFLINE)")


def check_safetensors(path: str | os.PathLike, fix: str, digest: Optional[dict] = None) -> Path:
    """A complete, readable safetensors file: header parsed, every tensor's bytes present (safetensors checks
    the header against the file size), and the recorded ``{"size", "sha256"}`` matched when there is one.

    ``fix`` ends the message (how to get a good file back)."""
    p = Path(path)
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            list(f.keys())
    except OSError as err:
        raise UsageError(f"{p}: cannot be read ({err.strerror or err}); {fix}") from None
    except Exception as err:  # noqa: BLE001  (safetensors' SafetensorError is not an OSError)
        why = " ".join(str(err).split()).removeprefix("Error while deserializing header: ")
        raise UsageError(f"{p} is truncated or corrupt (not a complete safetensors file: {why}); {fix}") from None
    if digest:
        from .fingerprint import file_digest

        size = p.stat().st_size
        if digest.get("size") not in (None, size):
            raise UsageError(f"{p} is {size} bytes, but {digest['size']} were exported (truncated or replaced); {fix}")
        if digest.get("sha256") and file_digest(p)["sha256"] != digest["sha256"]:
            raise UsageError(f"{p} differs from the exported file (sha256 mismatch: corrupt or modified); {fix}")
    return p


def check_weight_files(folder: str | os.PathLike, names: Iterable[str], recorded: Optional[dict], fix: str) -> None:
    """``check_safetensors`` for each of ``names`` present in ``folder`` (``recorded``: the export's ``files``)."""
    for name in names:
        p = Path(folder) / name
        if p.is_file():
            check_safetensors(p, fix, (recorded or {}).get(name))
