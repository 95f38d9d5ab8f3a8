#!/usr/bin/env python
"""ZeRO stages 0/1/2/3 at 1 and 2 ranks (CPU, gloo): step time, per-rank memory, loss curves.

    python -m benchmarks.bench_zero [--stages 0 1 2 3] [--steps 8] [--rounds 1] [--out DIR]

Every run is the real trainer (``scripts/train_encoder.py --config configs/tiny.yaml``,
DDLoss + PDLoss on) on the same shards with the same global batch: 1 rank with
micro batch 2 x 2 accumulation steps, 2 ranks (torch.distributed.run) with micro
batch 2 x 1. Shards of 2 samples, read unshuffled: step k takes shards 2k and 2k+1
in both layouts (rank r of 2 gets every other shard), so the loss curves should lie on each other. Step time = median over the
steps after the first of the trainer's own per-step wall time (metrics.jsonl);
memory = the peak RSS of rank 0 (metrics ``mem_gb``). Runs are interleaved over
stages and rank counts. ``two_rank_speedup`` = 1-rank CPU seconds per step / 2-rank CPU
seconds per step and rank (the trainer's ``cpu_s``, mean over ranks): the speedup with a
core per rank, time blocked in communication excluded. On a shared machine the wall-clock
ratio (``two_rank_speedup_wall``, kept beside it) measures the CPU share the scheduler gives
one process vs two (it read 4-6x on 2 cores at load 15), not scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import summary  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_shards(folder: Path, n_shards: int = 8, per_shard: int = 2) -> Path:
    """Small random-face shards in the trainer's format (64 px, 128-d embedding)."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shards = []
    for s in range(n_shards):
        name = f"faces-{s:06d}.tar"
        with wds.TarWriter(str(folder / name)) as sink:
            for i in range(per_shard):
                buf, npy = io.BytesIO(), io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
                emb = rng.standard_normal(128).astype(np.float32)
                np.save(npy, emb / np.linalg.norm(emb))
                sink.write({"__key__": f"s{s:02d}_{i:03d}", "jpg": buf.getvalue(), "txt": b"a photo of a person",
                            "sface.npy": npy.getvalue(), "json": b"{}"})
        shards.append({"name": name, "samples": per_shard})
    (folder / "manifest.json").write_text(json.dumps({"embedding_key": "sface.npy", "embedding_dim": 128,
                                                      "recognizer": "sface", "shards": shards}))
    return folder


