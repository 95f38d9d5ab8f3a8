"""Evaluation outputs: metrics.json, samples.csv, report.md, grids, the trade-off plot, and run comparison."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from .pipeline import atomic_save_image, atomic_write_bytes, atomic_write_text, make_grid

CSV_COLUMNS = ["identity", "prompt_index", "prompt", "scale", "seed", "image", "face_found",
               "identity_similarity", "clip_t"]
SUMMARY_METRICS = ["identity_similarity", "face_not_found_rate", "clip_t"]
COUPLING_METRICS = [("dd", "discrepancy"), ("dd", "weighted_mean"), ("pd", "abs_gap"), ("pd", "signed_gap")]


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _pct(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.0f}%"


def _json_safe(obj: Any) -> Any:
    """NaN -> None, so metrics.json stays strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def write_outputs(out: Path, result: dict, records: list[dict], prompts: list[str], scales: list[float],
                  grid_seed: int) -> None:
    """Write metrics.json, samples.csv, report.md, grid_<identity>.png and tradeoff.png into ``out``."""
    from PIL import Image

    atomic_write_text(out / "metrics.json", json.dumps(_json_safe(result), indent=2))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(records)
    atomic_write_text(out / "samples.csv", buf.getvalue())
    for name in result["per_identity"]:
        # rows = prompts, columns = scales (ascending), first seed only
        cells = [next(r for r in records if r["identity"] == name and r["prompt_index"] == i
                      and r["scale"] == s and r["seed"] == grid_seed)
                 for i in range(len(prompts)) for s in sorted(scales)]
        images = [Image.open(out / r["image"]).convert("RGB") for r in cells]
        atomic_save_image(make_grid(images, cols=len(scales)), out / f"grid_{name}.png")
    plot_tradeoff(result, out / "tradeoff.png")
    atomic_write_text(out / "report.md", render_report(result))


def _nan(v: Any) -> float:
    return math.nan if v is None else float(v)


def plot_tradeoff(result: dict, path: Path) -> None:
    """Identity similarity (y) vs CLIP-T (x), one point per adapter scale."""
    plot_tradeoff_runs({"": result}, path)


def plot_tradeoff_runs(results: dict[str, dict], path: Path) -> None:
    """One identity-vs-CLIP-T curve per run (label -> metrics), a point per adapter scale.

    Without CLIP-T in every run the x axis is the adapter scale instead.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    no_clip = any(all(r["clip_t"] is None or math.isnan(r["clip_t"]) for r in m["per_scale"])
                  for m in results.values())
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    all_ys = []
    for label, m in results.items():
        rows = m["per_scale"]
        xs = [r["scale"] if no_clip else _nan(r["clip_t"]) for r in rows]
        ys = [_nan(r["identity_similarity"]) for r in rows]
        all_ys += ys
        ax.plot(xs, ys, "o-", label=label or None)
        for x, y, r in zip(xs, ys, rows):
            ax.annotate(f"scale {r['scale']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if all(math.isnan(y) for y in all_ys):
        ax.text(0.5, 0.5, "no face found in any generated image", transform=ax.transAxes, ha="center")
    first = next(iter(results.values()))
    ax.set_xlabel("adapter scale (no CLIP-T)" if no_clip else f"CLIP-T ({first.get('clip_model')})")
    ax.set_ylabel(f"identity similarity ({first['identity_model']['recognizer']})")
    ax.set_title("identity vs text alignment across adapter scales")
    ax.grid(alpha=0.3)
    if len(results) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())   # the records' one writer (disk full: old file kept)


def render_report(result: dict) -> str:
    """A Markdown summary of one evaluation."""
    idm, ad = result["identity_model"], result["adapter"]
    lines = [
        "# accord-face evaluation", "",
        f"- adapter: `{ad['adapter']}` ({ad.get('adapter_train_steps')} training steps), base `{ad['base_model']}`",
        f"- identity model: {idm['recognizer']} ({idm['backend']}, {idm['embedding_dim']}-d)"
        + (" - **same as the conditioning recognizer**" if idm["same_as_conditioning"] else ""),
        f"- CLIP-T model: {result['clip_model'] or 'none'}",
        f"- {result['num_identities']} identities x {result['num_prompts']} prompts x "
        f"{len(result['settings']['scales'])} scales x {len(result['settings']['seeds'])} seeds "
        f"= {result['num_samples']} images", "",
        "| scale | identity similarity | face not found | CLIP-T | n |", "|---|---|---|---|---|",
    ]
    for r in result["per_scale"] + [{"scale": "all", **result["overall"]}]:
        lines.append(f"| {r['scale']} | {_fmt(r['identity_similarity'])} | {_pct(r['face_not_found_rate'])} | "
                     f"{_fmt(r['clip_t'])} | {r['n']} |")
    lines += ["", "## Per identity", "", "| identity | identity similarity | face not found | CLIP-T |",
              "|---|---|---|---|"]
    for name, r in result["per_identity"].items():
        lines.append(f"| {name} | {_fmt(r['identity_similarity'])} | {_pct(r['face_not_found_rate'])} | "
                     f"{_fmt(r['clip_t'])} |")
    c = result["coupling"]
    lines += ["", "## Coupling diagnostics (ACCORD)", ""]
    dd, pd = c.get("dd", {}), c.get("pd", {})
    if "skipped" in dd:
        lines.append(f"- denoising dependence discrepancy: skipped ({dd['skipped']})")
    else:
        lines.append(f"- sum_t (t/T)|Delta_t| = {_fmt(dd['discrepancy'])} (mean (t/T)|Delta_t| "
                     f"{_fmt(dd['weighted_mean'])}) on {dd['num_samples']} samples from {dd['source']}")
        lines.append("- Delta_t by timestep quartile: " + ", ".join(
            f"Q{k}: {_fmt(v)}" for k, v in dd["delta_by_quartile"].items()))
    if "skipped" in pd:
        lines.append(f"- PDLoss cosine gap: skipped ({pd['skipped']})")
    else:
        lines.append(f"- PDLoss cosine gap: mean |gap| {_fmt(pd['abs_gap'])}, signed {_fmt(pd['signed_gap'])} "
                     f"(superclass \"{pd['superclass']}\")")
    lines += ["", "Plot: `tradeoff.png`; grids: `grid_<identity>.png` (rows: prompts, columns: scales).", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- comparison


def load_metrics(path: str | Path) -> dict:
    """metrics.json from a file or an evaluation folder; ValueError on another schema version."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass an evaluation folder or its metrics.json")
    data = json.loads(path.read_text())
    if data.get("schema_version") != 1:
        raise ValueError(f"{path}: schema_version {data.get('schema_version')!r}; this code reads version 1")
    return data


