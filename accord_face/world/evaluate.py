"""Zero-shot evaluation on held-out world identities: does the adapter carry the person, and the prompt?

For each held-out identity: one reference photo in context A, prompts naming other contexts
B != A (another background, shirt and accessory), generated with the adapter and without it
(adapter scale 0: the base model's unconditioned draw, same noise). Measured on every image:

- identity similarity: cos(recognizer B of the reference, recognizer B of the image) —
  recognizer B is independent of the conditioning recognizer A;
- retrieval top-1: the image's nearest reference among all evaluated identities is its own
  (chance = 1 / identities);
- context accuracy: the judge finds B's attribute (per field, and all fields at once);
- coupling: the judge finds A's attribute although B was asked for (fields where A != B);
- CLIP-T: 100 * cos(world CLIP image, prompt).

Per-identity means are the unit of analysis: means come with Student-t 95 % intervals over
identities, adapter-vs-base differences are paired by identity.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..config import field
from .pool import CONTEXT_FIELDS, encode_context
from .render import ACCESSORIES, BACKGROUNDS, FRAMINGS, SHIRTS, Context, caption

log = logging.getLogger(__name__)


@dataclass
class WorldEvalConfig:
    adapter: str = field(help="exported adapter folder (trained on embedded:faces)")
    out: str = field("outputs/world-eval", help="output folder (metrics.json, samples.jsonl, grid.png)")
    identities: int = field(50, help="held-out identities evaluated (from identity 2000 on)")
    prompts_per_identity: int = field(2, help="prompts with other contexts per identity")
    scale: float = field(1.0, help="adapter scale of the adapter arm")
    steps: int = field(25, help="denoising steps")
    guidance: float = field(4.0, help="classifier-free guidance scale")
    batch_size: int = field(16, help="images per pipeline call")
    seed: int = field(0, help="reference contexts, prompts and noise")


def other_context(a: Context, rng: np.random.Generator) -> Context:
    """A context B that differs from A in background, shirt and accessory (framing drawn freely)."""
    bg = str(rng.choice([b for b in BACKGROUNDS if b != a.background]))
    shirt = str(rng.choice([s for s in SHIRTS if s != a.shirt]))
    acc = str(rng.choice([x for x in ACCESSORIES if x != a.accessory]))
    return Context(bg, shirt, acc, str(rng.choice(FRAMINGS)))


def mean_ci(values) -> dict:
    """{mean, ci95, n, per_run}: Student-t 95 % interval over the values."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], np.float64)
    if len(v) < 2:
        return {"mean": float(v.mean()) if len(v) else None, "ci95": None, "n": int(len(v)), "per_run": v.tolist()}
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return {"mean": float(v.mean()), "ci95": [float(v.mean() - half), float(v.mean() + half)], "n": int(len(v)),
            "per_run": [round(float(x), 5) for x in v]}


def run_world_eval(cfg: WorldEvalConfig) -> dict:
    from ..metrics import ClipTextScorer
    from ..pipeline import (FaceIDGenerator, atomic_write_text, identity_embedding, make_face_analyzer,
                            read_adapter_config)
    from .assemble import ensure_world_pipeline, load_judge
    from .backend import WorldAnalyzer
    from .judge import predict
    from .photos import write_reference_photos

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    world = ensure_world_pipeline()
    refs = write_reference_photos(out / "references", cfg.identities, seed=cfg.seed)
    names = list(refs)
    cond = make_face_analyzer(read_adapter_config(cfg.adapter))
    judge_rec = WorldAnalyzer(world / "face_models", "b")
    judge = load_judge(world)
    clip = ClipTextScorer.from_pretrained(world / "world_clip")
    gen = FaceIDGenerator(cfg.adapter, None, "cpu")
    gen.pipe.set_progress_bar_config(disable=True)

    rng = np.random.default_rng(cfg.seed)
    ref_b, cond_emb, jobs = {}, {}, []
    from PIL import Image

    for name in names:
        photo = out / "references" / refs[name]["file"]
        cond_emb[name], _ = identity_embedding(cond, [photo])
        faces = judge_rec.analyze(np.asarray(Image.open(photo).convert("RGB")), max_faces=1)
        ref_b[name] = faces[0].embedding if faces else None
        a = Context(**refs[name]["context"])
        for p in range(cfg.prompts_per_identity):
            b = other_context(a, rng)
            jobs.append((name, p, a, b, int(rng.integers(1 << 30))))
    ref_names = [n for n in names if ref_b[n] is not None]
    ref_mat = np.stack([ref_b[n] for n in ref_names])                                  # (R, D)

    records = []
    arms = {"adapter": cfg.scale, "base": 0.0}
    total = len(jobs) * len(arms)
    with tqdm(total=total, desc="world eval") as bar:
        for arm, scale in arms.items():
            for name in names:
                mine = [j for j in jobs if j[0] == name]
                for k in range(0, len(mine), cfg.batch_size):
                    chunk = mine[k:k + cfg.batch_size]
                    prompts = [caption(b) for _, _, _, b, _ in chunk]
                    images = gen.generate_pairs(cond_emb[name], prompts, [s for *_, s in chunk], scale=scale,
                                                steps=cfg.steps, guidance=cfg.guidance)
                    arr = np.stack([np.asarray(im.convert("RGB")) for im in images])
                    probs = predict(judge, arr)
                    clip_t = clip.score(images, prompts)
                    for i, ((_, p, a, b, seed), im) in enumerate(zip(chunk, images)):
                        rel = f"images/{arm}/{name}_p{p}.png"
                        (out / rel).parent.mkdir(parents=True, exist_ok=True)
                        im.save(out / rel)
                        faces = judge_rec.analyze(arr[i], max_faces=1)
                        emb = faces[0].embedding if faces else None
                        sim = float(emb @ ref_b[name]) if emb is not None and ref_b[name] is not None else None
                        top1 = (ref_names[int(np.argmax(ref_mat @ emb))] == name) if emb is not None else False
                        want, had = encode_context(b), encode_context(a)
                        seen = np.array([int(probs[f][i].argmax()) for f in CONTEXT_FIELDS])
                        differs = want != had
                        records.append({
                            "arm": arm, "identity": name, "prompt_index": p, "prompt": prompts[i], "image": rel,
                            "reference_context": a.attributes(), "face_found": emb is not None,
                            "identity_similarity": sim, "retrieval_top1": bool(top1),
                            "context_correct": {f: bool(seen[j] == want[j]) for j, f in enumerate(CONTEXT_FIELDS)},
                            "all_context_correct": bool((seen == want).all()),
                            "coupled": {f: bool(seen[j] == had[j]) for j, f in enumerate(CONTEXT_FIELDS)
                                        if differs[j]},
                            "clip_t": float(clip_t[i]),
                            "p_asked": float(np.mean([probs[f][i][want[j]] for j, f in enumerate(CONTEXT_FIELDS)])),
                            "embedding_b": None if emb is None else [round(float(x), 5) for x in emb],
                        })
                        bar.update(1)
    with (out / "samples.jsonl").open("w") as fh:
        for r in records:
            fh.write(json.dumps({k: v for k, v in r.items() if k != "embedding_b"}) + "\n")
    metrics = summarize(records, names, cfg)
    metrics["config"] = asdict(cfg)
    metrics["identity_model"] = judge_rec.describe()
    metrics["conditioning_model"] = cond.describe()
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_grid(out, records, refs, names[:8])
    return metrics


