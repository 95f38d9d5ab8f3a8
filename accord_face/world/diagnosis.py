"""Where is the limit on identity transfer? One adapter, evaluated under one change at a time.

    python scripts/run_world_diagnosis.py [checks=[guidance2,steps50]]

The capacity branches (``capacity.py``) left retrieval top-1 at 0.27-0.34 against a target of 0.5 and a
render ceiling of 0.70. Each check here evaluates the ``constant`` branch's adapter (the capacity control)
exactly as ``evaluate.run_world_eval`` does, changing one thing, and reads the result against that
adapter's own record at the default settings (``docs/world/capacity/constant.json``; same people, prompts
and noise, so per-person differences are paired):

    training_people   50 people the adapter was trained on (identities 0-49; new photos and contexts):
                      a generalisation gap would show as a rise here (unpaired: other people)
    guidance<g>       classifier-free guidance g instead of 4 (it scales identity and text together)
    steps50           50 denoising steps instead of 25
    ddim_g2, dpm_g2   another sampler (DDIM, DPM-Solver multistep) at guidance 2
    unet6000_as_is    the same adapter on the longer-trained base UNet (``capacity.BASE_ARMS``), not
                      retrained for it: does a stronger base draw the identity the adapter asks for?
    photos4           conditioned on the mean embedding of 4 photos of each person (the reference and 3
                      others, as ``generate --photo`` repeated does) instead of the reference alone: is
                      the limit the nuisance in one photo's conditioning embedding? (added after unet6000)

Not a change of the evaluation: ``lora_oracle=N`` (``oracle.py``) trains a subject LoRA per person on the first N
held-out people and evaluates it on the same jobs: can the generator draw a specific person at all once trained
on them? Archived as ``lora_oracle.json`` (+ ``lora_oracle.png``), a row ``lora_oracle`` of the summary.

Every record also carries the instruments' ceiling through the VAE (``render_ceiling(..., vae=...)``), the
limit any generator decoded by this VAE has. Exploratory, after the capacity results: no check changes
the protocol's figures; each is archived as ``docs/world/diagnosis/<check>.json`` and never rerun.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import field
from .evaluate import mean_ci
from .oracle import OracleRecipe

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]

CHECKS: dict[str, dict] = {
    "training_people": {"first": 0},
    "guidance1": {"guidance": 1.0},
    "guidance1.5": {"guidance": 1.5},
    "guidance2": {"guidance": 2.0},
    "guidance7": {"guidance": 7.0},
    "steps50": {"steps": 50},
    "ddim_g2": {"scheduler": "ddim", "guidance": 2.0},
    "dpm_g2": {"scheduler": "dpm", "guidance": 2.0},
    "unet6000_as_is": {"base_unet_steps": 6000},
    "photos4": {"conditioning_photos": 4},
}
HEADLINE = ("identity_similarity", "retrieval_top1", "context_accuracy", "coupling_rate")


@dataclass
class DiagnosisConfig:
    checks: list[str] = field(default_factory=lambda: list(CHECKS), help=f"checks to run (of {', '.join(CHECKS)})")
    out: str = field("testbed_out/world_diagnosis", help="working folder (one evaluation per check)")
    archive: str = field("docs/world/diagnosis", help="committed copy of each check's metrics.json and the summary")
    reference: str = field("docs/world/capacity/constant.json", help="the adapter's record at the default settings")
    threads: int = field(1, help="torch threads of the evaluations")
    agreement: list[str] = field(default_factory=list,
                                 help="capacity arms whose evaluation (<capacity out>/<arm>/eval) is re-scored with "
                                      "both recognizers (``recognizer_agreement``), archived as agreement-<arm>.json")
    capacity_out: str = field("testbed_out/world_capacity", help="the capacity arms' working folder")
    lora_oracle: int = field(0, help="people of the lora_oracle check (the first N held-out people; 0 = not run; "
                                     "each person cached under <out>/lora_oracle/<person>/)")
    oracle: OracleRecipe = field(default_factory=OracleRecipe, help="the lora_oracle check's LoRA recipe")

    def validate(self) -> None:
        unknown = [c for c in self.checks if c not in CHECKS]
        if unknown:
            raise ValueError(f"checks: unknown {unknown}; choose from {list(CHECKS)}")
        archive = REPO / self.archive
        if not 0 <= self.lora_oracle <= 50:
            raise ValueError(f"lora_oracle={self.lora_oracle}: 0 (off) to 50 (the evaluation's held-out people)")
        for arm in self.agreement:
            samples = Path(self.capacity_out) / arm / "eval" / "samples.jsonl"
            if not (archive / f"agreement-{arm}.json").is_file() and not samples.is_file():
                raise ValueError(f"agreement: {samples} is missing; run the capacity arm {arm!r} first "
                                 f"(python scripts/run_world_capacity.py arms=[{arm}])")


def the_adapter() -> Path:
    """The capacity control's adapter (trained here first when this checkout lacks it)."""
    from .capacity import CapacityConfig, run_arm, start_adapter, trained

    cap = CapacityConfig()
    if not trained(cap, "constant"):
        start, shards = start_adapter(cap)
        run_arm(cap, "constant", start, shards)
    return Path(cap.out) / "constant" / "train" / "adapter"


