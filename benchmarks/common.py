"""Helpers shared by the benchmarks: paired ratios, machine load, CPU heap peak, atomic writes.

Every figure the benchmarks report is a ratio measured in one run: the variants
run interleaved (round-robin) on the same machine state, each round gives one
variant/baseline ratio, and the median over rounds is reported with its spread
(min, max), plus the load average before and after.
"""

from __future__ import annotations

import ctypes
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence


def load_average() -> list[float]:
    """1, 5, 15 minute load averages (what else the machine was doing), rounded."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not on every platform
        return []


def machine() -> dict[str, Any]:
    import platform

    import torch

    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "load_average": load_average()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def summary(values: Sequence[float]) -> dict[str, float]:
    """median, min, max and n of a list of measurements."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("summary of no measurements")
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def paired_ratios(variant: Sequence[float], baseline: Sequence[float]) -> dict[str, float]:
    """summary of variant[r] / baseline[r] over rounds r (each pair measured back to back)."""
    if len(variant) != len(baseline):
        raise ValueError(f"{len(variant)} variant rounds vs {len(baseline)} baseline rounds")
    return summary([v / b for v, b in zip(variant, baseline)])


class HeapPeak:
    """Peak bytes in use by malloc (glibc mallinfo2: arenas + mmapped chunks) while active (CPU).

    Unlike RSS, this falls when tensors are freed, so variants measured one
    after another in one process do not inherit each other's peaks. Sampled
    every ``interval`` seconds from a daemon thread; ``peak`` is None off glibc.
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.start = self.peak = None

    def __enter__(self):
        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                        "fsmblks", "uordblks", "fordblks", "keepcost")]
        try:
            self._fn = ctypes.CDLL("libc.so.6").mallinfo2
        except (OSError, AttributeError):
            self._fn = None
            return self
        self._fn.restype = MallInfo2
        self.start = self.peak = self._in_use()
        self._stop = False
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _in_use(self) -> int:
        m = self._fn()
        return m.uordblks + m.hblkhd

    def _poll(self):
        while not self._stop:
            self.peak = max(self.peak, self._in_use())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        if self._fn is not None:
            self._stop = True
            self._t.join()
            self.peak = max(self.peak, self._in_use())


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON next to ``path`` and rename over it: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
