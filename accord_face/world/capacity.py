"""What lifts identity transfer past the length curve's plateau? Branches from the plateau, paired.

    python scripts/run_world_capacity.py [arms=[cosine,lora16_cosine]] [out=testbed_out/world_capacity]

The length curve (``length.py``) flattens by 12,000 steps at identity similarity 0.49 and retrieval
top-1 0.22-0.26 (target 0.5). Each arm here starts from that run's 16,000-step adapter
(``init_adapter``: same weights, fresh optimizer, the same 20-step warm-up), trains ``steps`` more
on the same shards with one change, and is evaluated on the same 50 held-out people, prompts and
noise as every milestone (``evaluate.run_world_eval``):

    constant        the control: nothing changed (constant lr 1e-3)
    cosine          the learning rate decays to 0 over the branch (optimizer.lr_scheduler=cosine)
    lora16_cosine   + an identity LoRA of rank 16 on the UNet's attention, trained with the adapter
                    (IP-Adapter-FaceID's recipe; lora.rank=16), cosine decay
    lora64_cosine   the same at rank 64
    unet6000        the base UNet trained longer: the committed one (1,800 steps) continued to 6,000
                    (``unet.continue_from=assets``, built into ``world_cache``); the adapter continues on
                    it and its evaluation's no-adapter draw is that UNet too. Added after the first four
                    arms, on a diagnosis that located the limit in the base model (README)
    idloss0.1       + an identity loss on the UNet's clean-image estimate (``losses.lambda_id=0.1``: 1 - cos
                    of world_a's embedding of VAE.decode(x0_hat) and the conditioning one, t < T/2; PuLID's
                    and PortraitBooth's recipe; train/identity_loss.py), constant lr as the control. Added
                    after ``unet6000``; lambda fixed before it ran by the gradient-norm ratio on the
                    16,000-step adapter: |grad L_id| / |grad L_mse| = 4.4 at lambda 1 (8 batches of 16;
                    gradients orthogonal, cos 0.03), so 0.1 is a ratio of about 0.44. Its evaluation
                    uses world_b as every arm's: the loss's recognizer is never the instrument
    unet12000       the base UNet trained to 12,000 steps (the 6,000-step one continued, ``CONTINUES``) and
                    the adapter branch on it, as ``unet6000``. Added after ``idloss0.1`` and the diagnosis
                    ``photos4`` (the mean embedding of 4 photos changes nothing), on a look at the grids:
                    hair and skin carry over, the face's inner features (eyes, brows, nose, mouth) come out
                    blurred in every arm, the no-adapter draw too
    unet12000_idloss0.1  both levers that pointed up, together: the 12,000-step base and lambda_id 0.1
                    (the dose calibrated for idloss0.1, not recalibrated). Defined with unet12000, before
                    either ran; it runs after it, on the same base

Protocol, fixed before any arm ran: the unit is the held-out person (50); each arm's figures are
means with 95 % intervals over them, and paired per-person differences to ``constant`` (same people,
prompts and noise). Primary: retrieval top-1 with the independent recognizer (the world issue's
target 0.5); secondary: identity similarity; constraint: context accuracy >= 0.8 of the base model's.
An arm whose paired retrieval gain excludes 0 and keeps the constraint becomes the documented recipe
(``configs/faces.yaml``). One training seed per arm: intervals are over people, not training runs.

Added after the first two arms were seen, and labelled exploratory: ``scales=[1.5]`` evaluates an arm's
adapter at other adapter scales too (same people, prompts and noise), since the issue's target fixes no
scale and a frozen-UNet adapter trades context for identity along its scale. Archived as
``<arm>-scale<s>.json``; the protocol's comparison stays at scale 1.

Resumable: a finished arm's archived ``<arm>.json`` is its record; a killed branch resumes from its
checkpoint; the 16,000-step adapter comes from the length run's folder, or from its archived
checkpoint (``docs/world/length/resume``) when this checkout has no such folder.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import field
from .evaluate import mean_ci

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]

ARMS: dict[str, list[str]] = {
    "constant": [],
    "cosine": ["optimizer.lr_scheduler=cosine"],
    "lora16_cosine": ["optimizer.lr_scheduler=cosine", "lora.rank=16"],
    "lora64_cosine": ["optimizer.lr_scheduler=cosine", "lora.rank=64"],
}
# Arms on a longer-trained base UNet: arm -> the UNet's total training steps (``longer_base``).
BASE_ARMS: dict[str, int] = {"unet6000": 6000, "unet12000": 12000}
# A longer base continues a shorter one's assets (UNet steps -> the steps it continues; absent: the committed UNet),
# so the 12,000-step UNet is the 6,000-step one trained 6,000 steps more (fresh optimizer and warm-up at 6,000).
CONTINUES: dict[int, int] = {12000: 6000}
ARMS.update({arm: [] for arm in BASE_ARMS})
ARMS["idloss0.1"] = ["losses.lambda_id=0.1"]     # added after unet6000 (module docstring)
BASE_ARMS["unet12000_idloss0.1"] = 12000         # added with unet12000, before either ran (module docstring)
ARMS["unet12000_idloss0.1"] = ["losses.lambda_id=0.1"]
CONTROL = "constant"
PAIRED = ("identity_similarity", "retrieval_top1", "context_accuracy", "coupling_rate", "clip_t")


@dataclass
class CapacityConfig:
    out: str = field("testbed_out/world_capacity", help="working folder (one subfolder per arm)")
    archive: str = field("docs/world/capacity", help="committed copy of each arm's metrics.json and the summary")
    length_out: str = field("testbed_out/world_length", help="the length run's working folder (shards, adapters)")
    length_archive: str = field("docs/world/length", help="the length run's archive (its resume checkpoint)")
    config: str = field("configs/faces.yaml", help="trainer config of the length run")
    start: int = field(16000, help="the length milestone every arm starts from")
    steps: int = field(4000, help="training steps of each branch")
    arms: list[str] = field(default_factory=lambda: ["cosine", "lora16_cosine", "constant"],
                            help=f"arms to run, in order (of {', '.join(ARMS)})")
    identities: int = field(50, help="held-out people evaluated")
    eval_steps: int = field(25, help="denoising steps at evaluation")
    threads: int = field(1, help="torch threads of the trainer and the evaluation")
    scales: list[float] = field(default_factory=list,
                                help="extra adapter scales each arm is evaluated at (exploratory; 1 always)")
    world_cache: str = field("testbed_out/world_build", help="world build cache of the longer base UNets "
                                                             "(arms of BASE_ARMS)")
    port: int = field(29930, help="rendezvous port of the deepspeed launcher (distinct per concurrent process)")
    ranks: int = field(1, help="data-parallel trainer processes per branch (CPU: one per core); the config's "
                               "train_batch_size is split among them, so the global batch stays the recipe's")
    overrides: list[str] = field(default_factory=list, help="trainer overrides of every branch, before the arm's "
                                                            "own (e.g. data.latent_cache_mb=64)")
    length_overrides: list[str] = field(default_factory=list, help="the length run's own trainer overrides "
                                                                   "(its overrides=[...]), to export its start")

    def validate(self) -> None:
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise ValueError(f"arms: unknown {unknown}; choose from {list(ARMS)}")
        if any(not 0 < s <= 4 for s in self.scales):
            raise ValueError(f"scales: {self.scales}; each must be in (0, 4]")
        if self.steps < 1 or self.start < 1:
            raise ValueError("start and steps must be >= 1")
        from .length import rank_batch
        rank_batch(self.config, self.overrides, self.ranks)


def start_adapter(cfg: CapacityConfig) -> tuple[Path, Path]:
    """(the length run's adapter at ``cfg.start``, its shards), restoring the run from its archive if needed."""
    from .length import LengthConfig, ensure_shards, restore_resume_point, train_to

    lcfg = LengthConfig(out=cfg.length_out, archive=cfg.length_archive, config=cfg.config, threads=cfg.threads,
                        port=cfg.port, ranks=cfg.ranks, overrides=list(cfg.length_overrides))
    out = Path(cfg.length_out)
    out.mkdir(parents=True, exist_ok=True)
    shards = ensure_shards(lcfg, out)
    kept = out / f"adapter-{cfg.start}"
    archived = REPO / cfg.length_archive / f"adapter-{cfg.start}"       # length.archive_adapter
    if not (kept / "adapter_config.json").is_file() and (archived / "adapter_config.json").is_file():
        kept = archived
    if not (kept / "adapter_config.json").is_file():
        restored = restore_resume_point(out, REPO / cfg.length_archive)
        kept = train_to(lcfg, out, shards, cfg.start, restored)     # at the checkpoint's step: export only
    return kept, shards


def longer_base(cfg: CapacityConfig, unet_steps: int) -> Path:
    """The ``embedded:faces`` pipeline with its UNet trained to ``unet_steps`` (the committed UNet continued,
    ``unet.continue_from=assets``, or the shorter base ``CONTINUES`` names, built first; every other part the
    committed one). Built once into ``cfg.world_cache``
    (the UNet stage resumes from its checkpoints; ``assets-unet<N>/`` holds its assets, the pipeline folder
    is expanded from them as the committed one is) and reused."""
    import torch

    from ..config import load_config
    from .assemble import ensure_world_pipeline
    from .build import run_stage
    from .config import WorldConfig
    from .stages import run_assets, seed_from_assets

    root = REPO / cfg.world_cache
    assets = root / f"assets-unet{unet_steps}"
    if not (assets / "world.json").is_file():
        source = "assets"
        if unet_steps in CONTINUES:
            longer_base(cfg, CONTINUES[unet_steps])
            source = str(root / f"assets-unet{CONTINUES[unet_steps]}")
        wcfg = load_config(WorldConfig, None, [f"cache_dir={root}", f"unet.continue_from={source}",
                                               f"unet.steps={unet_steps}", f"threads={cfg.threads}"])
        torch.set_num_threads(cfg.threads)
        seed_from_assets(wcfg)
        run_stage(wcfg, "unet")
        run_assets(wcfg, out=assets)
    return ensure_world_pipeline(root, assets)


def describe(arm: str) -> list[str]:
    """What the arm changes: its trainer overrides, and its base UNet's training length for BASE_ARMS."""
    return ARMS[arm] + ([f"base UNet trained to {BASE_ARMS[arm]} steps"] if arm in BASE_ARMS else [])


def trained(cfg: CapacityConfig, arm: str) -> bool:
    """Whether the arm's branch has been trained to ``cfg.steps`` (its exported adapter records the steps)."""
    done = Path(cfg.out) / arm / "train" / "adapter" / "adapter_config.json"
    return done.is_file() and json.loads(done.read_text()).get("train_steps") == cfg.steps


def run_arm(cfg: CapacityConfig, arm: str, start: Path, shards: Path, scale: float = 1.0) -> dict:
    """Train the branch (unless its adapter is there) and evaluate it at adapter ``scale`` (same people,
    prompts and noise at every scale; scale 1 in ``eval/``, others in ``eval-scale<s>/``)."""
    from .experiment import launch_train_encoder
    from .length import LengthConfig, evaluate, rank_overrides

    folder = Path(cfg.out) / arm
    folder.mkdir(parents=True, exist_ok=True)
    adapter = folder / "train" / "adapter"
    if not trained(cfg, arm):
        base = [f"pretrained_model={longer_base(cfg, BASE_ARMS[arm])}"] if arm in BASE_ARMS else []
        extra = [f"init_adapter={start}", "logging.progress=false", *base, *cfg.overrides, *ARMS[arm]]
        launch_train_encoder(cfg.config, shards, folder / "train", cfg.steps, cfg.port,
                             extra + rank_overrides(cfg.config, [*cfg.overrides, *ARMS[arm]], cfg.ranks), folder / "train.log",
                             cfg.threads, cfg.ranks)
    lcfg = LengthConfig(identities=cfg.identities, eval_steps=cfg.eval_steps, threads=cfg.threads)
    return evaluate(lcfg, adapter, folder / ("eval" if scale == 1.0 else f"eval-scale{scale:g}"), scale)


def sweep_name(arm: str, scale: float) -> str:
    return f"{arm}-scale{scale:g}"


def evaluate_at_scale(cfg: CapacityConfig, arm: str, scale: float) -> dict:
    """The arm's adapter evaluated at adapter ``scale`` (trained first if this checkout lacks it)."""
    start, shards = (None, None) if trained(cfg, arm) else start_adapter(cfg)
    return run_arm(cfg, arm, start, shards, scale)


def load_archive(archive: Path) -> tuple[dict[str, dict], dict[str, dict[float, dict]]]:
    """(arm -> its scale-1 record, arm -> {scale: record}) for every ``<arm>.json`` / ``<arm>-scale<s>.json``."""
    results: dict[str, dict] = {}
    sweeps: dict[str, dict[float, dict]] = {}
    for arm in ARMS:
        saved = archive / f"{arm}.json"
        if saved.is_file():
            results[arm] = json.loads(saved.read_text())
        for saved in archive.glob(f"{arm}-scale*.json"):
            sweeps.setdefault(arm, {})[float(saved.stem.rsplit("-scale", 1)[1])] = json.loads(saved.read_text())
    return results, sweeps


def sweep_rows(results: dict[str, dict], sweeps: dict[str, dict[float, dict]]) -> dict:
    """Per arm, per adapter scale: identity similarity, retrieval top-1 and the context-accuracy ratio to the
    base model (scale 1 from the arm's own record)."""
    rows: dict = {}
    for arm, m in results.items():
        runs = {1.0: m} | sweeps.get(arm, {})
        if len(runs) < 2:
            continue
        rows[arm] = {f"{s:g}": {"identity_similarity": r["arms"]["adapter"]["identity_similarity"]["mean"],
                                "retrieval_top1": r["arms"]["adapter"]["retrieval_top1"]["mean"],
                                "retrieval_top1_ci95": r["arms"]["adapter"]["retrieval_top1"]["ci95"],
                                "context_accuracy_ratio_vs_base": r.get("context_accuracy_ratio_vs_base")}
                     for s, r in sorted(runs.items())}
    return rows


def summary(results: dict[str, dict]) -> dict:
    """Per arm the headline means [95 % interval] over people and the paired per-person difference to the
    control (same people, prompts and noise), when both were run."""
    rows = {}
    ctrl = results.get(CONTROL)
    for arm, m in results.items():
        a = m["arms"]["adapter"]
        row = {k: {"mean": a[k]["mean"], "ci95": a[k]["ci95"]} for k in PAIRED}
        row["context_accuracy_ratio_vs_base"] = m.get("context_accuracy_ratio_vs_base")
        row["paired_vs_no_adapter"] = m.get("paired_adapter_minus_base", {}).get("identity_similarity")
        if ctrl is not None and arm != CONTROL:
            mine, theirs = a["per_identity"], ctrl["arms"]["adapter"]["per_identity"]
            row["paired_vs_control"] = {k: mean_ci(np.array(mine[k]) - np.array(theirs[k])) for k in PAIRED}
        rows[arm] = row
    return {"control": CONTROL, "arms": rows, "arm_overrides": {a: describe(a) for a in results}}


def write_plot(s: dict, path: Path, start_figures: dict | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(s["arms"])
    sweep = s.get("scale_sweep") or {}
    fig, axes = plt.subplots(1, 3 if sweep else 2, figsize=(15 if sweep else 10, 3.6))
    if sweep:       # exploratory: retrieval against the prompt's context, one line per arm over adapter scale
        ax = axes[2]
        for arm, rows in sweep.items():
            xs = [r["context_accuracy_ratio_vs_base"] for r in rows.values()]
            ys = [r["retrieval_top1"] for r in rows.values()]
            ax.plot(xs, ys, "o-", label=arm)
            for scale, x, y in zip(rows, xs, ys):
                ax.annotate(f"x{scale}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axhline(0.5, color="red", ls="-.", lw=0.8)
        ax.axvline(0.8, color="grey", ls=":", lw=0.8)
        ax.set_xlabel("context accuracy / base model's")
        ax.set_ylabel("retrieval top-1")
        ax.set_title("over adapter scale (exploratory)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax, key, label in ((axes[0], "identity_similarity", "identity similarity (world_b cos)"),
                           (axes[1], "retrieval_top1", "retrieval top-1 among 50 held-out people")):
        mean = [s["arms"][a][key]["mean"] for a in arms]
        ci = [s["arms"][a][key]["ci95"] for a in arms]
        ax.errorbar(range(len(arms)), mean, yerr=[[m - c[0] for m, c in zip(mean, ci)],
                                                  [c[1] - m for m, c in zip(mean, ci)]], fmt="o", capsize=4)
        if start_figures and key in start_figures:
            ax.axhline(start_figures[key], color="grey", ls=":", label="start (16,000 steps)")
        if key == "retrieval_top1":
            ax.axhline(0.5, color="red", ls="-.", lw=0.8, label="target 0.5")
        ax.set_xticks(range(len(arms)), arms, fontsize=8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle("Branches from the plateau: +steps each, same 50 held-out people (95 % intervals)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_capacity(cfg: CapacityConfig) -> dict:
    from ..pipeline import atomic_write_text

    cfg.validate()
    archive = REPO / cfg.archive if cfg.archive else None
    results, sweeps = load_archive(archive) if archive is not None else ({}, {})
    todo = [a for a in cfg.arms if a not in results]
    if todo:
        start, shards = start_adapter(cfg)
        for arm in todo:
            log.info("arm %s: %d steps from %s (%s)", arm, cfg.steps, start, " ".join(describe(arm)) or "no change")
            results[arm] = run_arm(cfg, arm, start, shards)
            if archive is not None:
                archive.mkdir(parents=True, exist_ok=True)
                atomic_write_text(archive / f"{arm}.json", json.dumps(results[arm], indent=1) + "\n")
            a = results[arm]["arms"]["adapter"]
            log.info("arm %s: identity similarity %.3f, retrieval top-1 %.3f", arm, a["identity_similarity"]["mean"],
                     a["retrieval_top1"]["mean"])
    for arm in cfg.arms:
        for scale in cfg.scales:
            if scale in sweeps.get(arm, {}):
                continue
            log.info("arm %s at adapter scale %g (exploratory)", arm, scale)
            sweeps.setdefault(arm, {})[scale] = evaluate_at_scale(cfg, arm, scale)
            if archive is not None:
                atomic_write_text(archive / f"{sweep_name(arm, scale)}.json",
                                  json.dumps(sweeps[arm][scale], indent=1) + "\n")
    if archive is not None:     # arms and scales another process archived meanwhile (arms run in parallel)
        saved_results, saved_sweeps = load_archive(archive)
        for arm, m in saved_results.items():
            results.setdefault(arm, m)
        for arm, by_scale in saved_sweeps.items():
            for scale, m in by_scale.items():
                sweeps.setdefault(arm, {}).setdefault(scale, m)
    ordered = {a: results[a] for a in ARMS if a in results}
    s = summary(ordered)
    s["scale_sweep"] = sweep_rows(ordered, sweeps)
    s.update(start=cfg.start, steps=cfg.steps, pending=[a for a in cfg.arms if a not in results])
    first = (REPO / cfg.length_archive / f"steps-{cfg.start}.json")
    start_figures = None
    if first.is_file():
        m = json.loads(first.read_text())["arms"]["adapter"]
        start_figures = {k: m[k]["mean"] for k in ("identity_similarity", "retrieval_top1")}
        s["start_figures"] = start_figures
    for folder in [Path(cfg.out)] + ([archive] if archive is not None else []):
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "summary.json", json.dumps(s, indent=1) + "\n")
        if s["arms"]:
            write_plot(s, folder / "summary.png", start_figures)
    return s
