"""The GPU benchmark behind ``benchmarks/gpu.sh``: one table for a CUDA machine, under 8 minutes.

    python -m benchmarks.gpu [--out DIR]              # CUDA: SD1.5-shaped UNet, 512 px, bf16, batch 8
    python -m benchmarks.gpu --dry-run [--out DIR]    # CPU: the same code on the tiny UNet at 64 px, seconds

Figures (ratios interleaved in one run, as benchmarks.run): ACCORD step cost (baseline, PDLoss,
DDLoss + PDLoss at dd_batch_fraction 1 / 0.25 / 0.125, dd_every_n_steps 4, the documented default),
the training step's samples/s, the loader's samples/s at 512 px, and samples/s of the whole
trainer loop (``scripts/train_encoder.py`` on the embedded SD1.5-shaped pipeline: data loading,
VAE, text encoder, DDLoss + PDLoss, DeepSpeed step). Writes ``gpu_results.json`` and prints one
Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclasses.dataclass
class GpuPlan:
    device: str = "cuda"
    size: str = "sd15"
    resolution: int = 512
    batch: int = 8
    rounds: int = 5
    loader_samples: int = 256
    loader_workers: tuple = (0, 2, 4)
    loop_steps: int = 30
    loop_workers: int = 4

    @classmethod
    def dry_run(cls) -> "GpuPlan":
        return cls(device="cpu", size="tiny", resolution=64, batch=8, rounds=1, loader_samples=16,
                   loader_workers=(0,), loop_steps=3, loop_workers=0)


def variants():
    from benchmarks.bench_train_step import BASELINE, DEFAULT, Variant

    return [BASELINE, Variant("PD", 0.0, 0.001), Variant("DD+PD f=1", 0.1, 0.001, 1.0),
            Variant("DD+PD f=0.25", 0.1, 0.001, 0.25), Variant("DD+PD f=0.125", 0.1, 0.001, 0.125),
            Variant("DD+PD f=1 n=4", 0.1, 0.001, 1.0, 4), DEFAULT]


def trainer_loop(plan: GpuPlan, shards: Path, out: Path) -> dict:
    """samples/s of the real trainer (median over steps after the first 3, or all in a dry run)."""
    overrides = [f"pretrained_model=embedded:{plan.size}", f"shards={shards}", f"output_dir={out}",
                 f"max_steps={plan.loop_steps}", f"resolution={plan.resolution}",
                 f"train_batch_size={plan.batch}", f"data.num_workers={plan.loop_workers}",
                 "data.shuffle_buffer=0", "data.resampled=true", "checkpointing.checkpointing_steps=0", "checkpointing.checkpoints_total_limit=1",
                 "validation.enabled=false", "logging.progress=false", "logging.report_to=none",
                 "losses.dd_batch_fraction=0.25", "losses.dd_every_n_steps=4"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if plan.device == "cpu":
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, str(ROOT / "scripts" / "train_encoder.py"), "--config", str(ROOT / "configs" / "tiny.yaml")]
    proc = subprocess.run(cmd + overrides, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError("trainer loop failed:\n" + proc.stdout[-1500:] + proc.stderr[-3000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    sps = [r["samples_per_s"] for r in rows[3:]] or [r["samples_per_s"] for r in rows]
    from benchmarks.common import summary

    return {"steps": len(rows), "samples_per_s": summary(sps), "mem_gb": max(r.get("mem_gb", 0) for r in rows),
            "settings": "DD+PD at dd_batch_fraction 0.25, dd_every_n_steps 4"}


def run(plan: GpuPlan, out: Path) -> dict:
    import torch

    from benchmarks import bench_loader, bench_train_step
    from benchmarks.common import machine, write_json_atomic

    if plan.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.sh: no CUDA device visible (torch.cuda.is_available() is False); "
                         "install the CUDA build of torch (README Install) or pass --dry-run")
    tic = time.perf_counter()
    res: dict = {"plan": dataclasses.asdict(plan), "machine": machine()}
    step = bench_train_step.measure(plan.size, variants(), device=plan.device, batch=plan.batch,
                                    resolution=plan.resolution, rounds=plan.rounds)
    res["accord_step"] = step
    base = step["variants"]["baseline"]["sec_per_step"]["median"]
    res["train_step_samples_per_s"] = plan.batch / base
    res["loader"] = bench_loader.measure(plan.loader_samples, resolution=512 if plan.device == "cuda" else 64,
                                         stored=512 if plan.device == "cuda" else 64,
                                         workers=plan.loader_workers, rounds=1)
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        shards = bench_loader.write_portrait_shards(Path(tmp), max(4 * plan.batch, 32), plan.resolution)
        res["trainer_loop"] = trainer_loop(plan, shards, Path(tmp) / "train")
    res["wall_s"] = round(time.perf_counter() - tic, 1)
    res["machine"]["load_average_after"] = machine()["load_average"]
    write_json_atomic(out / "gpu_results.json", res)
    return res


def table(res: dict) -> str:
    s, p = res["accord_step"], res["plan"]
    gpu = res["machine"].get("gpu", "CPU dry run")
    lines = [f"{gpu}: {s['size']} UNet ({s['unet_params_m']:.0f} M), {s['resolution']} px, batch {s['batch']}, "
             f"{'bf16' if p['device'] == 'cuda' else 'fp32'}, {s['rounds']} rounds, {res['wall_s']:.0f} s in all", "",
             "| figure | value |", "|---|---:|"]
    for name, v in s["variants"].items():
        tr = v["time_ratio"]
        lines.append(f"| step time x baseline, {name} | {tr['median']:.3f} ({tr['min']:.2f}-{tr['max']:.2f}); "
                     f"memory {v['memory_ratio']:.3f}x |")
    lines.append(f"| baseline step, s | {s['variants']['baseline']['sec_per_step']['median']:.3f} |")
    lines.append(f"| training step, samples/s (baseline) | {res['train_step_samples_per_s']:.1f} |")
    for w, v in res["loader"]["workers"].items():
        lines.append(f"| loader, {w} workers, samples/s | {v['samples_per_s']['median']:.0f} |")
    tl = res["trainer_loop"]
    lines.append(f"| whole trainer loop, samples/s ({tl['settings']}) | {tl['samples_per_s']['median']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny UNet at 64 px: checks the script in seconds")
    ap.add_argument("--out", default="outputs/benchmarks-gpu")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"benchmarks/gpu.sh: --out {out} is a file; pass a folder", file=sys.stderr)
        return 2
    plan = GpuPlan.dry_run() if args.dry_run else GpuPlan()
    if plan.device == "cpu":
        import torch

        torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    res = run(plan, out)
    text = table(res)
    (out / "gpu_table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
