"""Orchestrate the coupling testbed (protocol v2), in the order the protocol fixes:

    base model -> judge -> fine-tune strength (baseline only, held-out seeds) -> lambda calibration
    -> runs (seeds outermost, then reference sets, then arms) -> results (paired, power)

Everything expensive is cached: the base model, judge and class images under
``cache_dir``, every run (strength trials included) as its own JSON + images
written atomically under ``out_dir``. A rerun reuses what is finished and
matches the current config, so a crash or a deadline (``stop_at``) loses at
most the run in progress; a later session carries on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from accord_face import stop_at
from accord_face.config import ConfigError, to_dict
from accord_face.testbed.arms import (CONTEXTS, DEFAULT_ARMS, Arm, calibrate_lambda, class_images, finetune,
                                      make_arms, reference_set)
from accord_face.testbed.base import load_state, save_state, train_base
from accord_face.testbed.config import FinetuneConfig, TestbedConfig
from accord_face.testbed.evaluate import METRICS, RATES, evaluate_model, prompt_accuracy, score_images
from accord_face.testbed.judge import train_judge
from accord_face.testbed.model import to_uint8
from accord_face.testbed.report import save_grid, write_plot, write_table
from accord_face.testbed.stats import paired, power_analysis, summarize

log = logging.getLogger(__name__)
PROTOCOL_VERSION = 2
ASSETS = Path(__file__).parent / "assets"
REBUILD = "python scripts/run_testbed.py --config configs/testbed.yaml --export-assets use_assets=false"


def write_json(obj, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: reference sets may run in parallel
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def cached_json(path: Path, make, key: str | None = None):
    """The JSON at ``path`` if it exists (and records ``key``), else make() written there."""
    if path.exists():
        obj = json.loads(path.read_text())
        if key is None or obj.get("key") == key:
            return obj
        log.info("%s was made with another config: redoing it", path)
    obj = make()
    if key is not None:
        obj["key"] = key
    write_json(obj, path)
    return obj


def config_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def strength_key_dict(sc) -> dict:
    """``to_dict(strength)`` without the fields added after protocol v2's first run while they hold their
    default (``arm: baseline``): v2's cached strength choice keeps its key under the current code."""
    d = to_dict(sc)
    if d.get("arm") == "baseline":
        del d["arm"]
    return d


def _tail_mean(xs: list[float], frac: float, last: bool) -> float | None:
    if not xs:
        return None
    k = max(1, int(len(xs) * frac))
    return float(np.mean(xs[-k:] if last else xs[:k]))


