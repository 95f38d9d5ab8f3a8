"""Shard preparation throughput: images/s per worker and the share of time outside model inference.

    python benchmarks/bench_shards.py [--images 48] [--workers 0 1 2] [--resolution 512]

Inputs: the embedded public-domain portraits (plus their re-photos), repeated to --images files.
For each worker count it runs prepare_shards into a fresh folder and prints, from that one run:
wall images/s, images/s per worker, and per-stage seconds summed over workers (decode = file read +
image decode; model = face detection + recognition; crop_encode = crop, resize, JPEG; write = tar +
journal in the main process). "outside model" = 1 - model / (sum of stages).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--backend", default="opencv-zoo")
    args = parser.parse_args()

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