def run_trainer(out: Path, shards: Path, stage: int, ranks: int, steps: int, pretrained: str) -> dict:
    """One trainer run; returns its metrics rows (rank 0) or raises with the log tail."""
    cfg_json = out.parent / f"zero{stage}.json"
    if not cfg_json.exists():
        src = ROOT / "configs" / "deepspeed" / f"zero{stage}.json"
        ds = json.loads(src.read_text()) if src.exists() else {"zero_optimization": {"stage": stage}}
        cfg_json.write_text(json.dumps(ds))
    port = str(_port())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "MASTER_PORT": port, "TOKENIZERS_PARALLELISM": "false"}
    script = [str(ROOT / "scripts" / "train_encoder.py"), "--config", str(ROOT / "configs" / "tiny.yaml")]
    launcher = [sys.executable] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", port]
    overrides = [f"pretrained_model={pretrained}", f"shards={shards}", f"output_dir={out}", f"max_steps={steps}",
                 "train_batch_size=2", f"optimizer.gradient_accumulation_steps={2 // ranks}",
                 "data.shuffle_buffer=0", "checkpointing.checkpointing_steps=0", "checkpointing.checkpoints_total_limit=1",
                 "validation.enabled=false", "logging.progress=false", "logging.report_to=none",
                 "optimizer.learning_rate=0.001", f"deepspeed.config={cfg_json}"]
    proc = subprocess.run(launcher + script + overrides, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"trainer ZeRO-{stage} x {ranks} rank(s) failed (exit {proc.returncode}):\n"
                           + (proc.stdout[-1500:] + proc.stderr[-3000:]))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def measure(stages=(0, 1, 2, 3), steps: int = 8, rounds: int = 1, progress=None) -> dict:
    from accord_face.tiny import ensure_pipeline

    pretrained = str(ensure_pipeline("tiny", seed=0))
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_zero_") as tmp:
        shards = write_shards(Path(tmp) / "shards", n_shards=2 * steps + 2, per_shard=2)
        for r in range(rounds):
            for stage in stages:
                for ranks in (1, 2):
                    rows = run_trainer(Path(tmp) / f"z{stage}_r{ranks}_{r}", shards, stage, ranks, steps, pretrained)
                    key = f"zero{stage}_ranks{ranks}"
                    run = runs.setdefault(key, {"stage": stage, "ranks": ranks, "step_s": [], "cpu_s": [],
                                                "mem_gb": [], "loss": [r_["loss"] for r_ in rows]})
                    run["step_s"] += [4 / row["samples_per_s"] for row in rows[1:]]   # global batch 4
                    run["cpu_s"] += [row["cpu_s"] for row in rows[1:]]
                    run["mem_gb"].append(max(row["mem_gb"] for row in rows))
                    if progress:
                        progress.update(1)
    out = {"steps": steps, "rounds": rounds, "global_batch": 4, "runs": {}}
    for key, run in runs.items():
        out["runs"][key] = {"stage": run["stage"], "ranks": run["ranks"], "step_s": summary(run["step_s"]),
                            "cpu_s_per_rank": summary(run["cpu_s"]),
                            "peak_rss_gib_rank0": max(run["mem_gb"]), "loss": run["loss"]}
    for stage in stages:
        one, two = out["runs"][f"zero{stage}_ranks1"], out["runs"][f"zero{stage}_ranks2"]
        one["two_rank_speedup"] = one["cpu_s_per_rank"]["median"] / two["cpu_s_per_rank"]["median"]
        one["two_rank_speedup_wall"] = one["step_s"]["median"] / two["step_s"]["median"]
        one["max_loss_gap_vs_2_ranks"] = max(abs(a - b) for a, b in zip(one["loss"], two["loss"]))
    return out


def plot_losses(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for key, run in result["runs"].items():
        style = "-" if run["ranks"] == 1 else "--"
        marker = "o" if run["ranks"] == 1 else "x"
        ax.plot(range(1, len(run["loss"]) + 1), run["loss"], style, marker=marker,
                label=f"ZeRO-{run['stage']}, {run['ranks']} rank{'s' if run['ranks'] > 1 else ''}")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (MSE + DD + PD)")
    ax.set_title(f"1 vs 2 ranks, same global batch {result['global_batch']} (tiny, CPU gloo)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(r: dict) -> str:
    lines = [f"ZeRO on CPU (gloo), tiny trainer, global batch {r['global_batch']}, {r['steps']} steps x "
             f"{r['rounds']} round(s)",
             f"{'run':<16} {'s/step':>8} {'(min-max)':>15} {'cpu s/rank':>10} {'RSS GiB r0':>11} "
             f"{'2-rank speedup (cpu / wall)':>28} {'loss gap':>9}"]
    for key, v in r["runs"].items():
        s = v["step_s"]
        extra = (f"{v['two_rank_speedup']:19.2f} / {v['two_rank_speedup_wall']:6.2f} "
                 f"{v['max_loss_gap_vs_2_ranks']:9.2e}") if "two_rank_speedup" in v else ""
        lines.append(f"{key:<16} {s['median']:8.3f} ({s['min']:6.3f}-{s['max']:6.3f}) "
                     f"{v['cpu_s_per_rank']['median']:10.3f} {v['peak_rss_gib_rank0']:11.2f} {extra}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", default=None, help="folder for zero_losses.png")
    args = ap.parse_args()
    r = measure(tuple(args.stages), args.steps, args.rounds)
    print(format_table(r))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        print(plot_losses(r, Path(args.out) / "zero_losses.png"))


if __name__ == "__main__":
    main()