def run_check(cfg: DiagnosisConfig, check: str, adapter: Path) -> dict:
    import torch

    from .capacity import BASE_ARMS, CapacityConfig, longer_base
    from .evaluate import WorldEvalConfig, run_world_eval

    folder = Path(cfg.out) / check
    if (folder / "metrics.json").is_file():
        return json.loads((folder / "metrics.json").read_text())
    change = dict(CHECKS[check])
    steps = change.pop("base_unet_steps", None)
    if steps is not None:
        assert steps in BASE_ARMS.values()
        change["pretrained"] = str(longer_base(CapacityConfig(threads=cfg.threads), steps))
    torch.set_num_threads(cfg.threads)
    return run_world_eval(WorldEvalConfig(adapter=str(adapter), out=str(folder), **change))


def row(m: dict, reference: dict | None) -> dict:
    """Headline means [95 % interval] over people, the context ratio to the same run's no-adapter draw, the
    ceilings, and (when the people are the reference's) the per-person difference to the reference."""
    a, b = m["arms"]["adapter"], m["arms"]["base"]
    out = {k: {"mean": a[k]["mean"], "ci95": a[k]["ci95"]} for k in HEADLINE}
    out["context_accuracy_ratio_vs_base"] = a["context_accuracy"]["mean"] / b["context_accuracy"]["mean"]
    ceiling = m.get("render_ceiling", {})
    out["ceiling_retrieval_top1"] = ceiling.get("retrieval_top1", {}).get("mean")
    out["ceiling_through_vae_retrieval_top1"] = ceiling.get("through_vae", {}).get("retrieval_top1", {}).get("mean")
    if reference is not None and m["config"].get("first", 2000) == reference["config"].get("first", 2000):
        mine, theirs = a["per_identity"], reference["arms"]["adapter"]["per_identity"]
        out["paired_vs_reference"] = {k: mean_ci(np.array(mine[k]) - np.array(theirs[k]))
                                      for k in ("identity_similarity", "retrieval_top1")}
    return out


def recognizer_agreement(folder: str | Path, clean_per_identity: int = 2, seed: int = 5) -> dict:
    """Every generated image of one evaluation (``folder``: a ``run_world_eval`` output) scored by BOTH
    recognizers against the same references, per arm; and ``clean_per_identity`` clean renders of each
    person in new random contexts (a perfect generator), by both.

        retrieval_top1[k] = mean_i [ argmax_j <e_k(image_i), e_k(ref_j)> = person(i) ],  k in {a, b}

    Recognizer a conditions the adapter, b is the evaluation's. If the adapter carried what a encodes, a
    would find the people at least as often as b; a falling far below its own clean-render ceiling says the
    generated faces lack the features a identifies people by."""
    from PIL import Image

    from .assemble import ensure_world_pipeline
    from .backend import WorldAnalyzer
    from .render import random_context, render

    folder = Path(folder)
    recs = [json.loads(x) for x in (folder / "samples.jsonl").read_text().splitlines() if x.strip()]
    names = sorted({r["identity"] for r in recs})
    world = ensure_world_pipeline()
    out: dict = {"folder": str(folder), "identities": len(names), "chance_top1": 1 / len(names)}
    rng = np.random.default_rng(seed)
    clean = {n: [render(int(n[1:]), random_context(rng), 90_000 + k).image for k in range(clean_per_identity)]
             for n in names}
    for k in ("a", "b"):
        rec = WorldAnalyzer(world / "face_models", k)

        def emb(rgb):
            f = rec.analyze(np.asarray(rgb), max_faces=1)
            return f[0].embedding if f else None
        gallery = {n: emb(Image.open(folder / "references" / f"{n}.png").convert("RGB")) for n in names}
        names_k = [n for n in names if gallery[n] is not None]
        G = np.stack([gallery[n] for n in names_k])

        def score(pairs):  # [(person, rgb)] -> per-person retrieval and similarity
            hit: dict = {}
            sim: dict = {}
            for n, rgb in pairs:
                e = emb(rgb)
                hit.setdefault(n, []).append(e is not None and names_k[int(np.argmax(G @ e))] == n)
                if e is not None and gallery[n] is not None:
                    sim.setdefault(n, []).append(float(e @ gallery[n]))
            return {"retrieval_top1": mean_ci([float(np.mean(v)) for v in hit.values()]),
                    "identity_similarity": mean_ci([float(np.mean(v)) for v in sim.values()])}
        for arm in sorted({r["arm"] for r in recs}):
            pairs = [(r["identity"], Image.open(folder / r["image"]).convert("RGB")) for r in recs if r["arm"] == arm]
            out.setdefault(arm, {})[k] = score(pairs)
        out.setdefault("clean_renders", {})[k] = score([(n, im) for n in names for im in clean[n]])
    return out


