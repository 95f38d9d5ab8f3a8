#!/usr/bin/env python
"""Step cost of the identity loss (``losses.lambda_id``) on the identity world, as ratios in one run.

    python benchmarks/bench_identity_loss.py [--rounds 7] [--batch 16] [--out FILE.json]

A step = prepare_batch (VAE encode, text) -> compute_losses (joint forward, DDLoss / PDLoss as
configs/faces.yaml, and for ``id`` the VAE decode of x0_hat, the differentiable crop and the
torch-run recognizer) -> backward, on one batch of world photos (clean renders of training
people, their stored-style landmarks and world_a embeddings). Variants alternate round by round
(``off``, ``id f=0.5``, ``id f=1.0``: the share of the schedule the loss covers), so each round gives
one ratio to ``off``; median and min-max are reported. Time: the main thread's CPU time with one
torch thread (stable under other load); memory: malloc's peak bytes above the step's start.
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import HeapPeak, load_average, machine, paired_ratios, summary, write_json_atomic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def world_batch(n: int) -> dict:
    """n clean renders of training people as the loader yields them (uint8 pixels, embeddings, meta)."""
    from accord_face.face import load_face_analyzer
    from accord_face.world.assemble import face_models_dir
    from accord_face.world.render import random_context, render

    rng = np.random.default_rng(0)
    photos = [render(i, random_context(rng), 100 + i) for i in range(n)]
    analyzer = load_face_analyzer("world", face_models_dir(), "a")
    emb = analyzer.embed_aligned_batch([analyzer.align(p.image, p.landmarks) for p in photos])
    meta = [{"landmarks": p.landmarks.tolist(), "crop_box": [0, 0, 64, 64]} for p in photos]
    return {"__key__": [f"bench{i}" for i in range(n)], "caption": [p.caption for p in photos],
            "pixel_values": torch.from_numpy(np.stack([p.image for p in photos])).permute(0, 3, 1, 2),
            "face_embedding": torch.from_numpy(emb), "meta": meta}


def world_step_setup(config: str = "configs/faces.yaml"):
    """(cfg, parts, model) of one training step on ``embedded:faces`` under ``config``, on CPU, fp32."""
    from accord_face.config import load_config
    from accord_face.tiny import resolve_pretrained
    from accord_face.train.config import TrainConfig
    from accord_face.train.models import build_model, load_frozen_parts

    resolve_pretrained("embedded:faces")
    cfg = load_config(TrainConfig, str(ROOT / config), ["shards=unused"])
    parts = load_frozen_parts(cfg, torch.device("cpu"), torch.float32, with_clip=True)
    return cfg, parts, build_model(cfg, parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from accord_face.train.identity_loss import load_identity_loss
    from accord_face.train.step import compute_losses, prepare_batch

    cfg, parts, model = world_step_setup()
    device = torch.device("cpu")
    batch = world_batch(a.batch)
    loss_fn = load_identity_loss("auto", {"backend": "world", "name": "world_a", "model_name": "a"}, device)
    variants = {"off": None, "id f=0.5": 0.5, "id f=1.0": 1.0}
    times: dict[str, list[float]] = {k: [] for k in variants}
    mem: dict[str, list[float]] = {k: [] for k in variants}
    load_before = load_average()
    for r in range(a.rounds + 1):                      # round 0 warms up and is dropped
        for name, frac in variants.items():
            c = cfg if frac is None else dataclasses.replace(
                cfg, losses=dataclasses.replace(cfg.losses, lambda_id=0.1, id_timestep_fraction=frac))
            parts.identity_loss = None if frac is None else loss_fn
            with HeapPeak() as peak:
                t0 = time.process_time()
                sb = prepare_batch(batch, parts, c, 1000 + r, device, torch.float32)
                compute_losses(model, sb, parts, c, 1000 + r)["loss"].backward()
                dt = time.process_time() - t0
            model.zero_grad(set_to_none=True)
            if r:
                times[name].append(dt)
                mem[name].append(peak.peak - peak.start)
    res = {"machine": machine(), "load_average_before": load_before, "load_average_after": load_average(),
           "batch": a.batch, "rounds": a.rounds,
           "step_cpu_s": {k: summary(v) for k, v in times.items()},
           "time_ratio_vs_off": {k: paired_ratios(v, times["off"]) for k, v in times.items() if k != "off"},
           "activation_ratio_vs_off": {k: paired_ratios(v, mem["off"]) for k, v in mem.items() if k != "off"}}
    text = json.dumps(res, indent=1)
    if a.out:
        write_json_atomic(Path(a.out), res)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
