#!/usr/bin/env python
"""Training-side loader throughput: samples/s and samples per CPU-second vs DataLoader workers.

    python -m benchmarks.bench_loader [--samples 256] [--resolution 512] [--workers 0 1 2] [--rounds 3]

Shards hold the embedded public-domain portraits (re-photos included), centre-cropped
and stored at --stored px as ``prepare_shards`` writes them (JPEG q95, 128-d embedding).
Each measurement reads every sample once through the trainer's own path
(``accord_face.data.build_dataset`` -> DataLoader(collate)): shard read, JPEG decode,
resize to --resolution, to tensor, collate; with uint8 pixels (the trainer's setting:
[-1, 1] happens on the training device) and, for comparison, float32 pixels. Worker counts run interleaved for
--rounds rounds (median, min-max). ``samples_per_cpu_s`` divides by the CPU time
of this process plus its (exited) workers: the per-core rate, robust to other load.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.common import summary  # noqa: E402


def write_portrait_shards(folder: Path, samples: int, stored: int, per_shard: int = 32) -> Path:
    """``samples`` portraits at ``stored`` px in shards of ``per_shard`` (+ manifest.json)."""
    import webdataset as wds

    from data_pipelines.embedded import write_embedded_photos

    photos = sorted(write_embedded_photos(folder / "photos").glob("*.jpg"))
    crops = []
    for p in photos:
        with Image.open(p) as im:
            im = im.convert("RGB")
            s = min(im.size)
            left, top = (im.width - s) // 2, (im.height - s) // 2
            buf = io.BytesIO()
            im.crop((left, top, left + s, top + s)).resize((stored, stored), Image.Resampling.BICUBIC) \
                .save(buf, format="JPEG", quality=95)
            crops.append(buf.getvalue())
    rng = np.random.default_rng(0)
    out = folder / "shards"
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(0, samples, per_shard):
        name = f"faces-{s // per_shard:06d}.tar"
        n = min(per_shard, samples - s)
        with wds.TarWriter(str(out / name)) as sink:
            for i in range(s, s + n):
                emb = rng.standard_normal(128).astype(np.float32)
                npy = io.BytesIO()
                np.save(npy, emb / np.linalg.norm(emb))
                sink.write({"__key__": f"k{i:06d}", "jpg": crops[i % len(crops)], "txt": b"a photo of a person",
                            "sface.npy": npy.getvalue(), "json": b"{}"})
        shards.append({"name": name, "samples": n})
    (out / "manifest.json").write_text(json.dumps({"embedding_key": "sface.npy", "embedding_dim": 128,
                                                   "recognizer": "sface", "shards": shards}))
    return out


def read_once(shards: Path, resolution: int, workers: int, batch: int, uint8: bool = True
              ) -> tuple[int, float, float]:
    """(samples, wall seconds, CPU seconds of this process + its workers) for one pass over the shards."""
    from torch.utils.data import DataLoader

    from accord_face.data import build_dataset, collate

    ds = build_dataset(str(shards), resolution=resolution, shuffle_buffer=0, split_by_node=False,
                       split_by_worker=workers > 0, embedding_dim=128, pixels_uint8=uint8)
    loader = DataLoader(ds, batch_size=batch, collate_fn=collate, num_workers=workers, drop_last=False)
    cpu0 = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    tic = time.perf_counter()
    n = 0
    for b in loader:
        n += len(b["__key__"])
    wall = time.perf_counter() - tic
    del loader                                       # workers exit: their CPU time lands in RUSAGE_CHILDREN
    cpu1 = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime for a, b in zip(cpu0, cpu1))
    return n, wall, cpu


def measure(samples: int = 256, resolution: int = 512, stored: int = 512, workers=(0, 1, 2), rounds: int = 3,
            batch: int = 8, progress=None) -> dict:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        shards = write_portrait_shards(Path(tmp), samples, stored)
        read_once(shards, resolution, 0, batch)      # warm-up: imports, page cache
        rows = {(w, u8): {"sps": [], "per_cpu": []} for w in workers for u8 in (True, False)}
        for _ in range(rounds):
            for (w, u8), row in rows.items():
                n, wall, cpu = read_once(shards, resolution, w, batch, u8)
                if n != samples:
                    raise RuntimeError(f"loader returned {n} of {samples} samples with {w} workers")
                row["sps"].append(n / wall)
                row["per_cpu"].append(n / max(cpu, 1e-9))
                if progress:
                    progress.update(1)
    fmt = {(w, u8): {"samples_per_s": summary(r["sps"]), "samples_per_cpu_s": summary(r["per_cpu"])}
           for (w, u8), r in rows.items()}
    return {"samples": samples, "resolution": resolution, "stored_px": stored, "batch": batch, "rounds": rounds,
            "pixels": "uint8 (the trainer's loader; [-1, 1] on the device)",
            "workers": {str(w): fmt[(w, True)] for w in workers},
            "workers_float32_pixels": {str(w): fmt[(w, False)] for w in workers}}


def format_table(r: dict) -> str:
    lines = [f"loader: {r['samples']} portraits stored at {r['stored_px']} px -> {r['resolution']} px, "
             f"batch {r['batch']}, {r['rounds']} rounds",
             f"{'pixels':>7} {'workers':>7} {'samples/s':>10} {'(min-max)':>15} {'samples/cpu-s':>14}"]
    for name, key in (("uint8", "workers"), ("float32", "workers_float32_pixels")):
        for w, v in r[key].items():
            s = v["samples_per_s"]
            lines.append(f"{name:>7} {w:>7} {s['median']:10.1f} ({s['min']:6.1f}-{s['max']:6.1f}) "
                         f"{v['samples_per_cpu_s']['median']:14.1f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--stored", type=int, default=512, help="px of the stored crops (prepare_shards --resolution)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(format_table(measure(args.samples, args.resolution, args.stored, tuple(args.workers), args.rounds)))


if __name__ == "__main__":
    main()
