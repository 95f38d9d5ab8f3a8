"""Does ACCORD help the identity encoder? The encoder coupling experiment on the identity world.

Protocol (fixed before any arm result was seen; README "Does ACCORD help the encoder?"):

1. **Setting.** The main trainer (``scripts/train_encoder.py`` under the deepspeed launcher) trains
   FaceID-Plus (``configs/faces_plus.yaml``: world_a embedding + the world CLIP's states of the
   aligned face crop) on ``embedded:faces`` for ``steps`` steps. Main data: k = 1 photo for each of
   2,000 training identities, the identity inputs taken from the very photo being denoised (FFHQ).
2. **Arms** (same identities, prompts, noise, seeds and data order; same steps): ``ARMS`` below.
   DDLoss doses are set by the gradient-norm ratio on the trainable parameters, calibrated on the
   seed-0 baseline adapter (``accord_face.train.calibrate``); both ratios are reported.
3. **Evaluation** (``accord_face.world.evaluate``): 50 held-out identities (2000-2049), one
   reference photo each in a context A, 2 prompts with contexts B != A (background, shirt and
   accessory differ), each generated at adapter scales 0.25 / 0.5 / 1.0 / 1.5 and once at scale 0
   (the base model, same noise). Judges: recognizer B (identity; never used in training), the world
   judge (context fields), the world CLIP (CLIP-T).
4. **Metrics** per (run, identity, scale): identity similarity (cos of recognizer-B embeddings),
   retrieval top-1 among the 50, prompt alignment (share of B's four fields the judge finds),
   coupling (share of the fields where A != B that show A) minus the base model's coupling on the
   same prompts and noise; continuous judge probabilities beside the rates.
5. **Comparison** on curves over scale, never at one scale: the identity-vs-alignment gap
   (alignment gained at equal identity similarity) and the identity-vs-coupling gap (coupling
   removed at equal identity similarity), ``stats.curve_gap``; paired by seed and identity;
   95 % intervals by the two-level (seed, identity) bootstrap.
6. **Power**: from the pilot (baseline and ``dd_r0.3``, seeds 0 and 1), the variance components of
   the paired coupling gap give the seeds needed to detect 30 % of the baseline's excess coupling
   at 80 % power (two-sided 0.05); that many seeds are run for the key arms (at least 3).

Every run is cached under ``out/runs/<arm>-<hash>/seed<k>/`` (the hash covers everything that
changes the run), so the experiment resumes across sessions and never recomputes a finished run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..config import field

log = logging.getLogger(__name__)

SCALES = (0.25, 0.5, 1.0, 1.5)
P_OMIT = 0.5   # protocol revision 1: captions truthful but incomplete (see docs/encoder_coupling/PROTOCOL.md)
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Arm:
    data: str                         # key of DATA
    overrides: tuple[str, ...]        # trainer key=value overrides (after the dose is resolved)
    role: str                         # baseline | faithful | prior | combined | cheap | variant | control
    dd_ratio: Optional[float] = None  # DDLoss dose as a gradient-norm ratio (resolved by calibration)
    pd_ratio: Optional[float] = None  # PDLoss dose as a gradient-norm ratio (None: the fixed lambda_pd given)
    note: str = ""


NO_ACCORD = ("losses.lambda_dd=0", "losses.lambda_pd=0")
FAITHFUL = ("losses.lambda_pd=0", "losses.dd_batch_fraction=1", "losses.dd_every_n_steps=1",
            "losses.dd_reference=live", "losses.dd_timesteps=shared")
BEST_DD = 0.3   # the dose the combined / cheap / variant arms use (the pilot's dose; see README for the rule)

ARMS: dict[str, Arm] = {
    "baseline": Arm("main", NO_ACCORD, "baseline"),
    "dd_r0.1": Arm("main", FAITHFUL, "faithful", dd_ratio=0.1, note="paper's DDLoss, gradient ratio 0.1"),
    "dd_r0.3": Arm("main", FAITHFUL, "faithful", dd_ratio=0.3, note="paper's DDLoss, gradient ratio 0.3"),
    "dd_r1": Arm("main", FAITHFUL, "faithful", dd_ratio=1.0, note="paper's DDLoss, gradient ratio 1"),
    "pd_paper": Arm("main", ("losses.lambda_dd=0", "losses.lambda_pd=0.003"), "prior",
                    note="PDLoss alone at the paper's largest weight 0.003"),
    "pd_r0.3": Arm("main", ("losses.lambda_dd=0",), "prior", pd_ratio=0.3, note="PDLoss alone, gradient ratio 0.3"),
    "dd_pd": Arm("main", FAITHFUL[1:] + ("losses.lambda_pd=0.003",), "combined", dd_ratio=BEST_DD,
                 note="DDLoss + PDLoss"),
    "dd_cheap": Arm("main", ("losses.lambda_pd=0", "losses.dd_batch_fraction=0.25", "losses.dd_every_n_steps=4"),
                    "cheap", dd_ratio=BEST_DD, note="the best dose's lambda, DDLoss on 1/4 of the batch every 4th step "
                                                    "(the performance issue's cheap setting)"),
    "ours_frozen_ref": Arm("main", FAITHFUL[:3] + ("losses.dd_reference=frozen_initial",
                                                   "losses.dd_timesteps=shared"),
                           "variant", dd_ratio=BEST_DD, note="ours: no-grad branches g, z from the frozen initial "
                                                             "adapter, p live"),
    "control_other_photo": Arm("positive", NO_ACCORD + ("encoder.reference=other_photo",), "control",
                               note="positive control: identity from another photo of the person (k=4, rho=0.8)"),
    "control_rho0": Arm("negative", NO_ACCORD + ("encoder.reference=other_photo",), "control",
                        note="negative control: another photo, no home context (k=4, rho=0): nothing to copy"),
}
PILOT = ("baseline", "dd_r0.3")


@dataclass
class ExperimentConfig:
    out: str = field("testbed_out/encoder", help="experiment folder (data, runs, results.json)")
    config: str = field("configs/faces_plus.yaml", help="trainer config every run starts from")
    arms: list[str] = field(default_factory=lambda: list(PILOT), help="arms to run now (see ARMS)")
    seeds: list[int] = field(default_factory=lambda: [0, 1], help="training seeds (paired across arms)")
    steps: int = field(1000, help="training steps of every run")
    identities: int = field(50, help="held-out identities evaluated")
    prompts_per_identity: int = field(2, help="prompts with other contexts per identity")
    eval_steps: int = field(20, help="denoising steps at evaluation")
    guidance: float = field(4.0, help="classifier-free guidance at evaluation")
    batch_size: int = field(16, help="images per pipeline call")
    threads: int = field(1, help="torch threads per process")
    port: int = field(29850, help="first rendezvous port of the launcher (one per run)")
    calibration_batches: int = field(16, help="batches averaged for the lambda calibration")
    analyze_only: bool = field(False, help="only aggregate the finished runs (no training)")
    archive: str = field("docs/encoder_coupling", help="committed copy of every finished run's records "
                                                       "(restored on start: a new checkout resumes, never retrains)")


def data_settings():
    from .coupling import CouplingData

    return {"main": CouplingData(rho=0.0, k=1, p_omit=P_OMIT, identities=2000),
            "positive": CouplingData(rho=0.8, k=4, p_omit=P_OMIT, identities=2000),
            "negative": CouplingData(rho=0.0, k=4, p_omit=P_OMIT, identities=2000)}


def write_json(path: Path, obj) -> None:
    from ..pipeline import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def ensure_shards(out: Path, name: str, progress: bool = True) -> Path:
    """World photos -> shards through ``scripts/prepare_shards.py --backend world`` (cached)."""
    from .coupling import write_coupling_photos

    data = data_settings()[name]
    shards = out / "data" / data.name / "shards"
    if (shards / "manifest.json").is_file():
        return shards
    photos = write_coupling_photos(out / "data" / data.name / "photos", data, progress=progress)
    return prepare_world_shards(photos, shards)


def prepare_world_shards(photos: Path, shards: Path, env: dict | None = None) -> Path:
    """``scripts/prepare_shards.py --backend world`` at the world's 64 px, one worker (as make demo)."""
    cmd = [sys.executable, str(REPO / "scripts/prepare_shards.py"), "--input", str(photos), "--output", str(shards),
           "--backend", "world", "--resolution", "64", "--context-scale", "8", "--min-image-size", "32",
           "--workers", "1", "--no-progress"]
    subprocess.run(cmd, check=True, env=env)
    return shards


