#!/usr/bin/env python
"""Where the time of one ACCORD training step goes (torch.profiler), and two knobs tried on the no-grad branches.

    python -m benchmarks.profile_step [--size sd15] [--batch 2] [--resolution 128] [--device cpu]

Times the phases of a DDLoss (whole batch) + PDLoss step after a warm-up (median of
--repeats steps; on CPU main-thread CPU time, which other load inflates less than
wall time): the no-grad DDLoss branches, the joint forward, the losses, backward,
optimizer; then one step under torch.profiler for the top operators' shares.
Then, measured interleaved (median of --repeats), the no-grad branch forward
under ``torch.no_grad`` vs ``torch.inference_mode`` and in contiguous vs
channels-last memory format: ratios, not absolute seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.bench_train_step import Variant, _config, build, make_batch


def profile_step(size: str, batch: int, resolution: int, device: str, repeats: int = 3, top: int = 12) -> dict:
    """Phase seconds (median over ``repeats`` steps; CPU: main-thread CPU time) and the profiler's top ops."""
    from accord_face.train.step import compute_losses

    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model, parts, cfg = build(size, dev, dtype, resolution)
    sb = make_batch(parts, batch, resolution, dev)
    c = _config(cfg, Variant("DD+PD f=1", 0.1, 0.001, 1.0, 1))
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)
    clock = time.perf_counter if dev.type == "cuda" else time.thread_time
    spent: dict[str, float] = {}

    def timed(name, fn, *args):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        tic = clock()
        with record_function(name):
            out = fn(*args)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        spent[name] = spent.get(name, 0.0) + clock() - tic
        return out

    def labelled(*args):
        name = "joint forward (grad)" if torch.is_grad_enabled() else "DDLoss branches (no-grad forward, 3B)"
        return timed(name, model, *args)

    def step():
        out = timed("compute_losses", compute_losses, labelled, sb, parts, c, 1)
        timed("backward", out["loss"].backward)
        timed("optimizer", lambda: (opt.step(), opt.zero_grad(set_to_none=True)))

    step()  # warm-up
    runs = []
    for _ in range(repeats):
        spent.clear()
        step()
        rest = spent["compute_losses"] - spent["joint forward (grad)"] - spent["DDLoss branches (no-grad forward, 3B)"]
        runs.append({**{k: v for k, v in spent.items() if k != "compute_losses"},
                     "losses + PD features (rest of compute_losses)": max(rest, 0.0)})
    phases = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    attr = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    ops = [(e.key, getattr(e, attr) / 1e6) for e in prof.key_averages() if e.key not in spent]
    ops.sort(key=lambda kv: -kv[1])
    total = sum(t for _, t in ops)
    return {"size": size, "batch": batch, "resolution": resolution, "device": device, "repeats": repeats,
            "clock": "wall" if dev.type == "cuda" else "thread_cpu", "phases_s": phases,
            "top_ops_share": [(k, t / total) for k, t in ops[:top]], "model": model, "sb": sb}


def branch_knobs(model, sb, repeats: int, device: str) -> dict[str, float]:
    """Median time of the 3-branch no-grad forward under each knob, over the no_grad + contiguous one."""
    dev = torch.device(device)
    m = sb.noisy.shape[0]
    args = (sb.noisy.repeat(3, 1, 1, 1), sb.timesteps.repeat(3), sb.text.repeat(3, 1, 1), sb.id_embeds.repeat(3, 1))
    cl = (args[0].contiguous(memory_format=torch.channels_last),) + args[1:]
    clock = time.perf_counter if dev.type == "cuda" else time.thread_time

    def timed(ctx, inputs, channels_last):
        if channels_last:
            model.unet.to(memory_format=torch.channels_last)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        tic = clock()
        with ctx():
            model(*inputs)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        sec = clock() - tic
        if channels_last:
            model.unet.to(memory_format=torch.contiguous_format)
        return sec

    knobs = {"no_grad": (torch.no_grad, args, False), "inference_mode": (torch.inference_mode, args, False),
             "no_grad + channels_last": (torch.no_grad, cl, True)}
    times = {k: [] for k in knobs}
    for _ in range(repeats + 1):
        for k, (ctx, inputs, chl) in knobs.items():
            times[k].append(timed(ctx, inputs, chl))
    med = {k: statistics.median(v[1:]) for k, v in times.items()}  # first repeat = warm-up
    return {"branch_batch": 3 * m, **{k: med[k] / med["no_grad"] for k in knobs}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="sd15")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    r = profile_step(args.size, args.batch, args.resolution, args.device, args.repeats)
    total = sum(r["phases_s"].values())
    print(f"== one step, {args.size} UNet, {args.resolution} px, batch {args.batch}, {args.device}, DD f=1 + PD; "
          f"{r['clock']} time, median of {args.repeats} steps ==")
    for k, v in r["phases_s"].items():
        print(f"{k:<50} {v:8.3f} s  {100 * v / total:5.1f} %")
    print("top operators, share of the profiled step's self time:")
    for k, v in r["top_ops_share"]:
        print(f"  {k:<48} {100 * v:5.1f} %")
    knobs = branch_knobs(r["model"], r["sb"], args.repeats, args.device)
    print(f"no-grad branch forward ({knobs.pop('branch_batch')} samples), time over no_grad + contiguous:")
    for k, v in knobs.items():
        print(f"  {k:<28} {v:6.3f}x")


if __name__ == "__main__":
    main()
