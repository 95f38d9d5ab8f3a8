"""Aggregation of the encoder coupling experiment: curves over scale, paired gaps, intervals, power.

Per run (arm, seed) and held-out identity i, at each adapter scale s (means over the identity's prompts):

    identity_similarity[i, s], retrieval_top1[i, s], prompt_alignment[i, s] (share of B's fields found),
    coupling_rate[i, s] = coupled[i, s] - coupled_base[i]      (the base model on the same prompts and noise)
    p_coupled[i, s] - p_coupled_base[i], p_asked[i, s], clip_t[i, s]

Arms are compared to ``baseline`` on the curves over scale (``stats.curve_gap`` with x = identity
similarity): ``alignment_gap`` = alignment gained at equal identity, ``coupling_gap`` = coupling
*removed* at equal identity (baseline minus arm; > 0 is better). Intervals: two-level bootstrap over
the paired seeds and identities. Power: variance components of the paired, scale-averaged coupling
difference d[seed, identity]; the effect to detect is 30 % of the baseline's mean excess coupling.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from .. import stats
from .pool import CONTEXT_FIELDS

METRICS = ("identity_similarity", "retrieval_top1", "prompt_alignment", "coupling_rate", "p_coupled", "p_asked",
           "clip_t")
HEADLINE = ("identity_similarity", "prompt_alignment", "coupling_rate")
HEADLINE_SCALE = 1.0
RELATIVE_EFFECT = 0.3


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _value(r: dict, metric: str) -> Optional[float]:
    if metric == "prompt_alignment":
        return float(np.mean(list(r["context_correct"].values())))
    if metric == "coupling_rate":
        return float(np.mean(list(r["coupled"].values()))) if r["coupled"] else None
    if metric == "retrieval_top1":
        return float(r["retrieval_top1"])
    v = r.get(metric)
    return None if v is None else float(v)


def per_identity(records: list[dict], names: list[str], scales: list[float], metric: str) -> np.ndarray:
    """(I, n_scales) means over each identity's prompts (NaN where nothing was measured)."""
    out = np.full((len(names), len(scales)), np.nan)
    idx = {n: k for k, n in enumerate(names)}
    sidx = {s: k for k, s in enumerate(scales)}
    acc: dict = {}
    for r in records:
        v = _value(r, metric)
        if v is not None and r["identity"] in idx and r["scale"] in sidx:
            acc.setdefault((idx[r["identity"]], sidx[r["scale"]]), []).append(v)
    for (i, s), vs in acc.items():
        out[i, s] = np.mean(vs)
    return out


def load_runs(out: Path) -> tuple[dict, dict]:
    """{arm: {seed: records}} of finished runs and {metric: (I,) base values}."""
    runs: dict = {}
    for rec in sorted(out.glob("runs/*/seed*/records.jsonl")):
        meta = json.loads((rec.parent / "run.json").read_text())
        runs.setdefault(meta["arm"], {})[int(meta["seed"])] = _read(rec)
    base = _read(out / "base" / "records.jsonl") if (out / "base" / "records.jsonl").is_file() else []
    return runs, base


DIAGNOSTICS = ("mse", "dd", "delta_q0", "delta_q1", "delta_q2", "delta_q3", "cos_gap")


def training_diagnostics(rows: list[dict], share: float = 0.2) -> dict:
    """The paper's training diagnostics from one run's ``train/metrics.jsonl`` rows.

    For each of DIAGNOSTICS (Delta_t by timestep quartile q0 = t < T/4 ... q3; the PDLoss cosine gap
    cos(f_p, f_s) - cos(f_p, f_g); the MSE and DD terms) the mean over the first and the last ``share``
    of the steps that logged it: ``{key: {"first": .., "last": ..}}``. A key no step logged (Delta_t
    without DDLoss; cos_gap without PDLoss, where the trainer logs 0) is left out."""
    out: dict = {}
    pd_rows = [r for r in rows if r.get("lambda_pd")]
    for key in DIAGNOSTICS:
        vals = [float(r[key]) for r in (pd_rows if key == "cos_gap" else rows) if r.get(key) is not None]
        if not vals:
            continue
        n = max(1, int(round(share * len(vals))))
        out[key] = {"first": float(np.mean(vals[:n])), "last": float(np.mean(vals[-n:]))}
    return out


