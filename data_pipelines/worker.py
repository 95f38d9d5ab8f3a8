"""What runs in a worker process: load the face models once, then process inputs.

Kept apart from ``prepare`` so a worker imports only PIL, numpy, cv2 and onnxruntime
(not torch / webdataset): worker start-up stays short.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from .images import Skip, process_batch, process_item
from .sources import InputItem, tag_person, tag_url

WORKER_STATE: dict[str, Any] = {}  # per worker process: the analyzer and the ProcessSettings


def make_analyzer(cfg, threads: int | None):
    from accord_face.face import load_face_analyzer

    kwargs = {}
    if cfg.providers and cfg.providers.lower() != "cpu":  # only then: every backend runs on CPU by default
        kwargs["providers"] = cfg.providers
    return load_face_analyzer(cfg.backend, cfg.model_root, cfg.model_name, det_threshold=cfg.min_score,
                              threads=threads, **kwargs)


def _parent_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed parent that nobody has reaped yet is a zombie: dead too
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _exit_with_parent(pid: int, interval: float = 1.0) -> None:
    """Workers exit when the main process dies, even by SIGKILL (no orphans hold the CPU)."""
    def watch() -> None:
        while _parent_alive(pid):
            time.sleep(interval)
        os._exit(3)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def init_worker(cfg, parent_pid: int | None = None) -> None:
    if parent_pid:
        _exit_with_parent(parent_pid)
    WORKER_STATE["analyzer"] = make_analyzer(cfg, cfg.threads_per_worker)
    WORKER_STATE["settings"] = cfg.process_settings()


def work(item: InputItem) -> tuple[str, dict | Skip, dict]:
    """Read and process one input (bad input becomes a Skip, never an exception)."""
    t0 = time.perf_counter()
    if item.skip is not None:
        return item.source, item.skip, {}
    data = item.data
    if data is None:
        try:
            with open(item.path, "rb") as fh:
                data = fh.read()
        except OSError as err:
            return item.source, Skip("unreadable", f"{type(err).__name__}: {err}"), {}
    read = time.perf_counter() - t0
    try:
        result, times = process_item(data, item.caption, item.source, item.key, WORKER_STATE["settings"],
                                     WORKER_STATE["analyzer"])
    except Exception as err:  # a model / OpenCV failure on one odd image must not stop the run
        return item.source, Skip("analysis_error", f"{type(err).__name__}: {str(err)[:300]}"), {}
    times["decode"] = times.get("decode", 0.0) + read
    return item.source, tag_url(tag_person(result, item.person_id), item.url), times


def _read(item: InputItem) -> bytes | Skip:
    if item.data is not None:
        return item.data
    try:
        with open(item.path, "rb") as fh:
            return fh.read()
    except OSError as err:
        return Skip("unreadable", f"{type(err).__name__}: {err}")


def work_batch(items: list[InputItem]) -> list[tuple[str, dict | Skip, dict]]:
    """``work`` for several inputs, their face crops embedded as one recognizer batch.

    Same results as ``work`` on each item; if the batch raises, every item is redone alone so
    that only the photo at fault becomes an ``analysis_error``.
    """
    t0 = time.perf_counter()
    out: dict[int, tuple[str, dict | Skip, dict]] = {}
    entries, where = [], []
    for i, item in enumerate(items):
        data = item.skip if item.skip is not None else _read(item)
        if isinstance(data, Skip):
            out[i] = (item.source, data, {})
        else:
            entries.append((data, item.caption, item.source, item.key))
            where.append(i)
    read = (time.perf_counter() - t0) / max(1, len(entries))
    try:
        results = process_batch(entries, WORKER_STATE["settings"], WORKER_STATE["analyzer"])
    except Exception:  # noqa: BLE001 - find the one photo at fault
        results = None
    for j, i in enumerate(where):
        if results is None:
            out[i] = work(items[i])
            continue
        result, times = results[j]
        times["decode"] = times.get("decode", 0.0) + read
        out[i] = (items[i].source, tag_url(tag_person(result, items[i].person_id), items[i].url), times)
    return [out[i] for i in range(len(items))]