class Runner:
    """One (arm, reference set, seed) run = fine-tune + generate + judge, cached as JSON + npz."""

    def __init__(self, cfg: TestbedConfig, base, judge, judge_id: str, cache: Path):
        self.cfg, self.base, self.judge, self.judge_id, self.cache = cfg, base, judge, judge_id, cache
        self.refsets: dict[tuple[int, bool], object] = {}
        self._prior = None
        self.deadline = stop_at.deadline(cfg.stop_at)
        self.durations: dict[str, float] = {}
        self.skipped: list[str] = []

    def archive_files(self, *paths: Path) -> None:
        """Gzip finished results into the committed archive (``cfg.archive``): a fresh checkout resumes."""
        if self.cfg.archive:
            from accord_face import archive

            archive.save(Path(self.cfg.out_dir), Path(self.cfg.archive), paths)

    def refs(self, r: int, varied: bool = False):
        if (r, varied) not in self.refsets:
            self.refsets[(r, varied)] = reference_set(r, self.cfg.finetune.n_refs, varied)
        return self.refsets[(r, varied)]

    def prior_images(self) -> torch.Tensor:
        if self._prior is None:
            n, path = self.cfg.finetune.n_class_images, self.cache / f"class_images_{self.cfg.finetune.n_class_images}.safetensors"
            if path.exists():
                self._prior = load_state(path)["images"]
            else:
                ev = self.cfg.eval
                self._prior = class_images(self.base, n, steps=ev.sample_steps, guidance=ev.guidance)
                save_state({"images": self._prior}, path)
                save_grid(self._prior, ["a cross"] * n, Path(self.cfg.out_dir) / "samples" / "class_images.png")
        return self._prior

    def run(self, folder: Path, arm: Arm | None, r: int, seed: int, ft: FinetuneConfig, lam: float,
            save_samples: bool = False) -> dict | None:
        """``arm`` None = the base model itself. Returns None when the deadline leaves no time for it."""
        cfg, ev = self.cfg, self.cfg.eval
        name = arm.name if arm else "base"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}_ref{r}_seed{seed}.json"
        key = config_key(PROTOCOL_VERSION, to_dict(ev), CONTEXTS[r], seed,
                         None if arm is None else (to_dict(arm), to_dict(ft), round(lam, 8)))
        if path.exists():
            res = json.loads(path.read_text())
            stale_judge = res.get("judge") != self.judge_id
            if res.get("key") == key and stale_judge and not path.with_suffix(".npz").exists():
                log.info("%s was judged by %s and its images are not here (restored from the archive): rerunning it",
                         path.name, res.get("judge"))
            elif res.get("key") == key:
                if stale_judge:  # judged by another judge: re-judge the stored images
                    res["metrics"], _ = score_images(load_run_images(path), self.judge, CONTEXTS[r],
                                                     ev.images_per_prompt, ev.unrelated_prompts, cfg.judge.threshold)
                    res["judge"] = self.judge_id
                    write_json(res, path)
                self.archive_files(path)
                return res
            log.info("%s was made with another config: rerunning it", path.name)
        if self.deadline is not None:
            est = self.durations.get(name, max(self.durations.values(), default=0.0))
            if time.time() + 1.2 * est > self.deadline:
                self.skipped.append(path.name)
                log.info("skipping %s: it would not finish before stop_at=%s", path.name, cfg.stop_at)
                return None
        t0 = time.time()
        logs: dict = {}
        if arm is None:
            model = self.base
        else:
            refs = self.refs(r, varied=arm.refs == "varied")
            model, logs = finetune(self.base, arm, refs, ft, seed, lam, self.prior_images() if arm.prior else None)
        means, raw = evaluate_model(model, self.judge, CONTEXTS[r], seed, ev.images_per_prompt, ev.unrelated_prompts,
                                    ev.sample_steps, ev.guidance, cfg.judge.threshold)
        if save_samples:
            save_grid(raw["images"], [_labels(raw, k) for k in range(len(raw["prompts"]))],
                      folder / f"{name}_ref{r}_seed{seed}.png")
        np.savez_compressed(path.with_suffix(".npz"), images=to_uint8(raw["images"]))
        res = {"protocol_version": PROTOCOL_VERSION, "key": key, "arm": name, "ref_set": r, "seed": seed,
               "context": list(CONTEXTS[r]), "lambda_dd": lam, "finetune": to_dict(ft) if arm else None,
               "metrics": means, "judge": self.judge_id, "n_images": raw["n_target"],
               "seconds": round(time.time() - t0, 1),
               "L_base_first": _tail_mean(logs.get("L_base", []), 0.2, False),
               "L_base_last": _tail_mean(logs.get("L_base", []), 0.2, True),
               "L_DD_first": _tail_mean(logs.get("L_DD", []), 0.2, False),
               "L_DD_last": _tail_mean(logs.get("L_DD", []), 0.2, True),
               "L_prior_last": _tail_mean(logs.get("L_prior", []), 0.2, True),
               "ratio_mean": _tail_mean(logs.get("ratio", []), 1.0, True),
               "delta_by_quartile": {q: {"first": _tail_mean(v, 0.2, False), "last": _tail_mean(v, 0.2, True)}
                                     for q, v in logs.get("delta_by_quartile", {}).items()}}
        write_json(res, path)
        self.archive_files(path)
        self.durations[name] = res["seconds"]
        log.info("%s ref%d seed%d: %s (%.0fs)", name, r, seed,
                 {k: round(v, 3) for k, v in means.items() if k in RATES}, res["seconds"])
        return res


