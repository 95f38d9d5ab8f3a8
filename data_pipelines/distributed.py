"""``--distributor ray``: partitions (``partitions.py``) as Ray tasks, then one merge.

Each task runs ``run_partition`` in a Ray worker process; the face models load once per worker
process (kept in ``worker.WORKER_STATE`` across the tasks that process runs), not per image or per
partition. A task whose worker dies is retried ``ray_retries`` times and resumes from the
partition's last committed shard; a partition that still fails leaves its committed shards and the
other partitions' work in place, and the run ends with ``PartitionFailure`` (rerun to finish).
The driver keeps at most two partitions per worker in flight (bounded memory for any input size),
shows one progress bar fed by a counter actor, and finally merges the partition journals into
``manifest.json`` and ``skipped.jsonl``.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from accord_face.config import ConfigError

from .journal import JOURNAL, SettingsMismatch, atomic_write_text
from .partitions import (JOB_FILE, PARTITIONS_DIR, Partition, inputs_changed, partition_journals,
                         plan_partitions, read_partition)
from .progress import JobProgress

log = logging.getLogger(__name__)


class PartitionFailure(RuntimeError):
    """Some partitions failed after their retries; committed work is kept and a rerun resumes them."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--distributor ray needs Ray, an optional extra: pip install -e '.[ray]' "
                          "(or use --distributor local)") from None
    return ray


# ---------------------------------------------------------------- in the Ray worker
def _partition_task(cfg, part: Partition, progress) -> dict[str, Any]:
    from .partitions import run_partition
    from .worker import WORKER_STATE, init_worker, work_batch

    key = (cfg.backend, cfg.model_root, cfg.model_name, cfg.min_score, cfg.threads_per_worker, cfg.providers,
           json.dumps(cfg.output_settings(), sort_keys=True))
    if WORKER_STATE.get("key") != key:  # models load once per worker process
        init_worker(cfg)
        WORKER_STATE["key"] = key

    def report(kept: int, skipped: dict[str, int]) -> None:
        progress.add.remote(kept, skipped)

    return run_partition(cfg.output, cfg.prefix, cfg.shard_size, cfg.output_settings(), part, work_batch,
                         cfg.batch_size, report=report)


class _Counter:
    """Cluster-wide progress: partition tasks add to it, the driver reads it."""

    def __init__(self):
        self.kept, self.skipped = 0, collections.Counter()

    def add(self, kept: int, skipped: dict[str, int]) -> None:
        self.kept += kept
        self.skipped.update(skipped)

    def snapshot(self) -> tuple[int, dict[str, int]]:
        return self.kept, dict(self.skipped)


# ---------------------------------------------------------------- driver
def _check_job(cfg) -> None:
    """Same settings as the run that started this folder (else refuse), recorded on the first run."""
    out = Path(cfg.output)
    if (out / JOURNAL).exists():
        raise SettingsMismatch(f"{out} was prepared with --distributor local ({JOURNAL}): rerun it with "
                               "--distributor local, or use a new --output folder")
    job = {"settings": cfg.output_settings(), "partition_size": cfg.partition_size}
    path = out / PARTITIONS_DIR / JOB_FILE
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != job:
            diff = sorted(k for k in set(old["settings"]) | set(job["settings"])
                          if old["settings"].get(k) != job["settings"].get(k))
            if old.get("partition_size") != job["partition_size"]:
                diff.append("partition_size")
            raise SettingsMismatch(f"{out} was started with different settings ({', '.join(diff)}); rerun with "
                                   "the same options to resume, or use a new --output folder")
        return
    foreign = sorted(out.glob(f"{cfg.prefix}-*.tar")) if out.is_dir() else []
    if foreign:
        raise SettingsMismatch(f"{out} already holds {foreign[0].name} (and maybe more) but no "
                               f"{PARTITIONS_DIR}/{JOB_FILE}: choose an empty --output folder or another --prefix")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(job, indent=2) + "\n")


