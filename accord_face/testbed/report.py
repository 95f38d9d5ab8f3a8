"""Table, plot and image grids of the coupling testbed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def save_grid(images: torch.Tensor, labels: list[str], path: Path, cols: int = 12, scale: int = 3) -> None:
    """Images (N, 3, H, W) in [-1, 1] as a PNG grid (PIL, nearest upscaling), each with its judge labels below."""
    from PIL import Image, ImageDraw

    from accord_face.testbed.model import to_uint8
    arr = to_uint8(images)
    n, h, w, _ = arr.shape
    cell_w, cell_h = w * scale, h * scale + 12
    rows = (n + cols - 1) // cols
    canvas = Image.new("RGB", (cols * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k in range(n):
        x, y = (k % cols) * cell_w, (k // cols) * cell_h
        canvas.paste(Image.fromarray(arr[k]).resize((w * scale, h * scale), Image.NEAREST), (x, y))
        draw.text((x + 1, y + h * scale), labels[k][:18], fill=(0, 0, 0))
    tmp = path.with_name(path.stem + ".tmp.png")
    canvas.save(tmp)
    tmp.replace(path)


def _fmt(e: dict | None, digits: int = 2) -> str:
    if not e:
        return "-"
    if "mean_diff" in e:
        m, h = e["mean_diff"], e["ci95"]
        return f"{m:+.{digits}f} ± {h:.{digits}f}" if np.isfinite(h) else (f"{m:+.{digits}f}" if np.isfinite(m) else "-")
    return f"{e['mean']:.{digits}f} ± {e['ci95']:.{digits}f}" if np.isfinite(e["ci95"]) else f"{e['mean']:.{digits}f}"


def write_table(results: dict, path: Path) -> str:
    """Markdown: per-arm means (rate / judge probability), paired differences vs baseline with power."""
    head = "partial: " if results.get("partial") else ""
    lines = [f"{head}{results.get('runs_done')} of {results.get('runs_planned')} planned runs "
             f"(protocol v{results.get('protocol_version')}); mean ± Student-t 95 % half-width over runs", "",
             "| arm | lambda_DD | target fidelity (rate / p) | coupling rate (rate / p) | text alignment | "
             "unrelated alignment kept | context prompt alone | context -> target leak | runs (images) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, e in results["arms"].items():
        lam = ", ".join(f"{x:.3g}" for x in e["lambda_dd"])
        lines.append(f"| {name} | {lam} | {_fmt(e['target_fidelity'])} / {_fmt(e['target_fidelity_p'])} | "
                     f"{_fmt(e['coupling_rate'])} / {_fmt(e['coupling_rate_p'])} | {_fmt(e['text_alignment'])} | "
                     f"{_fmt(e.get('unrelated_alignment_kept'))} | {_fmt(e['context_alone'])} | "
                     f"{_fmt(e['context_target_leak'])} | {e['target_fidelity']['n']} ({e['n_images']}) |")
    pw = results.get("power", {}).get("arms", {})
    ref = results.get("reference_arm", "baseline")
    lines += ["", f"Paired differences vs `{ref}` (same reference set and seed), mean ± 95 % half-width; power "
              f"for a {results.get('power', {}).get('relative_reduction', 0.3):.0%} relative reduction of {ref}'s "
              "coupling (paired t, two-sided, 0.05) with the observed sd of the differences:", "",
              "| arm | pairs | d coupling rate | d coupling p | d target fidelity | d text alignment | d unrelated alignment "
              "| power reached (rate / p) | pairs needed for 80 % (rate / p) | the same for 30 % of the excess over "
              "base (power / pairs, rate) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in results["arms"].items():
        d = e.get("paired_vs_baseline")
        if not d:
            continue
        p = pw.get(name, {})

        def pr(m: str, key: str) -> str:
            v = p.get(m, {}).get(key)
            return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else (
                f"{v:.2f}" if isinstance(v, float) else str(v))
        lines.append(f"| {name} | {d['coupling_rate']['n']} | {_fmt(d['coupling_rate'])} | {_fmt(d['coupling_rate_p'])} | "
                     f"{_fmt(d['target_fidelity'])} | {_fmt(d['text_alignment'])} | {_fmt(d['unrelated_alignment'])} | "
                     f"{pr('coupling_rate', 'power_achieved')} / {pr('coupling_rate_p', 'power_achieved')} | "
                     f"{pr('coupling_rate', 'pairs_needed')} / {pr('coupling_rate_p', 'pairs_needed')} | "
                     f"{pr('coupling_rate_excess', 'power_achieved')} / {pr('coupling_rate_excess', 'pairs_needed')} |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def write_plot(results: dict, path: Path) -> None:
    """Coupling rate vs target fidelity per arm (95 % intervals), and text alignment vs context-alone."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, e in results["arms"].items():
        for ax, (mx, my) in ((a1, ("coupling_rate", "target_fidelity")), (a2, ("context_alone", "unrelated_alignment"))):
            x, y = e[mx], e[my]
            # bars span the per-run values: with 2-3 runs a t-interval is wider than the whole axis
            xerr = [[max(0.0, x["mean"] - min(x["per_run"]))], [max(0.0, max(x["per_run"]) - x["mean"])]]
            yerr = [[max(0.0, y["mean"] - min(y["per_run"]))], [max(0.0, max(y["per_run"]) - y["mean"])]]
            ax.errorbar(x["mean"], y["mean"], xerr=xerr, yerr=yerr, fmt="o", capsize=3, alpha=0.8)
            ax.annotate(name, (x["mean"], y["mean"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    a1.set_xlabel("coupling rate (context object present, not asked)  lower = better")
    a1.set_ylabel("target fidelity (target present)")
    a2.set_xlabel("context prompt alone works")
    a2.set_ylabel("text alignment on unrelated prompts")
    for ax in (a1, a2):
        ax.set_xlim(-0.05, 1.05), ax.set_ylim(-0.05, 1.05), ax.grid(alpha=0.3)
    fig.suptitle(f"ACCORD coupling testbed v{results.get('protocol_version', 1)}"
                 f"{' (partial)' if results.get('partial') else ''}: mean over runs, bars = range of the per-run values")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
