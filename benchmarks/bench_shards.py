"""Shard preparation throughput: images/s per worker and the share of time outside model inference.

    python benchmarks/bench_shards.py [--images 48] [--workers 0 1 2] [--resolution 512]

Inputs: the embedded public-domain portraits (plus their re-photos), repeated to --images files.
For each worker count it runs prepare_shards into a fresh folder and prints, from that one run:
wall images/s, images/s per worker, and per-stage seconds summed over workers (decode = file read +
image decode; model = face detection + recognition; crop_encode = crop, resize, JPEG; write = tar +
journal in the main process). "outside model" = 1 - model / (sum of stages).

Scaling (``measure_scaling``; ``--sections`` picks what runs), all ratios from this one run:
- recognition: SFace on aligned crops, one onnxruntime call per crop vs one call per batch
  (same session, runs interleaved, median of --repeats), at 1 and 2 onnxruntime threads;
- batch_size: prepare_shards end to end (in-process) with --batch-size 1 vs 16;
- distributor: prepare_shards with --distributor local (2 worker processes) vs ray (local Ray,
  2 CPUs, 4 partitions); wall time of the whole command, start-up of workers / Ray included.
GPU: ``python benchmarks/bench_shards.py --sections recognition batch_size --providers cuda``
(needs onnxruntime-gpu of the pinned version installed in place of onnxruntime).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipelines.embedded import write_embedded_photos  # noqa: E402
from data_pipelines.prepare import PrepareConfig, prepare_shards  # noqa: E402

import webdataset  # noqa: E402,F401  (imports torch: keep that one-off cost out of the first run's write time)


def measure(images: int = 48, workers=(0, 1, 2), resolution: int = 512, backend: str = "opencv-zoo",
            progress=None) -> dict:
    """One prepare_shards run per worker count on the same inputs: images/s and per-stage seconds.

    Returns {"images", "resolution", "backend", "workers": {w: {"images_per_s", "images_per_s_per_worker",
    "stage_seconds", "non_model_share"}}}; non_model_share = 1 - model / (sum of stages).
    """
    tmp = Path(tempfile.mkdtemp(prefix="bench_shards_"))
    try:
        photos = write_embedded_photos(tmp / "seed")
        src = sorted(photos.glob("*.jpg"))
        inp = tmp / "in"
        inp.mkdir()
        for i in range(images):
            shutil.copy(src[i % len(src)], inp / f"img{i:05d}.jpg")
        out = {"images": images, "distinct": len(src), "resolution": resolution, "backend": backend, "workers": {}}
        for w in workers:
            cfg = PrepareConfig(input=str(inp), output=str(tmp / f"out{w}"), workers=w, resolution=resolution,
                                shard_size=16, backend=backend, progress=False, threads_per_worker=1)
            s = prepare_shards(cfg)
            st = s["stage_seconds"]
            total = sum(st.values())
            out["workers"][str(w)] = {"images_per_s": s["images_per_second"],
                                      "images_per_s_per_worker": s["images_per_second"] / max(w, 1),
                                      "stage_seconds": st, "non_model_share": 1 - st.get("model", 0) / total}
            if progress:
                progress.update(1)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _photos(tmp: Path, images: int) -> Path:
    src = sorted(write_embedded_photos(tmp / "seed").glob("*.jpg"))
    inp = tmp / f"in{images}"
    inp.mkdir()
    for i in range(images):
        shutil.copy(src[i % len(src)], inp / f"img{i:05d}.jpg")
    return inp


def _recognition(crops_n: int, batch: int, repeats: int, threads: int, providers: str | None) -> dict:
    import statistics
    import time

    import numpy as np

    from accord_face.face import align_face, load_face_analyzer
    from data_pipelines.embedded import PEOPLE, load_portrait

    zoo = load_face_analyzer("opencv-zoo", threads=threads, max_batch=batch,
                             **({"providers": providers} if providers else {}))
    faces = []
    for name in PEOPLE:
        img = np.asarray(load_portrait(name).convert("RGB"))
        faces.append(align_face(img, zoo.analyze(img, max_faces=0)[0].landmarks))
    crops = [faces[i % len(faces)] for i in range(crops_n)]
    loop, batched = [], []
    zoo.embed_aligned_batch(crops[:batch])  # warm-up
    for _ in range(repeats):  # interleaved: both see the same machine load
        t0 = time.perf_counter()
        for c in crops:
            zoo.embed_aligned(c)
        loop.append((time.perf_counter() - t0) / crops_n)
        t0 = time.perf_counter()
        zoo.embed_aligned_batch(crops)
        batched.append((time.perf_counter() - t0) / crops_n)
    lo, ba = statistics.median(loop), statistics.median(batched)
    return {"threads": threads, "batch": batch, "batched_axis": zoo.batched, "providers": zoo.providers,
            "loop_ms_per_crop": round(lo * 1e3, 3), "batched_ms_per_crop": round(ba * 1e3, 3),
            "speedup": round(lo / ba, 3)}


def measure_scaling(images: int = 48, ray_images: int = 96, crops: int = 64, batch: int = 16, repeats: int = 5,
                    rounds: int = 2, sections=("recognition", "batch_size", "distributor"),
                    providers: str | None = None, progress=None) -> dict:
    """Batched vs unbatched recognition and local vs Ray images/s on this machine (ratios in one run).

    Returns {"recognition": [{"threads", "loop_ms_per_crop", "batched_ms_per_crop", "speedup", ...}],
    "batch_size": {"images_per_s": {"1", "<batch>"}, "speedup"}, "distributor": {"images_per_s":
    {"local", "ray"}, "ray_over_local"} or {"skipped": why}}.
    """
    import statistics

    out: dict = {"cpus": os.cpu_count(), "load_average_before": os.getloadavg()[0]}
    tmp = Path(tempfile.mkdtemp(prefix="bench_shards_scale_"))
    try:
        if "recognition" in sections:
            out["recognition"] = [_recognition(crops, batch, repeats, t, providers) for t in (1, 2)]
            if progress:
                progress.update(1)
        if "batch_size" in sections:
            inp = _photos(tmp, images)
            runs: dict = {"1": [], str(batch): []}
            for r in range(rounds):  # alternated, so both see the same load
                for b in (1, batch):
                    cfg = PrepareConfig(input=str(inp), output=str(tmp / f"b{b}_{r}"), workers=0, batch_size=b,
                                        shard_size=16, progress=False, threads_per_worker=1,
                                        providers=providers or "cpu")
                    runs[str(b)].append(prepare_shards(cfg)["images_per_second"])
            rates = {k: statistics.median(v) for k, v in runs.items()}
            out["batch_size"] = {"images": images, "rounds": rounds, "images_per_s": rates,
                                 "speedup": round(rates[str(batch)] / rates["1"], 3)}
            if progress:
                progress.update(1)
        if "distributor" in sections:
            try:
                import ray  # noqa: F401
            except ImportError:
                out["distributor"] = {"skipped": "ray is not installed (pip install -e '.[ray]')"}
            else:
                inp = _photos(tmp, ray_images)
                runs = {"local": [], "ray": []}
                for r in range(rounds):
                    for dist in ("local", "ray"):
                        cfg = PrepareConfig(input=str(inp), output=str(tmp / f"d_{dist}_{r}"), workers=2,
                                            distributor=dist, partition_size=max(1, ray_images // 4), shard_size=16,
                                            progress=False, threads_per_worker=1, batch_size=batch)
                        runs[dist].append(prepare_shards(cfg)["images_per_second"])
                rates = {k: statistics.median(v) for k, v in runs.items()}
                out["distributor"] = {"images": ray_images, "workers": 2, "rounds": rounds, "images_per_s": rates,
                                      "ray_over_local": round(rates["ray"] / rates["local"], 3)}
            if progress:
                progress.update(1)
        out["load_average_after"] = os.getloadavg()[0]
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _print_scaling(r: dict) -> None:
    print(f"{r['cpus']} CPUs, load average {r['load_average_before']:.1f} before, {r['load_average_after']:.1f} after")
    for row in r.get("recognition", []):
        print(f"recognition, {row['threads']} thread(s): {row['loop_ms_per_crop']:.2f} ms/crop one call each, "
              f"{row['batched_ms_per_crop']:.2f} ms/crop in batches of {row['batch']} -> batched speed-up "
              f"{row['speedup']:.2f}x (symbolic batch axis: {row['batched_axis']}, {row['providers'][0]})")
    if "batch_size" in r:
        b = r["batch_size"]
        (k1, v1), (kb, vb) = sorted(b["images_per_s"].items(), key=lambda kv: int(kv[0]))
        print(f"prepare_shards in-process, {b['images']} images: --batch-size {k1} {v1:.2f} img/s, --batch-size {kb} "
              f"{vb:.2f} img/s -> {b['speedup']:.2f}x")
    if "distributor" in r:
        d = r["distributor"]
        if "skipped" in d:
            print(f"distributor: skipped ({d['skipped']})")
        else:
            print(f"prepare_shards, {d['images']} images, 2 workers: local {d['images_per_s']['local']:.2f} img/s, "
                  f"ray {d['images_per_s']['ray']:.2f} img/s -> ray/local {d['ray_over_local']:.2f}x "
                  "(wall time incl. start-up)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--backend", default="opencv-zoo")
    parser.add_argument("--sections", nargs="+", default=["workers", "recognition", "batch_size", "distributor"],
                        choices=["workers", "recognition", "batch_size", "distributor"])
    parser.add_argument("--ray-images", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16, help="recognition batch size")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of the recognition timing")
    parser.add_argument("--rounds", type=int, default=2, help="alternated end-to-end runs per variant (median)")
    parser.add_argument("--providers", default=None, help="onnxruntime providers, e.g. cuda (recognition/batch_size)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    scaling = [s for s in args.sections if s != "workers"]
    results: dict = {}
    if scaling:
        results["scaling"] = measure_scaling(args.images, args.ray_images, batch=args.batch, repeats=args.repeats,
                                             rounds=args.rounds, sections=scaling, providers=args.providers)
        _print_scaling(results["scaling"])
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if "workers" not in args.sections:
        return
    r = measure(args.images, args.workers, args.resolution, args.backend)
    print(f"{args.images} images ({r['distinct']} distinct portraits, 512-600 px), resolution {args.resolution}, "
          f"backend {args.backend}, {os.cpu_count()} CPUs")
    print(f"{'workers':>7} {'img/s':>7} {'img/s/worker':>12} {'decode':>7} {'model':>7} {'crop_enc':>8} "
          f"{'write':>6} {'outside model':>13}")
    for w, v in r["workers"].items():
        st = v["stage_seconds"]
        print(f"{w:>7} {v['images_per_s']:>7.2f} {v['images_per_s_per_worker']:>12.2f} {st.get('decode', 0):>7.2f} "
              f"{st.get('model', 0):>7.2f} {st.get('crop_encode', 0):>8.2f} {st.get('write', 0):>6.2f} "
              f"{v['non_model_share'] * 100:>12.1f}%")
    print("(workers 0 = in the main process; every analyzer uses --threads-per-worker (1) threads; wall time includes "
          "worker start-up)")


if __name__ == "__main__":
    main()
