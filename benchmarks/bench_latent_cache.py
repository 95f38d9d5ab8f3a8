#!/usr/bin/env python
"""Step cost with and without the latent cache (``data.latent_cache_mb``) on the identity world, as ratios.

    python benchmarks/bench_latent_cache.py [--config configs/faces.yaml] [--rounds 7] [--batch 16] [--out FILE]

A step = prepare_batch -> compute_losses (as the config: DDLoss / PDLoss) -> backward on one batch of world
photos (``bench_identity_loss.world_batch``). ``cache`` holds the batch's posteriors from round 0 on, as a
run does from its second pass over the data on; ``off`` encodes every step. Variants alternate round by
round, so each round gives one ratio; median and min-max are reported. Time: the main thread's CPU time with
one torch thread (stable under other load). Also reported: the VAE encode's own share of the ``off`` step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.bench_identity_loss import world_batch, world_step_setup  # noqa: E402
from benchmarks.common import load_average, machine, paired_ratios, summary, write_json_atomic  # noqa: E402



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/faces.yaml")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from accord_face.data import pixels_to_unit_range
    from accord_face.train.latent_cache import LatentCache
    from accord_face.train.step import compute_losses, prepare_batch

    cfg, parts, model = world_step_setup(a.config)
    device = torch.device("cpu")
    batch = world_batch(a.batch)
    cached = dataclasses.replace(parts, latent_cache=LatentCache(256))
    times: dict[str, list[float]] = {"off": [], "cache": [], "vae encode": []}
    load_before = load_average()
    for r in range(a.rounds + 1):                      # round 0 warms up (and fills the cache) and is dropped
        for name, p in (("off", parts), ("cache", cached)):
            t0 = time.process_time()
            sb = prepare_batch(batch, p, cfg, 1000 + r, device, torch.float32)
            compute_losses(model, sb, p, cfg, 1000 + r)["loss"].backward()
            dt = time.process_time() - t0
            model.zero_grad(set_to_none=True)
            if r:
                times[name].append(dt)
        t0 = time.process_time()
        with torch.no_grad():
            parts.vae.encode(pixels_to_unit_range(batch["pixel_values"]).float())
        if r:
            times["vae encode"].append(time.process_time() - t0)
    res = {"machine": machine(), "load_average_before": load_before, "load_average_after": load_average(),
           "config": a.config, "batch": a.batch, "rounds": a.rounds,
           "step_cpu_s": {k: summary(v) for k, v in times.items()},
           "time_ratio_cache_vs_off": paired_ratios(times["cache"], times["off"]),
           "vae_encode_share_of_off_step": paired_ratios(times["vae encode"], times["off"]),
           "cache": cached.latent_cache.summary()}
    if a.out:
        write_json_atomic(Path(a.out), res)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
