"""Every benchmark in one run: ``results.json``, ``results.md`` and PNG charts in --out.

    python -m benchmarks.run [--quick] [--out DIR]

Figures (each a ratio or rate measured in this one run, variants interleaved,
repeats summarised by median and min-max, the load average recorded before and
after every section):

- accord_step  ACCORD step cost (benchmarks/bench_train_step.py): baseline, PDLoss, DDLoss and
               DDLoss + PDLoss over dd_batch_fraction and dd_every_n_steps, on the tiny UNet and
               (not in --quick) the SD1.5-shaped UNet; ``default`` = the documented default setting
               over the baseline (SD1.5-shaped, tiny in --quick).
- loader       training-side loader samples/s vs DataLoader workers at 512 px (bench_loader.py).
- prep         shard preparation images/s per worker and the share outside model inference (bench_shards.py).
- zero         ZeRO stages at 1 and 2 ranks on CPU gloo: step time, memory, loss curves (bench_zero.py).
- profile      (not in --quick) where one SD1.5-shaped DD+PD step's time goes, and the no-grad branch
               forward under inference_mode / channels-last over no_grad (profile_step.py).

--quick (about 2-3 minutes on 2 cores) runs every section smaller; it is what the smoke test runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks import charts  # noqa: E402
from benchmarks.common import load_average, machine, write_json_atomic, write_text_atomic  # noqa: E402

# Keys of the output contract (issue 11); dotted paths into results.json, each a finite number.
CONTRACT = ("accord_step.default.time_ratio", "accord_step.default.memory_ratio", "loader.samples_per_s_per_core",
            "prep.non_model_share", "zero.two_rank_speedup")


@dataclasses.dataclass
class Plan:
    """How big each section is (full run vs --quick)."""

    tiny_rounds: int = 7
    sd15: bool = True
    sd15_batch: int = 4
    sd15_resolution: int = 128
    sd15_rounds: int = 2
    loader_samples: int = 256
    loader_rounds: int = 3
    prep_images: int = 24
    prep_workers: tuple = (0, 1, 2)
    zero_stages: tuple = (0, 1, 2, 3)
    zero_steps: int = 6
    profile: bool = True

    @classmethod
    def quick(cls) -> "Plan":
        return cls(tiny_rounds=3, sd15=False, loader_samples=64, loader_rounds=1, prep_images=8,
                   prep_workers=(0, 1), zero_stages=(2,), zero_steps=3, profile=False)


def sd15_variants():
    """The SD1.5-shaped UNet costs minutes per step on CPU: the grid's corners and the default."""
    from benchmarks.bench_train_step import BASELINE, DEFAULT, Variant

    return [BASELINE, Variant("PD", 0.0, 0.001), Variant("DD+PD f=1", 0.1, 0.001, 1.0),
            Variant("DD+PD f=0.25", 0.1, 0.001, 0.25), Variant("DD+PD f=1 n=4", 0.1, 0.001, 1.0, 4), DEFAULT]