def load_training(out: Path) -> dict:
    """{arm: {seed: training_diagnostics}} of finished runs that kept their metrics.jsonl."""
    diag: dict = {}
    for rec in sorted(out.glob("runs/*/seed*/records.jsonl")):
        metrics = rec.parent / "train" / "metrics.jsonl"
        if metrics.is_file():
            meta = json.loads((rec.parent / "run.json").read_text())
            diag.setdefault(meta["arm"], {})[int(meta["seed"])] = training_diagnostics(_read(metrics))
    return diag


def _curve_stat(x_a, y_a, x_b, y_b):
    """Mean-over-(seed, identity) curves of two (S, I, n) arrays -> curve gap (a minus b)."""
    return stats.curve_gap(np.nanmean(x_a, (0, 1)), np.nanmean(y_a, (0, 1)),
                           np.nanmean(x_b, (0, 1)), np.nanmean(y_b, (0, 1)))


def analyze(out: Path, calibration: Optional[dict] = None, reps: int = 1000) -> dict:
    from .experiment import ARMS, SCALES

    out = Path(out)
    runs, base = load_runs(out)
    training = load_training(out)
    scales = list(SCALES)
    if not runs or not base:
        return {"status": "no finished runs", "arms": {}}
    names = sorted({r["identity"] for r in base})
    base_arr = {m: per_identity([dict(r, scale=1.0) for r in base], names, [1.0], m)[:, 0] for m in METRICS}
    arrays: dict = {}
    for arm, by_seed in runs.items():
        seeds = sorted(by_seed)
        arr = {m: np.stack([per_identity(by_seed[s], names, scales, m) for s in seeds]) for m in METRICS}
        for m in ("coupling_rate", "p_coupled"):                       # minus the base model's rate
            arr[m] = arr[m] - base_arr[m][None, :, None]
        arrays[arm] = (seeds, arr)

    hs = scales.index(HEADLINE_SCALE)
    res: dict = {"protocol": "README 'Does ACCORD help the encoder?' (accord_face.world.experiment)",
                 "identities": len(names), "scales": scales, "headline_scale": HEADLINE_SCALE,
                 "base": {m: stats.t_interval(base_arr[m]) for m in METRICS if m not in ("coupling_rate",
                                                                                            "p_coupled")},
                 "base_coupling_raw": stats.t_interval(base_arr["coupling_rate"]),
                 "calibration": _calibration_summary(calibration), "arms": {}}
    for arm, (seeds, arr) in arrays.items():
        entry = {"role": ARMS[arm].role if arm in ARMS else None, "note": ARMS[arm].note if arm in ARMS else "",
                 "seeds": seeds, "curves": {m: [float(np.nanmean(arr[m][:, :, k])) for k in range(len(scales))]
                                            for m in METRICS}}
        for m in HEADLINE + ("retrieval_top1", "clip_t", "p_coupled"):
            per_run = [float(np.nanmean(arr[m][k, :, hs])) for k in range(len(seeds))]
            ci = stats.hierarchical_bootstrap(lambda a: float(np.nanmean(a[:, :, hs])), [arr[m]], reps=reps)
            entry[m] = {"mean": float(np.nanmean(arr[m][:, :, hs])), "ci95": ci, "n": len(seeds),
                        "per_run": [round(v, 5) for v in per_run]}
        per_seed = training.get(arm, {})
        keys = sorted({k for d in per_seed.values() for k in d}, key=DIAGNOSTICS.index)
        entry["training"] = {k: {w: {"mean": float(np.mean([d[k][w] for d in per_seed.values() if k in d])),
                                     "per_run": [round(d[k][w], 6) for _, d in sorted(per_seed.items()) if k in d]}
                                 for w in ("first", "last")} for k in keys}
        res["arms"][arm] = entry

    if "baseline" in arrays:
        b_seeds, b = arrays["baseline"]
        for arm, (seeds, arr) in arrays.items():
            if arm == "baseline":
                continue
            common = [s for s in seeds if s in b_seeds]
            if not common:
                continue
            ia, ib = [seeds.index(s) for s in common], [b_seeds.index(s) for s in common]
            A = {m: arr[m][ia] for m in METRICS}
            B = {m: b[m][ib] for m in METRICS}
            paired = {}
            for m in HEADLINE + ("retrieval_top1", "clip_t", "p_coupled"):
                d = A[m][:, :, hs] - B[m][:, :, hs]
                paired[m] = {"mean_diff": float(np.nanmean(d)),
                             "ci95": stats.hierarchical_bootstrap(lambda x: float(np.nanmean(x)), [d], reps=reps),
                             "per_run": [round(float(np.nanmean(d[k])), 5) for k in range(len(common))]}
            gaps = {"alignment_gap": (A["identity_similarity"], A["prompt_alignment"], B["identity_similarity"],
                                      B["prompt_alignment"], 1.0),
                    "coupling_gap": (A["identity_similarity"], A["coupling_rate"], B["identity_similarity"],
                                     B["coupling_rate"], -1.0)}
            for g, (xa, ya, xb, yb, sign) in gaps.items():
                def stat(xa, ya, xb, yb, sign=sign):
                    v = _curve_stat(xa, ya, xb, yb)
                    return None if v is None else sign * v
                per_run = [stat(xa[k:k + 1], ya[k:k + 1], xb[k:k + 1], yb[k:k + 1]) for k in range(len(common))]
                paired[g] = {"mean_diff": stat(xa, ya, xb, yb),
                             "ci95": stats.hierarchical_bootstrap(stat, [xa, ya, xb, yb], reps=reps),
                             "per_run": per_run}
                if paired[g]["mean_diff"] is None:
                    lo_a, hi_a = np.nanmin(np.nanmean(xa, (0, 1))), np.nanmax(np.nanmean(xa, (0, 1)))
                    lo_b, hi_b = np.nanmin(np.nanmean(xb, (0, 1))), np.nanmax(np.nanmean(xb, (0, 1)))
                    paired[g]["note"] = (f"identity ranges do not overlap (arm {lo_a:.3f}-{hi_a:.3f}, baseline "
                                         f"{lo_b:.3f}-{hi_b:.3f}): compare the curves directly")
            d_coupling = np.nanmean(A["coupling_rate"] - B["coupling_rate"], axis=2)          # (S, I)
            paired["seeds"] = common
            res["arms"][arm]["paired_vs_baseline"] = paired
            res["arms"][arm]["power"] = _power(d_coupling, B["coupling_rate"])
        res["power"] = {arm: res["arms"][arm].get("power") for arm in res["arms"] if arm != "baseline"}
    return res