def _per_identity(records, names, key):
    vals = []
    for n in names:
        v = [key(r) for r in records if r["identity"] == n]
        v = [x for x in v if x is not None]
        vals.append(float(np.mean(v)) if v else float("nan"))
    return vals


def summarize(records: list[dict], names: list[str], cfg: WorldEvalConfig) -> dict:
    arms = sorted({r["arm"] for r in records})
    out: dict = {"identities": len(names), "chance_top1": 1.0 / len(names), "arms": {}}
    per: dict = {}
    for arm in arms:
        rs = [r for r in records if r["arm"] == arm]
        per[arm] = {
            "identity_similarity": _per_identity(rs, names, lambda r: r["identity_similarity"]),
            "retrieval_top1": _per_identity(rs, names, lambda r: float(r["retrieval_top1"])),
            "context_accuracy": _per_identity(rs, names, lambda r: float(np.mean(list(r["context_correct"].values())))),
            "all_context_correct": _per_identity(rs, names, lambda r: float(r["all_context_correct"])),
            "coupling_rate": _per_identity(rs, names, lambda r: float(np.mean(list(r["coupled"].values())))
                                           if r["coupled"] else None),
            "clip_t": _per_identity(rs, names, lambda r: r["clip_t"]),
            "face_found": _per_identity(rs, names, lambda r: float(r["face_found"])),
        }
        out["arms"][arm] = {k: mean_ci(v) for k, v in per[arm].items()}
        out["arms"][arm]["context_accuracy_by_field"] = {
            f: float(np.mean([r["context_correct"][f] for r in rs])) for f in CONTEXT_FIELDS}
        out["arms"][arm]["verification_on_generated"] = generated_verification(rs)
    if {"adapter", "base"} <= set(arms):
        out["paired_adapter_minus_base"] = {
            k: mean_ci(np.array(per["adapter"][k]) - np.array(per["base"][k]))
            for k in ("identity_similarity", "retrieval_top1", "context_accuracy", "coupling_rate", "clip_t")}
        base_ctx = out["arms"]["base"]["context_accuracy"]["mean"]
        out["context_accuracy_ratio_vs_base"] = out["arms"]["adapter"]["context_accuracy"]["mean"] / base_ctx
    return out


def generated_verification(records: list[dict]) -> dict | None:
    """Recognizer-B verification between generated images: same identity (other prompt) vs other identities."""
    from .face_models import verification

    rs = [r for r in records if r["embedding_b"] is not None]
    if len(rs) < 4:
        return None
    ids = np.array([r["identity"] for r in rs])
    if len(set(ids)) == len(ids):
        return None
    v = verification(np.array([r["embedding_b"] for r in rs]), ids, np.random.default_rng(0), pairs=500)
    return {"accuracy": v.accuracy, "same_mean_cos": v.same_mean, "diff_mean_cos": v.diff_mean, "pairs": v.pairs}


def write_grid(out: Path, records: list[dict], refs: dict, names: list[str]) -> Path:
    """Rows: identities; columns: reference | adapter images (one per prompt) | base images; prompts below."""
    from PIL import Image, ImageDraw

    rows = []
    for n in names:
        row = [Image.open(out / "references" / refs[n]["file"]).convert("RGB")]
        for arm in ("adapter", "base"):
            row += [Image.open(out / r["image"]).convert("RGB") for r in records
                    if r["identity"] == n and r["arm"] == arm]
        rows.append(row)
    cols = max(len(r) for r in rows)
    cell, scale = 64, 2
    grid = Image.new("RGB", (cols * cell * scale, len(rows) * cell * scale + 14), "white")
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            grid.paste(im.resize((cell * scale, cell * scale), Image.NEAREST), (x * cell * scale, y * cell * scale))
    k = (cols - 1) // 2
    ImageDraw.Draw(grid).text((2, len(rows) * cell * scale + 1),
                              f"reference | adapter x{k} | no adapter x{k} (same prompts and noise)", fill="black")
    path = out / "grid.png"
    grid.save(path)
    return path