def pick_strength(rows: list[dict], min_fidelity: float, min_kept: float) -> tuple[int, bool]:
    """(index of the chosen candidate, whether it meets both criteria) from rows with
    ``target_fidelity`` and ``alignment_kept``: among candidates with fidelity >= min_fidelity and
    alignment kept >= min_kept the one keeping the most alignment; if none, the highest fidelity
    among those keeping enough alignment, else the highest fidelity."""
    if not rows:
        raise ValueError("strength.candidates is empty")
    passing = [i for i, x in enumerate(rows) if x["target_fidelity"] >= min_fidelity and x["alignment_kept"] >= min_kept]
    if passing:
        return max(passing, key=lambda i: rows[i]["alignment_kept"]), True
    keep = [i for i, x in enumerate(rows) if x["alignment_kept"] >= min_kept] or list(range(len(rows)))
    return max(keep, key=lambda i: rows[i]["target_fidelity"]), False


def choose_strength(runner: Runner, out: Path) -> dict:
    """Pick the fine-tune strength on `baseline` with held-out seeds, before any ACCORD arm runs.

    A candidate passes when baseline's target fidelity >= min_fidelity and its unrelated-prompt
    alignment is >= min_alignment_kept of the base model's (same seeds). Among passing candidates
    the one keeping the most alignment wins; if none passes, the highest fidelity among those
    keeping enough alignment, else the highest fidelity (``criteria_met`` false).
    """
    cfg, sc = runner.cfg, runner.cfg.strength
    arm = make_arms(cfg.finetune)[sc.arm]

    def metrics(folder: Path, arm: Arm | None, r: int, s: int, ft: FinetuneConfig) -> dict:
        res = runner.run(folder, arm, r, s, ft, 0.0)
        if res is None:
            raise ConfigError(f"the fine-tune strength choice did not finish before stop_at={cfg.stop_at}; rerun "
                              "later (finished trials are cached) or move stop_at")
        return res["metrics"]
    base_align = [metrics(out / "strength", None, r, s, cfg.finetune)["unrelated_alignment"]
                  for r in sc.ref_sets for s in sc.seeds]
    rows = []
    for i, c in enumerate(sc.candidates):
        ft = replace(cfg.finetune, mode=c.mode, lr=c.lr, steps=c.steps, lora_rank=c.lora_rank)
        ms = [metrics(out / "strength" / f"c{i}_{c.mode}_lr{c.lr:g}_s{c.steps}", arm, r, s, ft)
              for r in sc.ref_sets for s in sc.seeds]
        fid = float(np.mean([m["target_fidelity"] for m in ms]))
        kept = float(np.mean([m["unrelated_alignment"] for m in ms]) / max(np.mean(base_align), 1e-9))
        rows.append({"candidate": to_dict(c), "target_fidelity": fid, "alignment_kept": kept,
                     "coupling_rate": float(np.mean([m["coupling_rate"] for m in ms])),
                     "text_alignment": float(np.mean([m["text_alignment"] for m in ms]))})
        log.info("strength candidate %d %s: fidelity %.2f, alignment kept %.2f", i, to_dict(c), fid, kept)
    best, met = pick_strength(rows, sc.min_fidelity, sc.min_alignment_kept)
    return {"arm": sc.arm, "seeds": sc.seeds, "ref_sets": sc.ref_sets,
            "base_unrelated_alignment": float(np.mean(base_align)),
            "candidates": rows, "chosen": best, "criteria_met": met,
            "rule": f"target_fidelity >= {sc.min_fidelity} and alignment kept >= {sc.min_alignment_kept}; "
                    "among those, most alignment kept"}


