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


def _fmt(e: dict) -> str:
    return f"{e['mean']:.2f} ± {e['ci95']:.2f}" if np.isfinite(e["ci95"]) else f"{e['mean']:.2f}"


def write_table(results: dict, path: Path) -> str:
    """Markdown table, one row per arm."""
    lines = ["| arm | lambda_DD | achieved lambda·L_DD/L_base | target fidelity | coupling rate | text alignment "
             "| context prompt alone | context prompt -> target leak | runs (images) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, e in results["arms"].items():
        lam = ", ".join(f"{x:.3g}" for x in e["lambda_dd"])
        ratios = [r for r in e["ratio_achieved"] if r is not None]
        ratio = f"{np.mean(ratios):.3f}" if ratios else "-"
        lines.append(f"| {name} | {lam} | {ratio} | {_fmt(e['target_fidelity'])} | {_fmt(e['coupling_rate'])} | "
                     f"{_fmt(e['text_alignment'])} | {_fmt(e['context_alone'])} | {_fmt(e['context_target_leak'])} | "
                     f"{e['target_fidelity']['n']} ({e['n_images']}) |")
    lines += ["", "Delta_t (the per-sample DDLoss quantity) by timestep quartile, mean over runs, "
              "first -> last 20 % of fine-tuning steps:", "",
              "| arm | t < 250 | 250-499 | 500-749 | >= 750 |", "|---|---|---|---|---|"]
    for name, e in results["arms"].items():
        cells = []
        for q in ("0", "1", "2", "3"):
            pairs = [r["delta_by_quartile"].get(q) or r["delta_by_quartile"].get(int(q)) for r in e["runs"]]
            pairs = [p for p in pairs if p and p["first"] is not None and p["last"] is not None]
            cells.append(f"{np.mean([p['first'] for p in pairs]):.3g} -> {np.mean([p['last'] for p in pairs]):.3g}"
                         if pairs else "-")
        if any(c != "-" for c in cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
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
        for ax, (mx, my) in ((a1, ("coupling_rate", "target_fidelity")), (a2, ("context_alone", "text_alignment"))):
            x, y = e[mx], e[my]
            # bars span the per-run values: with 2-3 runs a t-interval is wider than the whole axis
            xerr = [[max(0.0, x["mean"] - min(x["per_run"]))], [max(0.0, max(x["per_run"]) - x["mean"])]]
            yerr = [[max(0.0, y["mean"] - min(y["per_run"]))], [max(0.0, max(y["per_run"]) - y["mean"])]]
            ax.errorbar(x["mean"], y["mean"], xerr=xerr, yerr=yerr, fmt="o", capsize=3, alpha=0.8)
            ax.annotate(name, (x["mean"], y["mean"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    a1.set_xlabel("coupling rate (context object present, not asked)  lower = better")
    a1.set_ylabel("target fidelity (target present)")
    a2.set_xlabel("context prompt alone works")
    a2.set_ylabel("text alignment on target prompts")
    for ax in (a1, a2):
        ax.set_xlim(-0.05, 1.05), ax.set_ylim(-0.05, 1.05), ax.grid(alpha=0.3)
    fig.suptitle("ACCORD coupling testbed: mean over runs, bars = range of the per-run values")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
