#!/usr/bin/env python
"""Step time and peak memory of the encoder trainer's step: baseline vs DDLoss vs DDLoss + PDLoss.

One process, one model per size; every variant runs in the same run, round-robin
(--rounds rounds), so each round gives one variant/baseline ratio; the median
ratio and its spread (min-max) are printed:

    python benchmarks/bench_train_step.py                               # tiny + sd15-shaped UNet, CPU
    python benchmarks/bench_train_step.py --device cuda --sizes sd15 --resolution 512 --batch 8

A step = compute_losses (joint forward, DDLoss no-grad branches, PDLoss) ->
backward -> AdamW step on the trainable parameters (encoder + to_k_ip/to_v_ip),
on random latents and cached text states (no VAE / data loading). A variant with
``dd_every_n_steps = n`` is timed over n consecutive steps holding one DDLoss
step, per step. Time: wall clock on CUDA; on CPU the main thread's CPU time with
1 torch thread (stable on a shared machine, where wall time swings with other
load). Memory: on CUDA the peak allocated; on CPU the peak of malloc's bytes in
use, sampled every 2 ms. ``memory`` includes the weights (what a user must
provision); ``activation`` is the peak above the bytes in use at the step's start.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.common import HeapPeak, paired_ratios, summary  # noqa: E402


@dataclass(frozen=True)
class Variant:
    name: str
    lambda_dd: float = 0.0
    lambda_pd: float = 0.0
    dd_batch_fraction: float = 1.0
    dd_every_n_steps: int = 1


BASELINE = Variant("baseline")
# The documented default (README "Performance"): DDLoss on a quarter of the micro batch every 4th step + PDLoss.
DEFAULT = Variant("default: DD+PD f=0.25 n=4", 0.1, 0.001, 0.25, 4)


def grid(fractions=(1.0, 0.5, 0.25, 0.125), every=(2, 4)) -> list[Variant]:
    """baseline, PD only, DD and DD+PD over dd_batch_fraction, DD+PD over dd_every_n_steps, the default."""
    out = [BASELINE, Variant("PD", 0.0, 0.001)]
    out += [Variant(f"DD f={f:g}", 0.1, 0.0, f) for f in fractions]
    out += [Variant(f"DD+PD f={f:g}", 0.1, 0.001, f) for f in fractions]
    out += [Variant(f"DD+PD f={f:g} n={n}", 0.1, 0.001, f, n) for f in (1.0, 0.25) for n in every
            if not (f, n) == (DEFAULT.dd_batch_fraction, DEFAULT.dd_every_n_steps)]
    return out + [DEFAULT]


def parse_setting(text: str) -> Variant:
    """``"f=0.25,n=8"`` (optionally ``,pd=0``) -> the DDLoss(+PDLoss) variant with that fraction and period."""
    kv = dict(part.split("=", 1) for part in text.split(",") if "=" in part)
    unknown = set(kv) - {"f", "n", "pd"}
    if unknown or not {"f", "n"} <= set(kv):
        raise ValueError(f"--settings {text!r}: write f=<dd_batch_fraction>,n=<dd_every_n_steps>[,pd=0|1]")
    f, n, pd = float(kv["f"]), int(kv["n"]), kv.get("pd", "1") != "0"
    return Variant(f"DD{'+PD' if pd else ''} f={f:g} n={n}", 0.1, 0.001 if pd else 0.0, f, n)


def build(size: str, device: torch.device, dtype: torch.dtype, resolution: int):
    """(model, parts, cfg) as the trainer builds them, from the embedded components (random weights)."""
    from accord_face.encoder import FaceIDProjection
    from accord_face.tiny import build_components
    from accord_face.train.config import TrainConfig
    from accord_face.train.models import FrozenParts, IdentityAdapterModel, link_pd_text_features

    comps = build_components(size, seed=0)
    unet = comps["unet"]
    enc = FaceIDProjection(id_dim=128, cross_attention_dim=unet.config.cross_attention_dim, num_tokens=4)
    model = IdentityAdapterModel(unet, enc, num_tokens=4).to(device)
    unet.to(dtype)                      # frozen UNet in compute dtype; trainable IP weights back to fp32 below
    for p in model.trainable_parameters():
        p.data = p.data.float()
    if dtype != torch.float32:
        model.encoder.float()
    # frozen as load_frozen_parts makes them (else PDLoss would also back-propagate into text_projection)
    text_encoder = comps["text_encoder"].requires_grad_(False).to(device=device, dtype=dtype)
    clip = comps["text_encoder_projection"].requires_grad_(False).to(device=device, dtype=dtype)
    parts = link_pd_text_features(FrozenParts(
        path="embedded:" + size, is_sdxl=False, vae=comps["vae"], tokenizers=[comps["tokenizer"]],
        text_encoders=[text_encoder], scheduler=comps["scheduler"], clip=clip, clip_tokenizer=comps["tokenizer"]))
    return model, parts, TrainConfig(resolution=resolution)


def make_batch(parts, batch: int, resolution: int, device):
    """A StepBatch of random latents and one caption, every sample keeping both conditions."""
    from accord_face.train.models import encode_text_with_features
    from accord_face.train.step import StepBatch, sample_generator

    latent = resolution // 8
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    caps = ["a photo of a man on a beach"] * batch
    text, _, feats = encode_text_with_features(parts, caps + [""], device)
    keys = [f"k{i}" for i in range(batch)]
    return StepBatch(keys=keys, captions=caps, x0=x0, noise=noise, timesteps=t,
                     noisy=parts.scheduler.add_noise(x0, noise, t), text=text[:-1], text_empty=text[-1:],
                     id_embeds=torch.nn.functional.normalize(torch.randn(batch, 128, generator=g), dim=-1).to(device),
                     keep_both=torch.ones(batch, dtype=torch.bool, device=device),
                     generators=[sample_generator(0, 1, k) for k in keys],
                     text_features=None if feats is None else feats[:-1])


def _config(cfg, v: Variant):
    return dataclasses.replace(cfg, losses=dataclasses.replace(
        cfg.losses, lambda_dd=v.lambda_dd, lambda_pd=v.lambda_pd, dd_batch_fraction=v.dd_batch_fraction,
        dd_every_n_steps=v.dd_every_n_steps, lambda_warmup_steps=0))


def run_variant(model, parts, cfg, sb, v: Variant, device, autocast_dtype, opt) -> tuple[float, int, int]:
    """(seconds per step, peak bytes, peak bytes above the start) over one n-step cycle with one DDLoss step."""
    from accord_face.train.step import compute_losses

    c, n = _config(cfg, v), v.dd_every_n_steps

    def one(step: int):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
            out = compute_losses(model, sb, parts, c, step=step)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    # On a shared CPU the main thread's CPU time is the stable cost measure (1 torch thread: ops run inline).
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    with HeapPeak() as heap:
        tic = clock()
        for step in range(n + 1, 2 * n + 1):     # holds exactly one multiple of n: one DDLoss step
            one(step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        sec = (clock() - tic) / n
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        start, peak = heap.start or 0, heap.peak or 0
    return sec, peak, peak - start


def measure(size: str, variants: list[Variant], *, device: str = "cpu", batch: int = 8, resolution: int = 0,
            rounds: int = 3, progress=None) -> dict:
    """Interleaved step cost of every variant on one UNet size; ratios are paired per round against the baseline."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    res = resolution or (64 if size == "tiny" else (512 if dev.type == "cuda" else 128))
    if variants[0] != BASELINE:
        raise ValueError("the first variant must be the baseline")
    model, parts, cfg = build(size, dev, dtype, res)
    sb = make_batch(parts, batch, res, dev)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)
    for v in variants:                              # warm-up: allocator, kernels, optimizer state
        run_variant(model, parts, cfg, sb, dataclasses.replace(v, dd_every_n_steps=1), dev, dtype, opt)
    rows = {v.name: {"sec": [], "peak": [], "act": []} for v in variants}
    for _ in range(rounds):
        for v in variants:
            sec, peak, act = run_variant(model, parts, cfg, sb, v, dev, dtype, opt)
            rows[v.name]["sec"].append(sec)
            rows[v.name]["peak"].append(peak)
            rows[v.name]["act"].append(act)
            if progress:
                progress.update(1)
    base = rows[BASELINE.name]
    result = {"size": size, "resolution": res, "batch": batch, "device": device, "rounds": rounds,
              "unet_params_m": round(sum(p.numel() for p in model.unet.parameters()) / 1e6, 1),
              "clock": "wall" if dev.type == "cuda" else "thread_cpu", "variants": {}}
    for v in variants:
        r = rows[v.name]
        result["variants"][v.name] = {
            "settings": dataclasses.asdict(v),
            "sec_per_step": summary(r["sec"]),
            "peak_gib": max(r["peak"]) / 2 ** 30,
            "time_ratio": paired_ratios(r["sec"], base["sec"]),
            "memory_ratio": max(r["peak"]) / max(base["peak"]),
            "activation_memory_ratio": max(r["act"]) / max(max(base["act"]), 1),
        }
    del model, parts
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return result