def _power(d: np.ndarray, base_coupling: np.ndarray) -> dict:
    """Power of the paired, scale-averaged coupling difference for 30 % of the baseline's excess coupling."""
    vc = stats.variance_components(d)
    excess = float(np.nanmean(base_coupling))
    delta = RELATIVE_EFFECT * abs(excess)
    S, I = d.shape
    out = {"endpoint": "paired coupling difference, mean over scales (arm - baseline)",
           "baseline_excess_coupling": excess, "effect": delta, "relative_effect": RELATIVE_EFFECT,
           "variance_components": vc, "seeds": S, "identities": I,
           "achieved": stats.power(delta, vc, S, I) if delta > 0 else None,
           "observed_mean_diff": float(np.nanmean(d))}
    if delta > 0:
        out["seeds_needed_80"] = {str(n): stats.seeds_needed(delta, vc, n) for n in (I, 2 * I)}
    return out


def _calibration_summary(cal: Optional[dict]) -> Optional[dict]:
    if not cal:
        return None
    out = {}
    for where, c in cal.items():
        m = c["mean"]
        out[where] = {"grad_ratio_dd_per_unit_lambda": m["grad_dd"] / m["grad_base"],
                      "loss_ratio_dd_per_unit_lambda": m["loss_dd"] / m["loss_base"],
                      "grad_ratio_pd_per_unit_lambda": m["grad_pd"] / m["grad_base"],
                      "loss_ratio_pd_per_unit_lambda": m["loss_pd"] / m["loss_base"],
                      "cos_dd_base": m["cos_dd_base"], "cos_pd_base": m["cos_pd_base"], "batches": c["batches"]}
    return out


