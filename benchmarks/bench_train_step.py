#!/usr/bin/env python
"""Step time and peak memory of the encoder trainer's step: baseline vs +DDLoss vs +both (DD + PD).

One process, one model per size, every variant measured back to back in the
same run, so the printed ratios (variant / baseline) are comparable:

    python benchmarks/bench_train_step.py                      # tiny + sd15-shaped UNet (random weights), CPU
    python benchmarks/bench_train_step.py --device cuda --sizes sd15 --resolution 512 --batch 4

Time: wall clock on CUDA; on CPU the process CPU time with 1 torch thread (stable
on a shared machine, where wall time swings with other load). A step = prepare nothing (random latents / cached text states) -> compute_losses
(joint forward, DDLoss no-grad branches, PDLoss) -> backward -> AdamW step on the
trainable parameters (encoder + to_k_ip/to_v_ip). Memory: on CUDA the peak
allocated during the measured steps; on CPU the peak of malloc's bytes in use
(weights included), sampled every 1 ms. Variants are measured round-robin for
--rounds rounds and the median step time is printed, which tames the noise of a
shared machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import threading
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

VARIANTS = [("baseline", 0.0, 0.0, 1.0)] + [
    (f"+DD f={f}", 0.1, 0.0, f) for f in (1.0, 0.5, 0.25)] + [
    (f"+DD+PD f={f}", 0.1, 0.001, f) for f in (1.0, 0.5, 0.25)]


class HeapPeak:
    """Peak bytes in use by malloc (all arenas + mmapped chunks, glibc mallinfo2) while active (CPU).

    Unlike RSS, this falls when tensors are freed, so variants measured one
    after another in one process do not inherit each other's peaks.
    """

    def __enter__(self):
        import ctypes

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                        "fsmblks", "uordblks", "fordblks", "keepcost")]

        self._fn = ctypes.CDLL("libc.so.6").mallinfo2
        self._fn.restype = MallInfo2
        self.start = self.peak = self._in_use()
        self._stop = False
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _in_use(self) -> int:
        m = self._fn()
        return m.uordblks + m.hblkhd

    def _poll(self):
        while not self._stop:
            self.peak = max(self.peak, self._in_use())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()


def build(size: str, device: torch.device, dtype: torch.dtype, resolution: int):
    from accord_face.tiny import build_components
    from accord_face.train.config import TrainConfig
    from accord_face.train.models import FrozenParts, IdentityAdapterModel
    from accord_face.encoder import FaceIDProjection

    comps = build_components(size, seed=0)
    unet = comps["unet"]
    enc = FaceIDProjection(id_dim=128, cross_attention_dim=unet.config.cross_attention_dim, num_tokens=4)
    model = IdentityAdapterModel(unet, enc, num_tokens=4).to(device)
    unet.to(dtype)                      # frozen UNet in compute dtype; trainable IP weights back to fp32 below
    for p in model.trainable_parameters():
        p.data = p.data.float()
    if dtype != torch.float32:
        model.encoder.float()
    parts = FrozenParts(path="embedded:" + size, is_sdxl=False, vae=comps["vae"], tokenizers=[comps["tokenizer"]],
                        text_encoders=[comps["text_encoder"].to(device)], scheduler=comps["scheduler"],
                        clip=comps["text_encoder_projection"].to(device), clip_tokenizer=comps["tokenizer"])
    cfg = TrainConfig(resolution=resolution)
    return model, parts, cfg


def make_batch(parts, cfg, batch: int, resolution: int, device):
    from accord_face.train.models import encode_text
    from accord_face.train.step import StepBatch, sample_generator

    latent = resolution // 8
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    caps = ["a photo of a man on a beach"] * batch
    text, _ = encode_text(parts, caps + [""], device)
    keys = [f"k{i}" for i in range(batch)]
    return StepBatch(keys=keys, captions=caps, x0=x0, noise=noise, timesteps=t,
                     noisy=parts.scheduler.add_noise(x0, noise, t), text=text[:-1], text_empty=text[-1:],
                     id_embeds=torch.nn.functional.normalize(torch.randn(batch, 128, generator=g), dim=-1).to(device),
                     keep_both=torch.ones(batch, dtype=torch.bool, device=device),
                     generators=[sample_generator(0, 1, k) for k in keys])


def run_variant(model, parts, cfg, sb, steps: int, device, autocast_dtype):
    from accord_face.train.step import compute_losses

    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)

    def one():
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
            out = compute_losses(model, sb, parts, cfg, step=1)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    one()  # warm-up (allocator, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    # On a (shared) CPU the process CPU time is the stable cost measure: wall time swings with other load.
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    with HeapPeak() as mem:
        tic = clock()
        for _ in range(steps):
            one()
        if device.type == "cuda":
            torch.cuda.synchronize()
        sec = (clock() - tic) / steps
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else mem.peak
    return sec, peak / 2 ** 30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", nargs="+", default=["tiny", "sd15"])
    ap.add_argument("--batch", type=int, default=4, help="micro batch (the share-of-batch knob needs >= 4)")
    ap.add_argument("--resolution", type=int, default=0, help="0: 64 for tiny, 256 for sd15 on CPU, 512 on GPU")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    ap.add_argument("--rounds", type=int, default=3, help="round-robin repetitions (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: CPU time = work, no spin)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for size in args.sizes:
        res = args.resolution or (64 if size == "tiny" else (512 if device.type == "cuda" else 256))
        model, parts, cfg = build(size, device, dtype, res)
        sb = make_batch(parts, cfg, args.batch, res, device)
        print(f"\n== {size} UNet ({sum(p.numel() for p in model.unet.parameters()) / 1e6:.0f} M params), "
              f"{res} px, batch {args.batch}, {device}, {args.steps} steps/variant ==")
        unit = "s/step" if device.type == "cuda" else "cpu s/step"
        print(f"{'variant':<16} {unit:>10} {'x base':>7} {'peak GiB':>9} {'x base':>7}")
        times: dict[str, list[float]] = {name: [] for name, *_ in VARIANTS}
        peaks: dict[str, float] = {name: 0.0 for name, *_ in VARIANTS}
        for r in range(args.rounds):
            for name, ldd, lpd, frac in VARIANTS:
                c = dataclasses.replace(cfg, losses=dataclasses.replace(cfg.losses, lambda_dd=ldd, lambda_pd=lpd,
                                                                        dd_batch_fraction=frac))
                sec, gib = run_variant(model, parts, c, sb, args.steps, device, dtype)
                times[name].append(sec)
                peaks[name] = max(peaks[name], gib)
                if r == args.rounds - 1:  # last round: print as we go (medians over all rounds)
                    med, base_t = statistics.median(times[name]), statistics.median(times["baseline"])
                    print(f"{name:<16} {med:10.3f} {med / base_t:7.2f} {peaks[name]:9.3f} "
                          f"{peaks[name] / peaks['baseline']:7.2f}", flush=True)
        del model, parts
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