def run_testbed(cfg: TestbedConfig) -> dict:
    arms = make_arms(cfg.finetune)
    names = cfg.arms or list(DEFAULT_ARMS)
    unknown = [a for a in names + [cfg.strength.arm] if a not in arms]
    if unknown:
        raise ConfigError(f"testbed: unknown arm(s) {unknown} in 'arms' / 'strength.arm'; choose from {list(arms)}")
    if cfg.reference_arm not in names:
        log.warning("reference_arm %r is not among the arms run %s: no paired differences or power this pass",
                    cfg.reference_arm, names)
    out, cache = Path(cfg.out_dir), Path(cfg.cache_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "samples").mkdir(exist_ok=True)
    torch.set_num_threads(cfg.threads)
    ev = cfg.eval
    if cfg.archive:
        from accord_face import archive

        if archive.ignored_by_git(Path(cfg.archive) / "runs" / "x.json.gz"):
            log.warning("%s is ignored by git: its archived runs would not be committed (fix .gitignore)", cfg.archive)
        log.info("restored %d files of finished work from %s", archive.restore(out, Path(cfg.archive)), cfg.archive)

    if cfg.use_assets:
        restore_assets(cfg, cache)
    base = train_base(cfg.base, cache)
    judge, judge_report = train_judge(cfg.judge, cache)
    log.info("judge held-out accuracy: %s", judge_report)
    judge_id = f"v{cfg.judge.version}"
    base_acc = cached_json(out / f"base_prompt_accuracy_judge_{judge_id}.json", lambda: prompt_accuracy(
        base, judge, 96, 777, ev.sample_steps, ev.guidance, cfg.judge.threshold), key=config_key(to_dict(cfg.base)))
    log.info("base-model prompt accuracy: %s", base_acc)

    runner = Runner(cfg, base, judge, judge_id, cache)
    runner.archive_files(out / f"base_prompt_accuracy_judge_{judge_id}.json")
    for r in cfg.ref_sets:
        save_grid(runner.refs(r).images, [f"ref{r}"] * cfg.finetune.n_refs, out / "samples" / f"references_{r}.png")

    # 1. fine-tune strength, on baseline and held-out seeds, before any ACCORD arm
    strength = None
    ft = cfg.finetune
    if cfg.strength.candidates:
        strength = cached_json(out / "strength.json", lambda: choose_strength(runner, out),
                               key=config_key(strength_key_dict(cfg.strength), to_dict(cfg.finetune), to_dict(ev)))
        c = cfg.strength.candidates[strength["chosen"]]
        ft = replace(ft, mode=c.mode, lr=c.lr, steps=c.steps, lora_rank=c.lora_rank)
        runner.archive_files(out / "strength.json")
        log.info("fine-tune strength: %s (criteria met: %s)", to_dict(c), strength["criteria_met"])

    # 2. lambda calibration on the trainable parameters, one file per reference set (parallel-safe)
    def dd_kind(a: str) -> str:
        return f"t={arms[a].timesteps},keep_bg={arms[a].keep_background},refs={arms[a].refs}"
    kinds = {dd_kind(a): a for a in names if arms[a].ratio > 0}
    calib: dict = {}
    for r in cfg.ref_sets:
        def calibrate(r=r):
            return {kind: calibrate_lambda(base, replace(arms[a], ratio=1.0), runner.refs(r), ft)
                    for kind, a in kinds.items()}
        calib[r] = cached_json(out / f"calibration_ref{r}.json", calibrate, key=config_key(to_dict(ft), sorted(kinds)))
        runner.archive_files(out / f"calibration_ref{r}.json")
    if cfg.prepare_only:
        log.info("prepare_only: base model, judge, strength and calibration are ready")
        return {"prepared": True}

    # 3. runs: seeds outermost, so every arm gets a run on every reference set before any gets a second seed
    runs: dict[str, list[dict]] = {}
    planned = 0
    for seed in cfg.seeds:
        for r in cfg.ref_sets:
            for a in ["base"] + names:
                planned += 1
                arm = arms.get(a)
                lam = arm.ratio * calib[r][dd_kind(a)]["lambda_per_unit"] if arm is not None and arm.ratio > 0 else 0.0
                res = runner.run(out / "runs", arm, r, seed, ft, lam, save_samples=seed == cfg.seeds[0] and r < 2)
                if res is not None:
                    runs.setdefault(a, []).append(res)
    results = aggregate(cfg, runs, planned, calib, strength, ft, judge_id, judge_report, base_acc, runner.skipped)
    write_json(results, out / "results.json")
    write_table(results, out / "table.md")
    write_plot(results, out / "coupling_vs_fidelity.png")
    if cfg.archive:
        publish(out, Path(cfg.archive).parent, results)
    return results


def publish(out: Path, docs: Path, results: dict) -> bool:
    """Copy results.json, table.md and the plot to ``docs`` unless the results there hold more runs
    (a pass over a subset of the reference sets never replaces a fuller result). Returns whether copied."""
    import shutil

    old = docs / "results.json"
    if old.is_file() and json.loads(old.read_text()).get("runs_done", 0) > results["runs_done"]:
        log.info("%s holds more runs (%s) than this pass: not replaced", old, json.loads(old.read_text())["runs_done"])
        return False
    docs.mkdir(parents=True, exist_ok=True)
    for name in ("results.json", "table.md", "coupling_vs_fidelity.png"):
        tmp = docs / f".{name}.{os.getpid()}.tmp"
        shutil.copyfile(out / name, tmp)
        tmp.replace(docs / name)
    return True


