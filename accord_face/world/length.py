"""How long must the main job train? Zero-shot identity transfer against training length.

    python scripts/run_world_length.py [milestones=[4000,8000,16000]] [out=testbed_out/world_length]

One training run of ``configs/faces.yaml`` on the demo's data (training people 0-1499, 4 photos
each, world-backend shards made by ``scripts/prepare_shards.py`` as ``make demo`` makes them),
continued milestone by milestone in one output folder: ``max_steps`` is a change the trainer
resumes across, and the learning rate is constant after its warm-up, so the run that reaches
16,000 steps passes through the states a 4,000-step run ends in. At each milestone the adapter
is exported, kept as ``adapter-<steps>/`` and evaluated zero-shot on held-out people
(``accord_face.world.evaluate``: identity similarity and retrieval with the independent
recognizer, context accuracy, coupling, CLIP-T, and the instruments' ceiling). Each milestone's
``metrics.json`` is archived (``docs/world/length/``), with ``curve.json`` and ``curve.png``.

Resumable at every level: a finished milestone is never redone (its archived metrics are the
record), a killed training resumes from its last checkpoint (every 200 steps), the latest
milestone's checkpoint is archived too (``resume/``, 4.5 MB) so that a new checkout continues the
run instead of retraining it, and
``stop_at=HH:MM`` starts no milestone whose last segment's pace says it would end later.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import stop_at
from ..config import field

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]


@dataclass
class LengthConfig:
    out: str = field("testbed_out/world_length", help="working folder (photos, shards, training, evaluations)")
    archive: str = field("docs/world/length", help="committed copy of each milestone's metrics.json and the curve")
    config: str = field("configs/faces.yaml", help="trainer config (its max_steps is replaced by the milestones)")
    milestones: list[int] = field(default_factory=lambda: [4000, 8000, 12000, 16000, 24000, 32000],
                                  help="training steps at which the adapter is exported and evaluated (increasing)")
    train_identities: int = field(1500, help="training people 0..N-1, as make demo")
    photos_per_identity: int = field(4, help="photos per training person")
    identities: int = field(50, help="held-out people evaluated")
    eval_steps: int = field(25, help="denoising steps at evaluation")
    threads: int = field(1, help="torch threads of the trainer (per rank) and the evaluation")
    ranks: int = field(1, help="data-parallel trainer processes (CPU: one per core); the config's train_batch_size "
                               "is split among them, so the global batch, and with it the recipe, is unchanged")
    port: int = field(29890, help="rendezvous port of the deepspeed launcher")
    stop_at: str = field("", help="'HH:MM' UTC: start no milestone that the last segment's pace says ends later")
    overrides: list[str] = field(default_factory=list, help="extra trainer key=value overrides (enter the run's name)")
    compare: list[str] = field(default_factory=list, help="archives of other length runs (same people, prompts and "
                                                           "noise): paired per person at the milestones both have")
    pool_with: list[str] = field(default_factory=list, help="archives of other training seeds of this recipe: "
                                                             "per-person mean over the seeds at shared milestones")
    adapter_archive_mb: float = field(0.0, help="copy each milestone's exported adapter into the archive "
                                                "(adapter-<steps>/, for branches from it) while at most this many "
                                                "MB; 0: never")
    resume_archive_mb: float = field(8.0, help="archive the latest checkpoint (so a new checkout continues the run) "
                                               "only while it is at most this many MB; 0: never")

    def validate(self) -> None:
        m = self.milestones
        if not m or any(b <= a for a, b in zip(m, m[1:])) or m[0] < 1:
            raise ValueError(f"milestones must be positive and increasing, got {m}")
        stop_at.validate(self.stop_at)
        rank_batch(self.config, self.overrides, self.ranks)
        for name in ("compare", "pool_with"):
            for folder in getattr(self, name):
                if not (REPO / folder).is_dir():
                    raise ValueError(f"{name}: {folder} is not a folder; give a length run's archive "
                                     "(e.g. docs/world/length)")


def rank_batch(config: str, overrides: list[str], ranks: int) -> int:
    """Per-rank micro batch B / R that keeps the trainer config's global batch B (its ``train_batch_size`` on one
    rank, after ``overrides``) on R = ``ranks`` ranks; refuses an R that does not divide B."""
    from ..config import load_config
    from ..train.config import TrainConfig

    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    batch = load_config(TrainConfig, str(REPO / config), list(overrides)).train_batch_size
    if batch % ranks:
        raise ValueError(f"ranks={ranks} does not divide {config}'s train_batch_size {batch}: "
                         "pick a divisor so the global batch stays the recipe's")
    return batch // ranks


def rank_overrides(config: str, overrides: list[str], ranks: int) -> list[str]:
    """The trainer overrides that run ``config`` on ``ranks`` ranks at its global batch ([] for one rank)."""
    return [f"train_batch_size={rank_batch(config, overrides, ranks)}"] if ranks > 1 else []


def ensure_shards(cfg: LengthConfig, out: Path) -> Path:
    """The demo's training data through the real path: world photos -> prepare_shards --backend world."""
    from .experiment import prepare_world_shards, world_env
    from .photos import write_training_photos

    shards = out / "shards"
    if (shards / "manifest.json").is_file():
        return shards
    photos = write_training_photos(out / "photos", range(cfg.train_identities), cfg.photos_per_identity, seed=0)
    return prepare_world_shards(photos, shards, env=world_env(cfg.threads))


