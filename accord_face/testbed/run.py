"""Orchestrate the coupling testbed: base model -> judge -> calibration -> arms -> results.

Everything expensive is cached: the base model and judge under ``cache_dir``,
every (arm, reference set, seed) run as its own JSON written atomically in
``out_dir/runs``. A rerun skips what is finished, so a crash loses one run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from accord_face.config import to_dict
from accord_face.testbed.arms import CONTEXTS, calibrate_lambda, finetune, make_arms, reference_set
from accord_face.testbed.base import train_base
from accord_face.testbed.config import TestbedConfig
from accord_face.testbed.evaluate import METRICS, evaluate_model, prompt_accuracy, score_images, summarize
from accord_face.testbed.judge import train_judge
from accord_face.testbed.model import to_uint8
from accord_face.testbed.report import save_grid, write_plot, write_table

log = logging.getLogger(__name__)


def write_json(obj, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: reference sets may run in parallel
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def cached_json(path: Path, make):
    if path.exists():
        return json.loads(path.read_text())
    obj = make()
    write_json(obj, path)
    return obj


def _tail_mean(xs: list[float], frac: float, last: bool) -> float | None:
    if not xs:
        return None
    k = max(1, int(len(xs) * frac))
    return float(np.mean(xs[-k:] if last else xs[:k]))


def run_testbed(cfg: TestbedConfig) -> dict:
    out, cache = Path(cfg.out_dir), Path(cfg.cache_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "samples").mkdir(exist_ok=True)
    torch.set_num_threads(cfg.threads)
    ev = cfg.eval

    if cfg.use_assets:
        restore_assets(cfg, cache)
    base = train_base(cfg.base, cache)
    judge, judge_report = train_judge(cfg.judge, cache)
    log.info("judge held-out accuracy: %s", judge_report)
    judge_id = f"v{cfg.judge.version}"
    base_acc = cached_json(out / f"base_prompt_accuracy_judge_{judge_id}.json", lambda: prompt_accuracy(
        base, judge, 96, 777, ev.sample_steps, ev.guidance, cfg.judge.threshold))
    log.info("base-model prompt accuracy: %s", base_acc)

    arms = make_arms(cfg.finetune)
    names = cfg.arms or list(arms)
    unknown = [a for a in names if a not in arms]
    if unknown:
        raise ValueError(f"testbed: unknown arm(s) {unknown} in 'arms'; choose from {list(arms)}")
    refsets = {r: reference_set(r, cfg.finetune.n_refs) for r in cfg.ref_sets}
    for r, refs in refsets.items():
        save_grid(refs.images, [f"ref{r}"] * len(refs.backgrounds), out / "samples" / f"references_{r}.png")

    # L_DD / L_base on the base model depends only on how L_DD is formed (timesteps, background words),
    # not on lambda, warm-up or who computes the branches (live == frozen before fine-tuning).
    def dd_kind(a: str) -> str:
        return f"t={arms[a].timesteps},keep_bg={arms[a].keep_background}"

    def calibration_of(r: int) -> dict:
        kinds = {dd_kind(a): a for a in names if arms[a].ratio > 0}
        return {f"{kind}/{r}": calibrate_lambda(base, replace(arms[a], ratio=1.0), refsets[r], cfg.finetune)
                for kind, a in kinds.items()}
    calib: dict = {}
    for r in refsets:  # one file per reference set, so reference sets can run as parallel processes
        calib.update(cached_json(out / f"calibration_ref{r}.json", lambda: calibration_of(r)))

    def one_run(arm_name: str, r: int, seed: int) -> dict:
        path = out / "runs" / f"{arm_name}_ref{r}_seed{seed}.json"
        if path.exists():
            res = json.loads(path.read_text())
            if res.get("judge") != judge_id:  # judged by an older judge: re-judge the stored images
                images = load_run_images(path, out / "samples" / f"{arm_name}_ref{r}_seed{seed}.png")
                res["metrics"], _ = score_images(images, judge, CONTEXTS[r], ev.images_per_prompt,
                                                 cfg.judge.threshold)
                res["judge"] = judge_id
                write_json(res, path)
                log.info("re-judged %s with %s: %s", path.name, judge_id,
                         {k: round(v, 3) for k, v in res["metrics"].items()})
            return res
        t0 = time.time()
        logs: dict = {}
        lam = 0.0
        if arm_name == "base":
            model = base
        else:
            arm = arms[arm_name]
            lam = arm.ratio * calib[f"{dd_kind(arm_name)}/{r}"]["lambda"] if arm.ratio > 0 else 0.0
            model, logs = finetune(base, arm, refsets[r], cfg.finetune, seed, lam)
        means, raw = evaluate_model(model, judge, CONTEXTS[r], seed, ev.images_per_prompt, ev.sample_steps,
                                    ev.guidance, cfg.judge.threshold)
        if seed == cfg.seeds[0]:
            save_grid(raw["images"], [_labels(raw, k) for k in range(len(raw["prompts"]))],
                      out / "samples" / f"{arm_name}_ref{r}_seed{seed}.png")
        np.savez_compressed(path.with_suffix(".npz"), images=to_uint8(raw["images"]))
        res = {"arm": arm_name, "ref_set": r, "seed": seed, "lambda_dd": lam, "metrics": means, "judge": judge_id,
               "n_images": raw["n_target"], "seconds": round(time.time() - t0, 1),
               "L_base_first": _tail_mean(logs.get("L_base", []), 0.2, False),
               "L_base_last": _tail_mean(logs.get("L_base", []), 0.2, True),
               "L_DD_first": _tail_mean(logs.get("L_DD", []), 0.2, False),
               "L_DD_last": _tail_mean(logs.get("L_DD", []), 0.2, True),
               "ratio_mean": _tail_mean(logs.get("ratio", []), 1.0, True),
               "delta_by_quartile": {q: {"first": _tail_mean(v, 0.2, False), "last": _tail_mean(v, 0.2, True)}
                                     for q, v in logs.get("delta_by_quartile", {}).items()}}
        write_json(res, path)
        log.info("%s ref%d seed%d: %s (%.0fs)", arm_name, r, seed,
                 {k: round(v, 3) for k, v in means.items()}, res["seconds"])
        return res

    runs: dict[str, list[dict]] = {}
    for seed in cfg.seeds:           # seeds outermost: every arm gets a run before any gets a second
        for r in cfg.ref_sets:
            for a in ["base"] + names:
                runs.setdefault(a, []).append(one_run(a, r, seed))

    results = {"config": to_dict(cfg), "judge": judge_id, "judge_accuracy": judge_report, "base_prompt_accuracy": base_acc,
               "calibration": calib, "arms": {}}
    for a, rs in runs.items():
        entry = {m: summarize([x["metrics"][m] for x in rs]) for m in METRICS}
        entry["n_images"] = int(sum(x["n_images"] for x in rs))
        entry["lambda_dd"] = sorted({round(x["lambda_dd"], 6) for x in rs})
        entry["ratio_achieved"] = [x["ratio_mean"] for x in rs]
        entry["runs"] = [{k: x[k] for k in ("ref_set", "seed", "metrics", "L_base_first", "L_base_last",
                                            "L_DD_first", "L_DD_last", "delta_by_quartile")} for x in rs]
        results["arms"][a] = entry
    write_json(results, out / "results.json")
    write_table(results, out / "table.md")
    write_plot(results, out / "coupling_vs_fidelity.png")
    return results


ASSETS = Path(__file__).parent / "assets"


def restore_assets(cfg: TestbedConfig, cache: Path) -> None:
    """Copy the committed base model / judge into an empty cache when they were made with this config."""
    import shutil
    for name, sub in (("base_model", cfg.base), (f"judge_v{cfg.judge.version}", cfg.judge)):
        src, meta = ASSETS / f"{name}.pt", ASSETS / f"{name}.json"
        if (cache / f"{name}.pt").exists() or not src.exists() or not meta.exists():
            continue
        if json.loads(meta.read_text()) == to_dict(sub):
            cache.mkdir(parents=True, exist_ok=True)
            tmp = cache / f"{name}.pt.{os.getpid()}.tmp"  # atomic: parallel processes may restore at once
            shutil.copyfile(src, tmp)
            os.replace(tmp, cache / f"{name}.pt")
            log.info("using the committed %s (%s): its config matches", name, src)
        else:
            log.info("not using the committed %s: it was made with another config", name)


def load_run_images(path: Path, grid: Path) -> torch.Tensor:
    """A run's generated images (N, 3, H, W) in [-1, 1]: from its .npz, else from its sample grid
    (runs made before images were stored; the grid holds them exactly, upscaled 3x nearest)."""
    npz = path.with_suffix(".npz")
    if npz.exists():
        arr = np.load(npz)["images"]
    elif grid.exists():
        from PIL import Image

        from accord_face.testbed.evaluate import context_prompts, target_prompts
        from accord_face.testbed.world import SIZE
        n = 3 * (len(target_prompts(("square", "white"))) + len(context_prompts(("square", "white"))))
        g = np.asarray(Image.open(grid).convert("RGB"))
        cw, ch = SIZE * 3, SIZE * 3 + 12
        arr = np.stack([g[(k // 12) * ch:(k // 12) * ch + cw:3, (k % 12) * cw:(k % 12) * cw + cw:3] for k in range(n)])
    else:
        raise FileNotFoundError(f"{path}: no stored images ({npz.name} or {grid}) to re-judge; delete {path} to rerun it")
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _labels(raw: dict, k: int) -> str:
    from accord_face.testbed.world import BG_NAMES, SHAPES
    found = [s[:3] for i, s in enumerate(SHAPES) if raw["present"][k, i]]
    return ",".join(found) + "/" + BG_NAMES[int(raw["bg"][k])][:3]