def calibrate(cfg: ExperimentConfig, out: Path, baseline_adapter: Path, shards: Path) -> dict:
    """Gradient-norm and loss ratios of DDLoss and PDLoss at lambda = 1, at init and at the baseline adapter."""
    path = out / "calibration.json"
    if path.is_file():
        return json.loads(path.read_text())
    from ..train.calibrate import gradient_ratios

    res = {}
    for where, adapter in (("initial", None), ("baseline_seed0", str(baseline_adapter))):
        res[where] = gradient_ratios(str(REPO / cfg.config), str(shards), adapter, batches=cfg.calibration_batches,
                                     overrides=[f"max_steps={cfg.steps}"], step=cfg.steps)
    write_json(path, res)
    return res


def resolve_overrides(arm: Arm, calib: Optional[dict]) -> list[str]:
    """The arm's trainer overrides with its doses turned into lambdas (calibrated at the baseline adapter)."""
    from ..train.calibrate import lambda_for_ratio

    over = list(arm.overrides)
    if arm.dd_ratio is not None or arm.pd_ratio is not None:
        m = calib["baseline_seed0"]["mean"]
        if arm.dd_ratio is not None:
            lam = lambda_for_ratio(arm.dd_ratio, m["grad_base"], m["grad_dd"])
            over.append(f"losses.lambda_dd={lam:.6g}")
        if arm.pd_ratio is not None:
            over.append(f"losses.lambda_pd={lambda_for_ratio(arm.pd_ratio, m['grad_base'], m['grad_pd']):.6g}")
    return over