RESUME = "resume"   # archive subfolder: the latest milestone's checkpoint, so a new checkout continues the run


def archive_resume_point(out: Path, archive: Path, steps: int, max_mb: float = 8.0) -> int:
    """Gzip the checkpoint the run ended at (``steps``) and its run config into ``archive/resume``, replacing
    an earlier milestone's (4.5 MB for configs/faces.yaml: adapter weights and Adam state, weights-only).
    A checkpoint over ``max_mb`` is not archived (a 16-token, 1,024-wide adapter's is 27 MB: too large to
    commit); the run then resumes only where its working folder is kept."""
    from .. import archive as arch

    ck = out / "train" / "checkpoints" / f"step-{steps:08d}"
    if not (ck / "COMPLETE").is_file():
        log.warning("no complete checkpoint at %s: a later checkout will retrain up to milestone %d", ck, steps)
        return 0
    size_mb = sum(p.stat().st_size for p in ck.iterdir() if p.is_file()) / 2**20
    if size_mb > max_mb:
        log.warning("checkpoint %s is %.1f MB > resume_archive_mb=%g: not archived; keep %s to continue the run",
                    ck, size_mb, max_mb, out)
        return 0
    dest = archive / RESUME
    for old in (dest / "train" / "checkpoints").glob("step-*"):
        if old.name != ck.name:
            shutil.rmtree(old)
    return arch.save(out, dest, sorted(p for p in ck.iterdir() if p.is_file()) + [out / "train" / "config.yaml"])


def archive_adapter(adapter: Path, archive: Path, steps: int, max_mb: float) -> Path | None:
    """Copy a milestone's exported adapter folder to ``archive/adapter-<steps>`` (atomically) when it is at most
    ``max_mb``; capacity branches start from it in a checkout without the run (``capacity.start_adapter``)."""
    size_mb = sum(p.stat().st_size for p in adapter.iterdir() if p.is_file()) / 2**20
    if max_mb <= 0 or size_mb > max_mb:
        return None
    dest = archive / f"adapter-{steps}"
    tmp = archive / f".adapter-{steps}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(adapter, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.replace(dest)
    return dest


def latest_checkpoint(out: Path) -> int | None:
    """Step of the newest complete checkpoint of the run in ``out`` (None: none)."""
    from ..train.checkpoint import complete_checkpoints

    return max((step for step, _ in complete_checkpoints(out / "train" / "checkpoints")), default=None)


def restore_resume_point(out: Path, archive: Path | None) -> bool:
    """A working folder without the run gets the archived checkpoint (True: restored, so resume with force:
    the stored config names the shards by the absolute path of the checkout that wrote it)."""
    from .. import archive as arch

    if archive is None or (out / "train" / "checkpoints").is_dir() or not (archive / RESUME).is_dir():
        return False
    n = arch.restore(out, archive / RESUME)
    if n:
        log.info("restored the run's checkpoint from %s (%d files)", archive / RESUME, n)
    return n > 0


def train_to(cfg: LengthConfig, out: Path, shards: Path, steps: int, restored: bool = False,
             deadline: float | None = None) -> Path | None:
    """Continue the one training run to ``steps`` and keep its exported adapter as ``adapter-<steps>``; None when
    ``deadline`` stopped the trainer first (it checkpointed: the next call continues from there)."""
    kept = out / f"adapter-{steps}"
    if (kept / "adapter_config.json").is_file():
        return kept
    from .experiment import launch_train_encoder

    extra = ["logging.progress=false", *cfg.overrides] + (["checkpointing.resume_from_checkpoint=force"] if restored
                                                          else [])
    extra += rank_overrides(cfg.config, cfg.overrides, cfg.ranks)
    if launch_train_encoder(cfg.config, shards, out / "train", steps, cfg.port, extra, out / "train.log",
                            cfg.threads, cfg.ranks, deadline):
        return None
    adapter = out / "train" / "adapter"
    done = json.loads((adapter / "adapter_config.json").read_text())
    if done.get("train_steps") != steps:
        raise RuntimeError(f"{adapter} is at step {done.get('train_steps')}, expected {steps}; see {out / 'train.log'}")
    tmp = out / f".adapter-{steps}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(adapter, tmp)
    tmp.replace(kept)
    return kept


