#!/usr/bin/env python
"""Cost of DDLoss in the LoRA path: seconds per training step (forward + backward) per variant.

    python benchmarks/bench_lora_step.py [--size tiny|small|sd15] [--batch 2] [--steps 5]

All variants run in one process on the same models and batch, interleaved
round-robin so that load from other processes hits them alike; the printed
ratios (variant / plain DreamBooth-LoRA) are the result, absolute seconds depend on the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from accord_face.lora.config import AccordConfig, LoraTrainConfig  # noqa: E402
from accord_face.lora.models import load_models  # noqa: E402
from accord_face.lora.objective import Batch, loss_terms  # noqa: E402
from accord_face.lora.prompts import PromptSet  # noqa: E402

VARIANTS = {
    "plain (lambda_dd=0)": dict(lambda_dd=0.0),
    "DD shared t, live refs": dict(lambda_dd=0.1),
    "DD shared t, frozen refs": dict(lambda_dd=0.1, reference="frozen"),
    "DD stratified t": dict(lambda_dd=0.1, timesteps="stratified"),
    "DD on half the batch": dict(lambda_dd=0.1, fraction=0.5),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="tiny", choices=["tiny", "small", "sd15"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = LoraTrainConfig(pretrained_model=f"embedded:{args.size}")
    cfg.data.synthetic = "subject"
    torch.manual_seed(0)
    models = load_models(cfg, device)
    models.unet.train()
    size = models.unet.config.sample_size
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, 4, size, size)
    prompts = [PromptSet("a photo of sks backpack with a tree", "a photo of sks backpack", "a photo of a tree")]
    batch = Batch(torch.randn(shape, generator=gen), prompts * args.batch, torch.randn(shape, generator=gen),
                  torch.randint(0, 1000, (args.batch,), generator=gen))
    params = [p for p in models.unet.parameters() if p.requires_grad]
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for step in range(args.steps + 1):  # step 0 warms up every variant
        for name, knobs in VARIANTS.items():
            vcfg = dataclasses.replace(cfg, accord=dataclasses.replace(AccordConfig(), **knobs))
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            terms, _ = loss_terms(models, batch, vcfg, step=0, generator=torch.Generator().manual_seed(step))
            terms["loss"].backward()
            if device == "cuda":
                torch.cuda.synchronize()
            if step:
                times[name].append(time.perf_counter() - t0)
            for p in params:
                p.grad = None
    base = statistics.median(times["plain (lambda_dd=0)"])
    print(f"embedded:{args.size}, batch {args.batch}, {device}, median of {args.steps} steps")
    print(f"{'variant':28s} {'s/step':>8s} {'ratio':>6s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:28s} {med:8.3f} {med / base:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