def format_table(result: dict) -> str:
    unit = "s/step" if result["clock"] == "wall" else "cpu s/step"
    lines = [f"{result['size']} UNet ({result['unet_params_m']:.0f} M params), {result['resolution']} px, "
             f"batch {result['batch']}, {result['device']}, {result['rounds']} rounds",
             f"{'variant':<28} {unit:>10} {'x base (min-max)':>18} {'peak GiB':>9} {'x base':>7} {'act x':>6}"]
    for name, v in result["variants"].items():
        tr = v["time_ratio"]
        lines.append(f"{name:<28} {v['sec_per_step']['median']:10.3f} {tr['median']:7.2f} "
                     f"({tr['min']:.2f}-{tr['max']:.2f}) {v['peak_gib']:9.3f} {v['memory_ratio']:7.3f} "
                     f"{v['activation_memory_ratio']:6.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", nargs="+", default=["tiny", "sd15"])
    ap.add_argument("--batch", type=int, default=8, help="micro batch (dd_batch_fraction 0.125 needs >= 8)")
    ap.add_argument("--resolution", type=int, default=0, help="0: 64 for tiny, 128 for sd15 on CPU, 512 on GPU")
    ap.add_argument("--rounds", type=int, default=3, help="round-robin repetitions (median ratio reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: CPU time = work, no spin)")
    ap.add_argument("--settings", nargs="+", default=None, metavar="f=F,n=N",
                    help="instead of the grid: baseline, PD, the default and these DD+PD settings "
                         "(e.g. f=0.25,n=8 f=0.125,n=4)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        variants = grid() if args.settings is None else (
            [BASELINE, Variant("PD", 0.0, 0.001), DEFAULT] + [parse_setting(t) for t in args.settings])
    except ValueError as err:
        sys.exit(f"bench_train_step: {err}")
    results = []
    for size in args.sizes:
        results.append(measure(size, variants, device=args.device, batch=args.batch, resolution=args.resolution,
                               rounds=args.rounds))
        print(format_table(results[-1]), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