def evaluate(cfg: LengthConfig, adapter: Path, folder: Path, scale: float = 1.0) -> dict:
    import torch

    from .evaluate import WorldEvalConfig, run_world_eval

    if (folder / "metrics.json").is_file():
        return json.loads((folder / "metrics.json").read_text())
    torch.set_num_threads(cfg.threads)
    return run_world_eval(WorldEvalConfig(adapter=str(adapter), out=str(folder), identities=cfg.identities,
                                          steps=cfg.eval_steps, scale=scale))


def curve(milestones: dict[int, dict]) -> dict:
    """Per milestone the headline figures (mean and 95 % interval over held-out people) and the paired
    adapter-minus-base difference; the instruments' ceiling once."""
    rows = {}
    for steps, m in sorted(milestones.items()):
        a, pair = m["arms"]["adapter"], m.get("paired_adapter_minus_base", {})
        rows[str(steps)] = {k: {"mean": a[k]["mean"], "ci95": a[k]["ci95"]}
                            for k in ("identity_similarity", "retrieval_top1", "context_accuracy", "coupling_rate",
                                      "clip_t")}
        rows[str(steps)]["paired_identity_similarity"] = pair.get("identity_similarity")
        rows[str(steps)]["context_accuracy_ratio_vs_base"] = m.get("context_accuracy_ratio_vs_base")
    first = next(iter(milestones.values()), {})
    return {"milestones": rows, "base": {k: first["arms"]["base"][k]["mean"] for k in
                                         ("identity_similarity", "retrieval_top1")} if first else None,
            "render_ceiling": first.get("render_ceiling"), "chance_top1": first.get("chance_top1")}


PAIRED = ("identity_similarity", "retrieval_top1", "context_accuracy", "coupling_rate", "clip_t")
SAME_JOBS = ("identities", "prompts_per_identity", "scale", "steps", "guidance", "seed")  # eval config fields


def _per_person(m: dict, key: str) -> list[float]:
    return m["arms"]["adapter"][key]["per_run"]


def _check_same_jobs(evals: list[dict]) -> None:
    """Paired or pooled figures only over evaluations of the same people, prompts and noise."""
    ref = {k: evals[0]["config"].get(k) for k in SAME_JOBS}
    for m in evals[1:]:
        other = {k: m["config"].get(k) for k in SAME_JOBS}
        if other != ref or m.get("identities") != evals[0].get("identities"):
            raise ValueError(f"evaluations differ in their jobs ({ref} vs {other}): they cannot be paired per person")


def paired_runs(mine: dict, theirs: dict) -> dict:
    """Per person i the difference d_i = x_i - y_i of two adapters' evaluations on the same jobs; per metric
    {mean, ci95, n, per_run} of d (Student-t over people)."""
    from .evaluate import mean_ci

    _check_same_jobs([mine, theirs])
    return {k: mean_ci(np.asarray(_per_person(mine, k)) - np.asarray(_per_person(theirs, k))) for k in PAIRED}


def pooled_runs(evals: list[dict]) -> dict:
    """A recipe's figure over S training seeds: per person i the mean xbar_i = (1/S) sum_s x_{s,i}; per metric
    {mean, ci95, n, per_run} of xbar (Student-t over people, so the interval is over people at S seeds)."""
    from .evaluate import mean_ci

    _check_same_jobs(evals)
    return {k: mean_ci(np.mean([_per_person(m, k) for m in evals], axis=0)) | {"seeds": len(evals)} for k in PAIRED}


def load_archive(folder: str | Path) -> dict[int, dict]:
    """{steps: metrics} of a length run's archive (its steps-N.json files)."""
    folder = REPO / folder
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such length-run archive (give an archive= folder of run_world_length.py)")
    return {int(f.stem.split("-")[1]): json.loads(f.read_text()) for f in sorted(folder.glob("steps-*.json"))}


def comparisons(done: dict[int, dict], compare: list[str], pool_with: list[str]) -> dict:
    """Per milestone: paired differences to each run in ``compare`` and the pooled figure with ``pool_with``,
    where those runs have the same milestone."""
    out: dict = {}
    others = {f: load_archive(f) for f in compare}
    seeds = [load_archive(f) for f in pool_with]
    for steps, m in sorted(done.items()):
        row = {f"paired_vs:{f}": paired_runs(m, o[steps]) for f, o in others.items() if steps in o}
        if seeds and all(steps in s for s in seeds):
            row["pooled"] = pooled_runs([m] + [s[steps] for s in seeds])
        if row:
            out[str(steps)] = row
    return out