def _init_ray(ray, cfg) -> bool:
    """Join ``cfg.ray_address`` or start a local Ray with this machine's cores; True if we started it."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if cfg.ray_address:
        ray.init(address=cfg.ray_address, **kwargs)
    else:  # small object store: tasks exchange only partition lists and counts
        ray.init(num_cpus=os.cpu_count(), object_store_memory=256 * 1024 ** 2, **kwargs)
    return True


def prepare_shards_ray(cfg, analyzer) -> dict[str, Any]:
    """The Ray run of ``prepare.prepare_shards`` (same outputs); returns the same summary keys."""
    from .prepare import input_plan, write_manifest

    import dataclasses

    ray = import_ray()
    start = time.perf_counter()
    # Workers may run in another directory (or machine, over a shared file system): absolute paths.
    local_input = cfg.input != "embedded" and "://" not in cfg.input
    cfg = dataclasses.replace(cfg, output=os.path.abspath(cfg.output),
                              input=os.path.abspath(cfg.input) if local_input else cfg.input,
                              model_root=os.path.abspath(cfg.model_root) if cfg.model_root else None)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    _check_job(cfg)
    shard_urls, items = input_plan(cfg)
    before = {p.stem: read_partition(p) for p in partition_journals(out)}
    done_before = {name for name, info in before.items() if info["complete"]}
    resumed = sum(info["inputs"] for info in before.values())
    results, failures = [], []
    run_now, started = 0, False
    bar = JobProgress(cfg.progress)
    try:
        pending: dict[Any, Partition] = {}
        ray_state: dict[str, Any] = {}

        def submit(part: Partition) -> None:
            nonlocal started
            if not ray_state:  # Ray starts with the first partition left to do (a finished job needs none)
                started = _init_ray(ray, cfg)
                cpus = int(ray.cluster_resources().get("CPU", 1) // max(1, cfg.threads_per_worker))
                ray_state["parallel"] = cfg.workers or max(1, cpus)
                ray_state["task"] = ray.remote(_partition_task).options(num_cpus=cfg.threads_per_worker,
                                                                        max_retries=cfg.ray_retries)
                ray_state["counter"] = ray.remote(num_cpus=0)(_Counter).remote()
            pending[ray_state["task"].remote(cfg, part, ray_state["counter"])] = part

        def drain(block_until: int) -> None:
            while len(pending) > block_until:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                bar.set_totals(*ray.get(ray_state["counter"].snapshot.remote()))
                for ref in ready:
                    part = pending.pop(ref)
                    try:
                        results.append(ray.get(ref))
                    except Exception as err:  # noqa: BLE001 - a dead worker or a failing partition
                        text = str(err).strip()
                        first = text.splitlines()[0] if text else type(err).__name__
                        failures.append(f"{part.name}: {type(err).__name__}: {first[:300]}")
                        log.error("partition %s failed: %s", part.name, first)

        for part in plan_partitions(shard_urls, items, cfg.partition_size):
            if part.name in before and before[part.name]["fingerprint"] != part.fingerprint():
                raise inputs_changed(out, part)  # a shifted folder listing would re-run inputs done elsewhere
            if part.name in done_before:
                continue
            submit(part)
            run_now += 1
            drain(2 * ray_state["parallel"])
        drain(0)
    finally:
        bar.close()
        if started:
            ray.shutdown()
    if failures:
        raise PartitionFailure(f"{len(failures)} partition(s) failed: {'; '.join(failures[:5])} "
                               "(committed shards are kept: rerun the same command to finish them)")

    from .partitions import merge_partitions

    shards, skip_counts = merge_partitions(out)
    manifest = write_manifest(cfg, shards, skip_counts, analyzer.describe())
    counts: collections.Counter = collections.Counter()
    times: collections.Counter = collections.Counter()
    for r in results:
        counts.update(r["counts"])
        times.update(r["stage_seconds"])
    processed = sum(counts.values())
    elapsed = time.perf_counter() - start
    return {
        "output": str(cfg.output),
        "processed_now": processed,
        "resumed_inputs": resumed,
        "kept_now": counts["kept"],
        "skipped_now": {k: v for k, v in counts.items() if k != "kept"},
        "num_samples": manifest["num_samples"],
        "num_shards": len(manifest["shards"]),
        "num_skipped": manifest["num_skipped"],
        "seconds": round(elapsed, 3),
        "images_per_second": round(processed / elapsed, 3) if elapsed > 0 else None,
        "stage_seconds": {k: round(v, 4) for k, v in times.items()},
        "partitions": {"done_before": len(done_before), "run_now": run_now},
    }