def flat_metrics(m: dict) -> dict[str, float | None]:
    """The comparable numbers of one report.

    Keys: ``overall.clip_t``, ``scale=0.6.clip_t``, ``coupling.dd.discrepancy``, ...
    """
    flat: dict[str, float | None] = {}
    for k in SUMMARY_METRICS:
        flat[f"overall.{k}"] = m["overall"].get(k)
    for row in m["per_scale"]:
        for k in SUMMARY_METRICS:
            flat[f"scale={row['scale']:g}.{k}"] = row.get(k)
    for section, k in COUPLING_METRICS:
        flat[f"coupling.{section}.{k}"] = m.get("coupling", {}).get(section, {}).get(k)
    return flat


def compare_metrics(a: dict, b: dict) -> list[dict[str, Any]]:
    """Rows {metric, a, b, delta = b - a} over the metrics of either report (None where one lacks it)."""
    fa, fb = flat_metrics(a), flat_metrics(b)
    keys = list(fa) + [k for k in fb if k not in fa]
    rows = []
    for k in keys:
        va, vb = fa.get(k), fb.get(k)
        delta = vb - va if isinstance(va, (int, float)) and isinstance(vb, (int, float)) else None
        rows.append({"metric": k, "a": va, "b": vb, "delta": delta})
    return rows


# Settings that change what is measured: deltas across them compare different experiments.
PROTOCOL_SETTINGS = ("prompt_list", "seeds", "identities", "steps", "guidance", "resolution", "negative_prompt",
                     "coupling_samples", "coupling_timesteps", "superclass", "id_model", "clip_model")
IGNORED_SETTINGS = ("out", "device", "batch_size", "prompts", "faces", "identity_photos")


def load_settings(path: str | Path) -> dict:
    """settings.json of an evaluation folder (beside metrics.json), with ``identities`` = the identity names."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    file = folder / "settings.json"
    if not file.is_file():
        return {}
    data = json.loads(file.read_text())
    data["identities"] = sorted(data.get("identity_photos") or {})
    return data


def compare_settings(a: dict, b: dict) -> tuple[list[tuple[str, Any, Any]], list[str]]:
    """(every differing setting as (key, a, b), the PROTOCOL_SETTINGS among them)."""
    keys = [k for k in list(a) + [k for k in b if k not in a] if k not in IGNORED_SETTINGS]
    diff = [(k, a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)]
    return diff, [k for k, _, _ in diff if k in PROTOCOL_SETTINGS]


def format_compare(rows: list[dict[str, Any]], name_a: str = "A", name_b: str = "B") -> str:
    """A Markdown table of the comparison."""
    lines = [f"| metric | {name_a} | {name_b} | delta (B - A) |", "|---|---|---|---|"]
    for r in rows:
        d = r["delta"]
        lines.append(f"| {r['metric']} | {_fmt(r['a'])} | {_fmt(r['b'])} | "
                     f"{'n/a' if d is None else f'{d:+.4g}'} |")
    return "\n".join(lines)