def run_key(arm_name: str, arm: Arm, overrides: list[str], cfg: ExperimentConfig) -> str:
    spec = {"data": dataclasses.asdict(data_settings()[arm.data]), "overrides": overrides, "steps": cfg.steps,
            "config": (REPO / cfg.config).read_text()}
    return f"{arm_name}-{hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]}"


def world_env(threads: int) -> dict:
    """The environment of a world job's subprocesses: ``threads`` torch threads, offline, CPU DeepSpeed."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               DS_ACCELERATOR=env.get("DS_ACCELERATOR", "cpu"), TOKENIZERS_PARALLELISM="false")
    return env


def launch_train_encoder(config: str, shards: Path, output_dir: Path, steps: int, port: int, extra: list[str],
                         log_path: Path, threads: int, ranks: int = 1, deadline: float | None = None) -> bool:
    """``deepspeed --num_gpus RANKS scripts/train_encoder.py --config CONFIG shards=... output_dir=... max_steps=N
    EXTRA...`` (on CPU one process per rank, ``threads`` torch threads each), output appended to ``log_path``;
    raises CalledProcessError when the trainer fails. At ``deadline`` (epoch seconds) the launcher gets SIGTERM,
    which it passes on: the trainer checkpoints at the next step and leaves. Returns True when so stopped."""
    deepspeed = Path(sys.executable).with_name("deepspeed")
    cmd = [str(deepspeed), "--num_gpus", str(ranks), "--master_port", str(port), str(REPO / "scripts/train_encoder.py"),
           "--config", str(REPO / config), f"shards={shards}", f"output_dir={output_dir}", f"max_steps={steps}",
           *extra]
    return run_until(cmd, log_path, world_env(threads), deadline)


def terminate_leaves(pid: int) -> None:
    """SIGTERM to every process under ``pid`` that has no children of its own (``pid`` itself if it has none)."""
    import psutil

    try:
        tree = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    leaves = [p for p in tree if not _has_children(p)] or [psutil.Process(pid)]
    for p in leaves:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass


def _has_children(p) -> bool:
    import psutil

    try:
        return bool(p.children())
    except psutil.NoSuchProcess:
        return False


def run_until(cmd: list[str], log_path: Path, env: dict, deadline: float | None = None, grace_s: float = 120.0
              ) -> bool:
    """Run ``cmd`` (output appended to ``log_path``); at ``deadline`` send SIGTERM to the leaves of its process
    tree (the trainer's ranks, not the launcher: a rank whose launcher is gone stops without a checkpoint), and
    SIGKILL it if it is still there ``grace_s`` later. True: stopped at the deadline (its exit code is then the
    stop's, not a failure); raises CalledProcessError when it fails on its own."""
    stopped = False
    with open(log_path, "a") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        while True:
            try:
                rc = proc.wait(timeout=None if deadline is None else max(deadline - time.time(), 0.05))
                break
            except subprocess.TimeoutExpired:
                if stopped:
                    proc.kill()
                else:
                    terminate_leaves(proc.pid)
                    stopped, deadline = True, time.time() + grace_s
    if rc and not stopped:
        raise subprocess.CalledProcessError(rc, cmd)
    return stopped


def train_run(cfg: ExperimentConfig, run_dir: Path, shards: Path, overrides: list[str], seed: int, port: int) -> Path:
    """The main job under the deepspeed launcher; resumes a killed run (``resume_from_checkpoint=latest``)."""
    adapter = run_dir / "train" / "adapter"
    done = adapter / "adapter_config.json"
    if done.is_file() and json.loads(done.read_text()).get("train_steps") == cfg.steps:
        return adapter
    run_dir.mkdir(parents=True, exist_ok=True)
    launch_train_encoder(cfg.config, shards, run_dir / "train", cfg.steps, port,
                         [f"seed={seed}", "checkpoint.every_n_steps=250", "validation.every_n_steps=0",
                          "logging.progress=false", *overrides], run_dir / "train.log", cfg.threads)
    return adapter


def eval_run(cfg: ExperimentConfig, out: Path, run_dir: Path, adapter: Path, arms: dict[str, float]) -> Path:
    """Scored records of every held-out job at each scale (cached as records.jsonl)."""
    records = run_dir / "records.jsonl"
    if records.is_file():
        return records
    import torch

    from ..pipeline import FaceIDGenerator
    from .evaluate import EvalPlan, WorldScorer, generate_records, write_records

    torch.set_num_threads(cfg.threads)
    scorer = WorldScorer()
    plan = EvalPlan.make(out / "references", cfg.identities, cfg.prompts_per_identity, 0, scorer)
    gen = FaceIDGenerator(str(adapter), None, "cpu")
    recs = generate_records(gen, plan, scorer, arms, run_dir / "eval", steps=cfg.eval_steps, guidance=cfg.guidance,
                            batch_size=cfg.batch_size)
    write_records(records, recs)
    return records


ARCHIVED = ("run.json", "records.jsonl", "train/metrics.jsonl")


def archive_ignored(archive: Path) -> bool:
    from ..archive import ignored_by_git

    return ignored_by_git(archive / "runs" / "arm" / "seed0" / "records.jsonl.gz")


def sync_archive(out: Path, archive: Path, restore: bool) -> int:
    """Copy the small per-run files between the working folder and the committed archive (gzip there).

    restore=True: archive -> out, files the working folder lacks; False: out -> archive (finished runs
    only: a run's files are archived once its records.jsonl exists). Returns the number of files copied."""
    from .. import archive as arch

    if restore:
        return arch.restore(out, archive)
    files = [out / "calibration.json", out / "base" / "records.jsonl"]
    for rec in sorted(out.glob("runs/*/seed*/records.jsonl")):
        files += [rec.parent / name for name in ARCHIVED]
    return arch.save(out, archive, files)


def run_experiment(cfg: ExperimentConfig) -> dict:
    from .analysis import analyze

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    archive = REPO / cfg.archive if cfg.archive else None
    if archive and archive_ignored(archive):
        log.warning("%s is ignored by git: its archived runs would not be committed (fix .gitignore)", archive)
    if archive and archive.is_dir():
        log.info("restored %d files of finished runs from %s", sync_archive(out, archive, restore=True), archive)
    unknown = [a for a in cfg.arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; choose from {sorted(ARMS)}")
    write_json(out / "protocol.json", {"arms": {k: dataclasses.asdict(v) for k, v in ARMS.items()},
                                       "data": {k: dataclasses.asdict(v) for k, v in data_settings().items()},
                                       "scales": SCALES, "pilot": PILOT, "config": dataclasses.asdict(cfg)})
    calib = json.loads((out / "calibration.json").read_text()) if (out / "calibration.json").is_file() else None
    port = iter(range(cfg.port, cfg.port + 10_000))    # one rendezvous port per training run

    def run_one(name: str, seed: int) -> Path:
        """Train, evaluate and archive one (arm, seed); a finished run (here or restored) is reused."""
        arm = ARMS[name]
        overrides = resolve_overrides(arm, calib)
        run_dir = out / "runs" / run_key(name, arm, overrides, cfg) / f"seed{seed}"
        write_json(run_dir / "run.json", {"arm": name, "seed": seed, "overrides": overrides,
                                          "data": dataclasses.asdict(data_settings()[arm.data]), "steps": cfg.steps})
        log.info("run %s seed %d: %s", name, seed, " ".join(overrides))
        if (run_dir / "records.jsonl").is_file():
            return run_dir
        adapter = train_run(cfg, run_dir, ensure_shards(out, arm.data), overrides, seed, next(port))
        if not (out / "base" / "records.jsonl").is_file():   # scale 0 = the base model, same noise
            eval_run(cfg, out, out / "base", adapter, {"base": 0.0})
        eval_run(cfg, out, run_dir, adapter, {f"s{s:g}": s for s in SCALES})
        if archive:
            sync_archive(out, archive, restore=False)
        return run_dir

    if not cfg.analyze_only:
        needs_dose = any(ARMS[a].dd_ratio is not None or ARMS[a].pd_ratio is not None for a in cfg.arms)
        if needs_dose and calib is None:     # the lambda calibration is taken at the seed-0 baseline's adapter
            base = run_one("baseline", 0)
            calib = calibrate(cfg, out, base / "train" / "adapter", ensure_shards(out, "main"))
        order = ["baseline"] + [a for a in cfg.arms if a != "baseline"] if "baseline" in cfg.arms else cfg.arms
        for seed in cfg.seeds:
            for name in order:
                run_one(name, seed)
    results = analyze(out, calib)
    write_json(out / "results.json", results)
    return results


def write_outputs(cfg: ExperimentConfig, results: dict) -> str:
    """results.md, curves.png and a sample grid (seed 0 of baseline and up to two other arms) in ``out``,
    copied with results.json into the archive. Returns the Markdown table."""
    import shutil

    from .analysis import write_diagnostics_table, write_plot, write_sample_grid, write_table

    out = Path(cfg.out)
    table = write_table(results)
    diag = write_diagnostics_table(results)
    (out / "results.md").write_text(table + "\n" + (f"\nTraining diagnostics (first -> last 20 % of steps; Delta_t by "
                                                      f"timestep quartile, q0 = lowest t):\n\n{diag}\n" if diag else ""))
    write_plot(results, out / "curves.png")
    runs = {}
    for arm in ["baseline"] + [a for a in cfg.arms if a != "baseline"]:
        found = sorted(out.glob(f"runs/{arm}-*/seed0/records.jsonl"))
        if found and len(runs) < 3:
            runs[arm] = found[-1].parent
    if runs:
        write_sample_grid(out, runs, out / "samples.png")
    if cfg.archive:
        archive = REPO / cfg.archive
        archive.mkdir(parents=True, exist_ok=True)
        for name in ("results.json", "results.md", "curves.png", "samples.png"):
            if (out / name).is_file():
                shutil.copyfile(out / name, archive / name)
    return table