def aggregate(cfg: TestbedConfig, runs: dict[str, list[dict]], planned: int, calib: dict, strength: dict | None,
              ft: FinetuneConfig, judge_id: str, judge_report: dict, base_acc: dict, skipped: list[str]) -> dict:
    """results.json (protocol v2): per arm summaries, paired differences vs baseline, calibration, power."""
    done = sum(len(v) for v in runs.values())
    by_key = {a: {(x["ref_set"], x["seed"]): x for x in rs} for a, rs in runs.items()}
    results = {"protocol_version": PROTOCOL_VERSION, "partial": done < planned, "runs_done": done,
               "runs_planned": planned, "runs_skipped": skipped, "config": to_dict(cfg), "finetune_used": to_dict(ft),
               "strength": strength, "judge": judge_id, "judge_accuracy": judge_report,
               "base_prompt_accuracy": base_acc, "calibration": _calibration_summary(calib), "arms": {}}
    base_runs = by_key.get("base", {})
    ref_arm = cfg.reference_arm
    results["reference_arm"] = ref_arm
    for a, rs in runs.items():
        entry = {m: summarize([x["metrics"][m] for x in rs]) for m in METRICS}
        kept = [x["metrics"]["unrelated_alignment"] / base_runs[(x["ref_set"], x["seed"])]["metrics"]["unrelated_alignment"]
                for x in rs if (x["ref_set"], x["seed"]) in base_runs
                and base_runs[(x["ref_set"], x["seed"])]["metrics"]["unrelated_alignment"] > 0]
        entry["unrelated_alignment_kept"] = summarize(kept) if kept else None
        entry["n_images"] = int(sum(x["n_images"] for x in rs))
        entry["lambda_dd"] = sorted({round(x["lambda_dd"], 6) for x in rs})
        entry["ratio_achieved"] = [x["ratio_mean"] for x in rs]
        entry["runs"] = [{k: x.get(k) for k in ("ref_set", "seed", "metrics", "lambda_dd", "L_base_first",
                                                "L_base_last", "L_DD_first", "L_DD_last", "L_prior_last",
                                                "delta_by_quartile", "seconds")} for x in rs]
        if a != ref_arm and ref_arm in by_key:
            ref = by_key[ref_arm]
            entry["paired_vs_baseline"] = {
                m: paired({k: x["metrics"][m] for k, x in by_key[a].items()}, {k: x["metrics"][m] for k, x in ref.items()})
                for m in METRICS}
        results["arms"][a] = entry
    power: dict = {}
    if ref_arm in results["arms"]:
        pw = cfg.power
        for a, e in results["arms"].items():
            if "paired_vs_baseline" not in e or a == "base":
                continue
            power[a] = {m: power_analysis(e["paired_vs_baseline"][m], results["arms"][ref_arm][m]["mean"],
                                          pw.relative_reduction, pw.power, pw.alpha)
                        for m in ("coupling_rate", "coupling_rate_p")}
            # the same share of the reference arm's *excess* coupling over the base model (what fine-tuning added)
            for m in ("coupling_rate", "coupling_rate_p"):
                excess = results["arms"][ref_arm][m]["mean"] - results["arms"].get("base", {}).get(m, {}).get("mean",
                                                                                                          np.nan)
                if np.isfinite(excess) and excess > 0:
                    power[a][f"{m}_excess"] = {**power_analysis(e["paired_vs_baseline"][m], excess,
                                                                pw.relative_reduction, pw.power, pw.alpha),
                                               "excess_over_base": float(excess)}
    results["power"] = {"relative_reduction": cfg.power.relative_reduction, "power": cfg.power.power,
                        "alpha": cfg.power.alpha, "test": "paired t, two-sided, pairs = (reference set, seed)",
                        "arms": power}
    return results