def write_plot(results: dict, path: Path) -> Optional[Path]:
    """Identity similarity vs prompt alignment and vs coupling, one curve per arm over scale."""
    if not results.get("arms"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    colours = plt.get_cmap("tab20").colors      # one colour per arm (tab10 repeats from the 11th arm on)
    for i, (arm, e) in enumerate(sorted(results["arms"].items())):
        x = e["curves"]["identity_similarity"]
        style = dict(color="black", lw=2.5) if arm == "baseline" else dict(color=colours[(2 * i) % 20 + i // 10],
                                                                           lw=1.3)
        for ax, m in zip(axes, ("prompt_alignment", "coupling_rate")):
            ax.plot(x, e["curves"][m], marker="o", label=f"{arm} (n={len(e['seeds'])})", **style)
            for s, xv, yv in zip(results["scales"], x, e["curves"][m]):
                if arm == "baseline":
                    ax.annotate(f"{s:g}", (xv, yv), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes[0].set(xlabel="identity similarity (recognizer B)", ylabel="prompt alignment (judge)",
                title="identity vs prompt alignment (up-right is better)")
    axes[1].set(xlabel="identity similarity (recognizer B)", ylabel="coupling rate minus base model's",
                title="identity vs coupling (down-right is better)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"encoder coupling experiment: {results['identities']} held-out identities, "
                 "curves over adapter scale (labels on baseline)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_table(results: dict) -> str:
    """Markdown: per arm the headline metrics at scale 1 and the paired gaps to baseline."""
    def ci(e):
        if e and e.get("note") and e.get("mean_diff") is None:
            return "no common identity range"
        if not e or e.get("mean", e.get("mean_diff")) is None:
            return "n/a"
        v = e.get("mean", e.get("mean_diff"))
        return f"{v:+.3f} [{e['ci95'][0]:+.3f}, {e['ci95'][1]:+.3f}]" if e.get("ci95") else f"{v:+.3f}"

    lines = ["| arm | runs | identity sim. | prompt align. | coupling | alignment gap vs baseline | "
             "coupling removed vs baseline | power (30 %) |", "|---|---|---|---|---|---|---|---|"]
    for arm, e in sorted(results.get("arms", {}).items(), key=lambda kv: (kv[0] != "baseline", kv[0])):
        p = e.get("paired_vs_baseline", {})
        pw = e.get("power") or {}
        pw_s = f"{pw['achieved']:.2f}" if pw.get("achieved") is not None else "n/a"
        lines.append(f"| {arm} | {len(e['seeds'])} | {ci(e['identity_similarity'])} | {ci(e['prompt_alignment'])} | "
                     f"{ci(e['coupling_rate'])} | {ci(p.get('alignment_gap'))} | {ci(p.get('coupling_gap'))} | "
                     f"{pw_s} |")
    return "\n".join(lines)


def write_diagnostics_table(results: dict) -> str:
    """Markdown: the training diagnostics (first -> last 20 % of steps, mean over runs) of arms that logged
    Delta_t or the PDLoss cosine gap; '' when none did."""
    keys = ("mse", "delta_q0", "delta_q1", "delta_q2", "delta_q3", "cos_gap")
    rows = [(arm, e["training"]) for arm, e in sorted(results.get("arms", {}).items())
            if any(k in e.get("training", {}) for k in keys[1:])]
    if not rows:
        return ""

    def cell(t, k):
        return f"{t[k]['first']['mean']:.4g} -> {t[k]['last']['mean']:.4g}" if k in t else "-"

    lines = ["| arm | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {arm} | " + " | ".join(cell(t, k) for k in keys) + " |" for arm, t in rows]
    return "\n".join(lines)


def write_sample_grid(out: Path, run_dirs: dict[str, Path], path: Path, identities: int = 6) -> Optional[Path]:
    """Rows: held-out identities (prompt 0); columns: reference | base | each arm at each scale.

    ``run_dirs``: {label: run folder holding eval/images/s<scale>/...}; the base images come from out/base."""
    from PIL import Image, ImageDraw

    from .experiment import SCALES

    refs_file = out / "references" / "references.json"
    if not refs_file.is_file():
        return None
    refs = json.loads(refs_file.read_text())
    names = sorted(refs)[:identities]
    prompts = {r["identity"]: r["prompt"] for r in _read(out / "base" / "records.jsonl") if r["prompt_index"] == 0}
    cols = [("reference", lambda n: out / "references" / refs[n]["file"]),
            ("base", lambda n: out / "base" / "eval" / "images" / "base" / f"{n}_p0.png")]
    for label, d in run_dirs.items():
        for s in SCALES:
            cols.append((f"{label} {s:g}", lambda n, d=d, s=s: d / "eval" / "images" / f"s{s:g}" / f"{n}_p0.png"))
    cell, head = 96, 14
    grid = Image.new("RGB", (len(cols) * cell, head + len(names) * (cell + head)), "white")
    draw = ImageDraw.Draw(grid)
    for c, (label, _) in enumerate(cols):
        draw.text((c * cell + 2, 1), label[:16], fill="black")
    for r, n in enumerate(names):
        y = head + r * (cell + head)
        for c, (_, where) in enumerate(cols):
            f = where(n)
            if f.is_file():
                grid.paste(Image.open(f).convert("RGB").resize((cell, cell), Image.NEAREST), (c * cell, y))
        draw.text((2, y + cell), prompts.get(n, "")[:110], fill="black")
    grid.save(path)
    return path