def write_plot(c: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(s) for s in c["milestones"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((axes[0], "identity_similarity", "identity similarity (world_b cos)"),
                           (axes[1], "retrieval_top1", "retrieval top-1 among held-out people")):
        mean = [c["milestones"][str(s)][key]["mean"] for s in steps]
        lo = [m - (c["milestones"][str(s)][key]["ci95"] or [m, m])[0] for m, s in zip(mean, steps)]
        hi = [(c["milestones"][str(s)][key]["ci95"] or [m, m])[1] - m for m, s in zip(mean, steps)]
        ax.errorbar(steps, mean, yerr=[lo, hi], marker="o", capsize=3, label="adapter (scale 1)")
        if c.get("base"):
            ax.axhline(c["base"][key], color="grey", ls=":", label="no adapter")
        ceil = (c.get("render_ceiling") or {}).get(key)
        if ceil:
            ax.axhline(ceil["mean"], color="green", ls="--", label="ceiling: clean renders")
        if key == "retrieval_top1":
            ax.axhline(0.5, color="red", ls="-.", lw=0.8, label="target 0.5")
        ax.set_xlabel("training steps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Zero-shot identity transfer vs training length (50 held-out people, 95 % intervals)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def stopped_at_deadline(cfg: LengthConfig, out: Path, archive: Path | None) -> None:
    """The run stops between milestones: its newest checkpoint goes to the archive (under the size cap), so that
    a new checkout continues it from there."""
    step = latest_checkpoint(out)
    if step is None or archive is None:
        return
    n = archive_resume_point(out, archive, step, cfg.resume_archive_mb)
    log.info("newest checkpoint: step %d%s; rerun the same command to continue", step,
             f", archived in {archive / RESUME}" if n else "")


def run_length(cfg: LengthConfig) -> dict:
    from ..pipeline import atomic_write_text

    cfg.validate()
    out, archive = Path(cfg.out), (REPO / cfg.archive if cfg.archive else None)
    out.mkdir(parents=True, exist_ok=True)
    done: dict[int, dict] = {}
    for steps in cfg.milestones:
        saved = archive / f"steps-{steps}.json" if archive else None
        if saved is not None and saved.is_file():
            done[steps] = json.loads(saved.read_text())
    deadline, pace = stop_at.deadline(cfg.stop_at), None          # pace: seconds per training step, last segment
    last, restored = 0, False
    for steps in cfg.milestones:
        if steps in done:
            last = steps
            continue
        if deadline is not None and (time.time() >= deadline or
                                     pace is not None and time.time() + pace * (steps - last) * 1.1 > deadline):
            log.info("stopping before milestone %d: it would not end before stop_at=%s", steps, cfg.stop_at)
            stopped_at_deadline(cfg, out, archive)
            break
        shards = ensure_shards(cfg, out)
        restored = restore_resume_point(out, archive) or restored
        tic = time.time()
        adapter = train_to(cfg, out, shards, steps, restored, deadline)
        if adapter is None:
            log.info("stop_at=%s reached while training to milestone %d", cfg.stop_at, steps)
            stopped_at_deadline(cfg, out, archive)
            break
        pace = (time.time() - tic) / max(steps - last, 1)
        metrics = evaluate(cfg, adapter, out / f"eval-{steps}")
        done[steps] = metrics
        last = steps
        if archive is not None:
            archive.mkdir(parents=True, exist_ok=True)
            atomic_write_text(archive / f"steps-{steps}.json", json.dumps(metrics, indent=1) + "\n")
            archive_resume_point(out, archive, steps, cfg.resume_archive_mb)
            archive_adapter(adapter, archive, steps, cfg.adapter_archive_mb)
        log.info("milestone %d: identity similarity %.3f, retrieval top-1 %.3f", steps,
                 metrics["arms"]["adapter"]["identity_similarity"]["mean"],
                 metrics["arms"]["adapter"]["retrieval_top1"]["mean"])
    result = curve(done)
    result["pending"] = [s for s in cfg.milestones if s not in done]
    if cfg.compare or cfg.pool_with:
        result["comparisons"] = comparisons(done, cfg.compare, cfg.pool_with)
    for folder in [out] + ([archive] if archive is not None else []):
        atomic_write_text(folder / "curve.json", json.dumps(result, indent=1) + "\n")
        if done:
            write_plot(result, folder / "curve.png")
    return result
