"""Partitions: the unit of work of a distributed run (``--distributor ray``), with no Ray in here.

A partition is either one input shard (a tar, enumerated where it runs) or ``partition_size``
consecutive photos of a folder input. Partition ``i`` writes ``<prefix>-p<i:06d>-<n:06d>.tar``
into the output folder through its own ``ShardJournal`` (``.partitions/p<i:06d>.jsonl``): temp
name, fsync, rename, journal, exactly as a local run. Its journal's settings line holds the run's
settings plus a fingerprint of its inputs, so a rerun resumes a partition only on the same inputs.
A last ``{"complete": true}`` line marks it done; a rerun skips it without opening anything.
``merge_partitions`` then gathers every journal into the shard list, skip counts and skipped.jsonl.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .images import Skip
from .journal import ShardJournal, SettingsMismatch, _fsync_dir
from .sources import InputItem, iter_shards

PARTITIONS_DIR = ".partitions"
JOB_FILE = "job.json"


@dataclass
class Partition:
    index: int
    shard_url: str | None = None  # one input shard, read where the partition runs
    items: list[InputItem] = field(default_factory=list)  # or the photos of a folder chunk (paths, captions)

    @property
    def name(self) -> str:
        return f"p{self.index:06d}"

    def fingerprint(self) -> str:
        """sha1 of what the partition reads: the shard url, or its photos' sources and captions."""
        digest = hashlib.sha1()
        if self.shard_url is not None:
            digest.update(f"shard\0{self.shard_url}".encode())
        for item in self.items:
            digest.update(f"{item.source}\0{item.caption or ''}\n".encode())
        return digest.hexdigest()

    def inputs(self) -> Iterator[InputItem]:
        return iter_shards([self.shard_url]) if self.shard_url is not None else iter(self.items)


def plan_partitions(shard_urls: list[str] | None, items: Iterator[InputItem] | None,
                    partition_size: int) -> Iterator[Partition]:
    """One partition per input shard, or chunks of ``partition_size`` photos (in input order), lazily."""
    if shard_urls is not None:
        for i, url in enumerate(shard_urls):
            yield Partition(i, shard_url=url)
        return
    chunk: list[InputItem] = []
    index = 0
    for item in items or ():
        chunk.append(item)
        if len(chunk) == partition_size:
            yield Partition(index, items=chunk)
            index, chunk = index + 1, []
    if chunk:
        yield Partition(index, items=chunk)


def open_partition(outdir: str | os.PathLike, prefix: str, shard_size: int, settings: dict[str, Any],
                   part: Partition) -> ShardJournal:
    try:
        return ShardJournal(outdir, f"{prefix}-{part.name}", shard_size,
                            {**settings, "partition": part.index, "partition_inputs": part.fingerprint()},
                            journal=f"{PARTITIONS_DIR}/{part.name}.jsonl")
    except SettingsMismatch as err:
        if "partition_inputs" in str(err):
            raise inputs_changed(outdir, part) from None
        raise


def inputs_changed(outdir: str | os.PathLike, part: Partition) -> SettingsMismatch:
    return SettingsMismatch(f"partition {part.name} of {outdir} was started on other inputs (files added, removed "
                            "or re-captioned since the first run): rerun on the same inputs, or use a new --output "
                            "folder")


def run_partition(outdir: str | os.PathLike, prefix: str, shard_size: int, settings: dict[str, Any],
                  part: Partition, work_batch: Callable[[list[InputItem]], list[tuple]], batch_size: int,
                  report: Callable[[int, dict[str, int]], None] | None = None,
                  max_failures: int = 50) -> dict[str, Any]:
    """Process one partition (resuming its journal) and mark it complete; returns its counts.

    ``report(kept, skipped_by_reason)``: called after each batch with what it added (progress).
    ``max_failures`` analysis errors in a row raise RuntimeError (broken models, not bad photos).
    """
    from .prepare import batched  # prepare imports tqdm/webdataset lazily enough; keeps one batching helper

    journal = open_partition(outdir, prefix, shard_size, settings, part)
    counts: collections.Counter = collections.Counter()
    times: collections.Counter = collections.Counter()
    if journal.complete:
        return {"partition": part.index, "already_done": True, "counts": {}, "stage_seconds": {}}
    failures = 0
    for batch in batched(ShardJournal.iter_pending(part.inputs(), journal.done), batch_size):
        added: collections.Counter = collections.Counter()
        for source, result, item_times in work_batch(batch):
            times.update(item_times)
            if isinstance(result, Skip):
                journal.add_skip(source, result.reason, result.detail)
                added[result.reason] += 1
                failures = failures + 1 if result.reason == "analysis_error" else 0
                if failures >= max_failures:
                    journal.finish()  # keep what is done
                    raise RuntimeError(f"partition {part.name}: face analysis failed on {failures} inputs in a row "
                                       f"(last: {source}: {result.detail}); check the models")
            else:
                journal.add_sample(source, result)
                added["kept"] += 1
                failures = 0
        counts.update(added)
        if report is not None:
            report(added.pop("kept", 0), dict(added))
    journal.mark_complete()
    return {"partition": part.index, "already_done": False, "counts": dict(counts),
            "stage_seconds": dict(times)}


def partition_journals(outdir: str | os.PathLike) -> list[Path]:
    folder = Path(outdir) / PARTITIONS_DIR
    return sorted(folder.glob("p[0-9]*.jsonl")) if folder.is_dir() else []


def read_partition(path: Path) -> dict[str, Any]:
    """A partition journal's committed shards, done inputs, skip counts and completeness (torn tail ignored)."""
    out: dict[str, Any] = {"shards": [], "inputs": 0, "skip_counts": collections.Counter(), "complete": False,
                           "fingerprint": None}
    with open(path, "rb") as fh:
        try:
            out["fingerprint"] = json.loads(next(fh, b"{}")).get("settings", {}).get("partition_inputs")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            pass
        for raw in fh:
            try:
                rec = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            out["complete"] = out["complete"] or bool(rec.get("complete"))
            if rec.get("shard"):
                out["shards"].append(rec["shard"])
            out["inputs"] += len(rec.get("inputs", []))
            out["skip_counts"].update(s["reason"] for s in rec.get("skipped", []))
    return out


def merge_partitions(outdir: str | os.PathLike) -> tuple[list[dict], collections.Counter]:
    """Every partition's shards (by name) and skip counts; writes ``skipped.jsonl`` (streamed, atomic)."""
    outdir = Path(outdir)
    shards: list[dict] = []
    counts: collections.Counter = collections.Counter()
    report, tmp = outdir / "skipped.jsonl", outdir / ".skipped.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as dst:
        for path in partition_journals(outdir):
            part = read_partition(path)
            shards.extend(part["shards"])
            counts.update(part["skip_counts"])
            with open(path, "rb") as src:
                next(src, None)
                for raw in src:
                    try:
                        rec = json.loads(raw)
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        break
                    for skip in rec.get("skipped", []):
                        dst.write(json.dumps(skip) + "\n")
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, report)
    _fsync_dir(outdir)
    return sorted(shards, key=lambda s: s["name"]), counts