def lookup(results: dict, dotted: str):
    node = results
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def missing_figures(results: dict) -> list[str]:
    """Contract keys that are absent or not a finite number."""
    bad = []
    for key in CONTRACT:
        v = lookup(results, key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            bad.append(key)
    return bad


def _section(results: dict, name: str, fn, out: Path) -> None:
    """Run one section, record its load and seconds, save results.json after it (a crash keeps the rest)."""
    before, tic = load_average(), time.perf_counter()
    results[name] = fn()
    results[name]["load_average_before"] = before
    results[name]["load_average_after"] = load_average()
    results[name]["wall_s"] = round(time.perf_counter() - tic, 1)
    write_json_atomic(out / "results.json", results)


SECTIONS = ("accord_step", "loader", "prep", "zero", "profile")


def run(plan: Plan, out: Path, quick: bool, only: tuple = ()) -> dict:
    """Every section (or those in ``only``, merged into the results.json already in ``out``)."""
    import torch
    from tqdm import tqdm

    from benchmarks import bench_loader, bench_shards, bench_train_step, bench_zero

    torch.set_num_threads(1)
    tiny_variants = bench_train_step.grid()
    per_section = {"accord_step": len(tiny_variants) * plan.tiny_rounds
                   + (len(sd15_variants()) * plan.sd15_rounds if plan.sd15 else 0),
                   "loader": 6 * plan.loader_rounds, "prep": len(plan.prep_workers), "zero": 2 * len(plan.zero_stages)}
    units = sum(v for k, v in per_section.items() if not only or k in only)
    results: dict = {"quick": quick, "plan": dataclasses.asdict(plan), "machine": machine(), "started": time.time()}
    if only and (out / "results.json").is_file():      # keep the other sections' figures, note what was rerun
        import json

        kept = json.loads((out / "results.json").read_text())
        results = {**kept, "rerun": kept.get("rerun", []) + [{"sections": list(only), "started": time.time(),
                                                               "quick": quick, "plan": dataclasses.asdict(plan)}]}
    bar = tqdm(total=units, unit="run", desc="benchmarks", dynamic_ncols=True)

    def accord():
        sec = {"tiny": bench_train_step.measure("tiny", tiny_variants, batch=8, rounds=plan.tiny_rounds,
                                                progress=bar)}
        if plan.sd15:
            sec["sd15"] = bench_train_step.measure("sd15", sd15_variants(), batch=plan.sd15_batch,
                                                   resolution=plan.sd15_resolution, rounds=plan.sd15_rounds,
                                                   progress=bar)
        size = "sd15" if plan.sd15 else "tiny"
        d = sec[size]["variants"][bench_train_step.DEFAULT.name]
        sec["default"] = {"size": size, "settings": d["settings"], "time_ratio": d["time_ratio"]["median"],
                          "time_ratio_min": d["time_ratio"]["min"], "time_ratio_max": d["time_ratio"]["max"],
                          "memory_ratio": d["memory_ratio"], "activation_memory_ratio": d["activation_memory_ratio"],
                          "goal": {"time_ratio": 1.10, "memory_ratio": 1.05}}
        return sec

    def loader():
        r = bench_loader.measure(plan.loader_samples, rounds=plan.loader_rounds, progress=bar)
        top = max(r["workers"], key=int)
        r["samples_per_s_per_core"] = r["workers"][top]["samples_per_cpu_s"]["median"]
        r["per_core_from_workers"] = int(top)
        r["goal_samples_per_s_per_core"] = 150
        step = results.get("accord_step", {}).get("sd15" if plan.sd15 else "tiny")
        if step:  # the rate the loader must feed: samples/s of the baseline training step measured above
            base = step["variants"]["baseline"]["sec_per_step"]["median"]
            r["step_rate_to_feed"] = {"size": step["size"], "samples_per_s": step["batch"] / base,
                                      "clock": step["clock"]}
        return r

    def prep():
        r = bench_shards.measure(plan.prep_images, plan.prep_workers, progress=bar)
        top = r["workers"][max(r["workers"], key=int)]
        r.update(non_model_share=top["non_model_share"], images_per_s_per_worker=top["images_per_s_per_worker"],
                 goal_non_model_share=0.15)
        return r

    def zero():
        r = bench_zero.measure(plan.zero_stages, plan.zero_steps, progress=bar)
        key = "zero2_ranks1" if "zero2_ranks1" in r["runs"] else sorted(r["runs"])[0]
        r["two_rank_speedup"] = r["runs"][key]["two_rank_speedup"]              # CPU time: a core per rank
        r["two_rank_speedup_wall"] = r["runs"][key]["two_rank_speedup_wall"]    # wall: load-dependent
        r["two_rank_speedup_stage"] = r["runs"][key]["stage"]
        return r

    def prof():
        from benchmarks import profile_step

        r = profile_step.profile_step("sd15", 2, plan.sd15_resolution, "cpu", repeats=2)
        knobs = profile_step.branch_knobs(r.pop("model"), r.pop("sb"), 2, "cpu")
        total = sum(r["phases_s"].values())
        r["phases_share"] = {k: v / total for k, v in r["phases_s"].items()}
        r["branch_forward_vs_no_grad"] = knobs
        return r

    sections = [("accord_step", accord), ("loader", loader), ("prep", prep), ("zero", zero)]
    for name, fn in sections + ([("profile", prof)] if plan.profile and plan.sd15 else []):
        if not only or name in only:
            _section(results, name, fn, out)
    bar.close()
    results["finished"] = time.time()
    results["load_average_after"] = load_average()
    charts.write_all(results, out)
    write_json_atomic(out / "results.json", results)
    write_text_atomic(out / "results.md", charts.markdown(results))
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="every section, smaller (about 2-3 min on 2 cores)")
    ap.add_argument("--out", default="outputs/benchmarks", help="folder for results.json, results.md, *.png")
    ap.add_argument("--sd15-rounds", type=int, default=None, help="rounds of the SD1.5-shaped step cost (full run)")
    ap.add_argument("--no-sd15", action="store_true", help="full run without the SD1.5-shaped UNet")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=(),
                    help="run these sections only, replacing theirs in --out's results.json (the rest is kept)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"benchmarks.run: --out {out} is a file; pass a folder (it is created if missing)", file=sys.stderr)
        return 2
    if args.sd15_rounds is not None and args.sd15_rounds < 1:
        print(f"benchmarks.run: --sd15-rounds must be >= 1, got {args.sd15_rounds}", file=sys.stderr)
        return 2
    plan = Plan.quick() if args.quick else Plan()
    if args.sd15_rounds:
        plan.sd15_rounds = args.sd15_rounds
    if args.no_sd15:
        plan.sd15 = False
    out.mkdir(parents=True, exist_ok=True)
    results = run(plan, out, args.quick, tuple(args.only))
    print(charts.markdown(results))
    bad = missing_figures(results)
    if bad:
        print(f"benchmarks.run: figures missing from {out / 'results.json'}: {', '.join(bad)}", file=sys.stderr)
        return 1
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and charts in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