def run_diagnosis(cfg: DiagnosisConfig) -> dict:
    from ..pipeline import atomic_write_text

    cfg.validate()
    archive = REPO / cfg.archive
    archive.mkdir(parents=True, exist_ok=True)
    reference = json.loads((REPO / cfg.reference).read_text())
    records = {c: json.loads((archive / f"{c}.json").read_text()) for c in CHECKS if (archive / f"{c}.json").is_file()}
    todo = [c for c in cfg.checks if c not in records]
    adapter = the_adapter() if todo else None
    for check in todo:
        log.info("check %s: %s", check, CHECKS[check])
        records[check] = run_check(cfg, check, adapter)
        atomic_write_text(archive / f"{check}.json", json.dumps(records[check], indent=1) + "\n")
    s = {"reference": {"file": cfg.reference, **row(reference, None)},
         "checks": {c: {"change": CHECKS[c], **row(records[c], reference)} for c in CHECKS if c in records},
         "pending": [c for c in cfg.checks if c not in records]}
    for arm in cfg.agreement:
        path = archive / f"agreement-{arm}.json"
        if not path.is_file():
            res = recognizer_agreement(Path(cfg.capacity_out) / arm / "eval")
            atomic_write_text(path, json.dumps(res, indent=1) + "\n")
    s["agreement"] = {}
    for path in sorted(archive.glob("agreement-*.json")):
        a = json.loads(path.read_text())
        s["agreement"][path.stem.removeprefix("agreement-")] = {
            part: {k: {m: round(a[part][k][m]["mean"], 3) for m in ("retrieval_top1", "identity_similarity")}
                   for k in ("a", "b")} for part in a if isinstance(a[part], dict) and "a" in a[part]}
    oracle = oracle_record(cfg, archive, reference)
    if oracle is not None:
        s["lora_oracle"] = oracle_row(oracle)
    atomic_write_text(archive / "summary.json", json.dumps(s, indent=1) + "\n")
    return s


def oracle_record(cfg: DiagnosisConfig, archive: Path, reference: dict) -> dict | None:
    """The lora_oracle archive: run (or continued from the per-person caches) when ``cfg.lora_oracle`` asks for
    more people than it holds or another recipe; else as archived (None when there is none)."""
    from dataclasses import asdict

    from .oracle import run_oracle

    path = archive / "lora_oracle.json"
    have = json.loads(path.read_text()) if path.is_file() else None
    if cfg.lora_oracle and (have is None or have.get("people", 0) < cfg.lora_oracle
                            or have["recipe"] != asdict(cfg.oracle)):
        log.info("check lora_oracle: %d people, recipe %s", cfg.lora_oracle, asdict(cfg.oracle))
        have = run_oracle(Path(cfg.out) / "lora_oracle", cfg.lora_oracle, cfg.oracle, reference, archive,
                          threads=cfg.threads)
    return have


def oracle_row(o: dict) -> dict:
    """The summary's lora_oracle row: means [95 % interval], the same people's adapter and ceiling, pairs."""
    keys = ("identity_similarity", "retrieval_top1", "context_accuracy")
    mc = lambda d: {"mean": d["mean"], "ci95": d["ci95"]}   # noqa: E731
    return {"people": o["people"], "recipe": o["recipe"],
            **{k: mc(o["oracle"][k]) for k in keys},
            "adapter_same_people": {k: mc(v) for k, v in o.get("adapter_same_people", {}).items()},
            "ceiling_retrieval_top1_same_people": o.get("render_ceiling_same_people", {}).get(
                "retrieval_top1", {}).get("mean"),
            "paired_vs_reference": {k: mc(v) for k, v in o.get("paired_oracle_minus_adapter", {}).items()}}
