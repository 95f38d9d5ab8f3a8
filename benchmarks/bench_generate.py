"""Cost of the identity adapter at generation time, and of the coupling diagnostic, on an embedded pipeline.

    python benchmarks/bench_generate.py [--size tiny|small|sd15] [--steps 10] [--repeats 5] [--batch 1]

Builds the embedded pipeline (random weights: the architecture, not the weights, sets the cost)
and a FaceID adapter exported with the trainer's functions, then, interleaving the runs so that
machine load hits both alike, times:
  plain    StableDiffusionPipeline, text only, CFG
  adapter  the same pipeline through accord_face.pipeline.FaceIDGenerator (IP-Adapter at scale 1)
  coupling metrics.dependence_discrepancy on --batch samples x 10 timesteps (4 UNet passes each)
and prints median seconds and the ratios adapter/plain and coupling/adapter, measured in this run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=["tiny", "small", "sd15"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1, help="images per call (and coupling samples)")
    args = parser.parse_args()

    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from accord_face import metrics
    from accord_face.pipeline import FaceIDGenerator
    from accord_face.tiny import SIZES, ensure_pipeline
    from test_pipeline_helpers import export_test_adapter

    device = "cuda" if torch.cuda.is_available() else "cpu"
    res = SIZES[args.size].resolution
    with tempfile.TemporaryDirectory() as tmp:
        base = str(ensure_pipeline(args.size, 0, Path(tmp) / "cache"))
        adapter = export_test_adapter(base, Path(tmp) / "adapter")
        plain = StableDiffusionPipeline.from_pretrained(base, safety_checker=None).to(device)
        plain.set_progress_bar_config(disable=True)
        gen = FaceIDGenerator(adapter, device=device)
        emb = np.random.default_rng(0).standard_normal(128).astype(np.float32)
        emb /= np.linalg.norm(emb)
        prompt, seeds = "a photo of a person on a beach", list(range(args.batch))
        sched = DDPMScheduler.from_config(gen.pipe.scheduler.config)
        with torch.no_grad():
            text, _ = gen.pipe.encode_prompt([prompt] * args.batch, device, 1, False)
            null, _ = gen.pipe.encode_prompt([""], device, 1, False)
        latents = torch.randn(args.batch, 4, res // 8, res // 8, device=device)
        ids = torch.from_numpy(np.stack([emb] * args.batch)).to(device)

        def run_plain():
            plain(prompt, num_inference_steps=args.steps, num_images_per_prompt=args.batch, height=res, width=res,
                  generator=[torch.Generator().manual_seed(s) for s in seeds])

        def run_adapter():
            gen.generate(emb, prompt, seeds=seeds, steps=args.steps, resolution=res)

        def run_coupling():
            metrics.dependence_discrepancy(gen.pipe.unet, sched, latents, text, null, ids, num_timesteps=10)

        times: dict[str, list[float]] = {"plain": [], "adapter": [], "coupling": []}
        for fn in (run_plain, run_adapter, run_coupling):  # warm-up
            fn()
        for _ in range(args.repeats):
            for name, fn in (("plain", run_plain), ("adapter", run_adapter), ("coupling", run_coupling)):
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"size={args.size} ({res} px) steps={args.steps} batch={args.batch} repeats={args.repeats} "
          f"device={device} torch threads={torch.get_num_threads()}")
    for k, v in med.items():
        print(f"  {k:9s} median {v:8.4f} s   (min {min(times[k]):.4f}, max {max(times[k]):.4f})")
    print(f"  adapter / plain generation: {med['adapter'] / med['plain']:.3f}x")
    print(f"  coupling diagnostic (10 timesteps) / one adapter generation ({args.steps} steps): "
          f"{med['coupling'] / med['adapter']:.3f}x")


if __name__ == "__main__":
    main()