def _calibration_summary(calib: dict) -> dict:
    """Per DD kind: grad and loss ratios per reference set, and how far the sets' values spread."""
    out: dict = {}
    for r, kinds in calib.items():
        for kind, c in kinds.items():
            if kind == "key":
                continue
            e = out.setdefault(kind, {"per_ref_set": {}})
            e["per_ref_set"][str(r)] = {k: c[k] for k in ("grad_ratio", "loss_ratio", "lambda_per_unit", "split_half",
                                                          "samples")}
    for e in out.values():
        g = [v["grad_ratio"] for v in e["per_ref_set"].values()]
        lr = [v["loss_ratio"] for v in e["per_ref_set"].values()]
        e["grad_ratio_mean"], e["loss_ratio_mean"] = float(np.mean(g)), float(np.mean(lr))
        e["grad_ratio_max_over_min"] = float(max(g) / min(g))
        first_two = list(e["per_ref_set"].values())[:2]
        if len(first_two) == 2:
            a, b = first_two[0]["grad_ratio"], first_two[1]["grad_ratio"]
            e["first_two_sets_agree_within_20pct"] = bool(abs(a - b) / max(a, b) <= 0.2)
    return out


def _asset_names(cfg: TestbedConfig) -> list[tuple[str, str, object]]:
    """(asset name, name in the cache, the config section it is made with) of the base model and judge."""
    judge = f"judge_v{cfg.judge.version}"
    return [(cfg.base_asset, "base_model", cfg.base), (judge, judge, cfg.judge)]


def restore_assets(cfg: TestbedConfig, cache: Path) -> None:
    """Copy the committed base model / judge into an empty cache when they were made with this config."""
    import shutil
    for name, cached, sub in _asset_names(cfg):
        src, meta = ASSETS / f"{name}.safetensors", ASSETS / f"{name}.json"
        if (cache / f"{cached}.safetensors").exists() or not src.exists() or not meta.exists():
            continue
        if json.loads(meta.read_text()).get("config") == to_dict(sub):
            cache.mkdir(parents=True, exist_ok=True)
            tmp = cache / f"{cached}.{os.getpid()}.tmp"  # atomic: parallel processes may restore at once
            shutil.copyfile(src, tmp)
            os.replace(tmp, cache / f"{cached}.safetensors")
            if cached == "base_model":  # its record goes with it (train_base checks it)
                shutil.copyfile(meta, tmp)
                os.replace(tmp, cache / "base_model.json")
            log.info("using the committed %s (%s): its config matches", name, src)
        else:
            log.info("not using the committed %s: it was made with another config", name)


def export_assets(cfg: TestbedConfig, assets: Path = ASSETS, config_path: str = "configs/testbed.yaml") -> list[Path]:
    """Train (or load) the base model and judge into the cache, then copy them to ``assets`` (the base as
    ``cfg.base_asset``) with their config and the command that rebuilds them (what restore_assets checks)."""
    import shutil
    cache = Path(cfg.cache_dir)
    train_base(cfg.base, cache)
    _, report = train_judge(cfg.judge, cache)
    rebuild = REBUILD.replace("configs/testbed.yaml", config_path)
    written = []
    for (name, cached, sub), extra in zip(_asset_names(cfg), ({}, {"held_out_accuracy": report})):
        src, dst = cache / f"{cached}.safetensors", assets / f"{name}.safetensors"
        assets.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        write_json({"config": to_dict(sub), "protocol_version": PROTOCOL_VERSION, "rebuild": rebuild, **extra},
                   assets / f"{name}.json")
        written += [dst, assets / f"{name}.json"]
    return written


def load_run_images(path: Path) -> torch.Tensor:
    """A run's generated images (N, 3, H, W) in [-1, 1] from its .npz."""
    npz = path.with_suffix(".npz")
    if not npz.exists():
        raise FileNotFoundError(f"{path}: no stored images ({npz.name}) to re-judge; delete {path} to rerun it")
    arr = np.load(npz)["images"]
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _labels(raw: dict, k: int) -> str:
    from accord_face.testbed.world import BG_NAMES, LABELS
    found = [s[:3] for i, s in enumerate(LABELS) if raw["present"][k, i]]
    return ",".join(found) + "/" + BG_NAMES[int(raw["bg"][k])][:3]
