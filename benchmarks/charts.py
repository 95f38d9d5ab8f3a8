"""results.json -> Markdown table and PNG charts (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_step_cost(step: dict, path: Path) -> Path:
    """Two panels per UNet size: step-time ratio (median, min-max bars) and peak-memory ratio per variant."""
    plt = _plt()
    names = list(step["variants"])
    v = [step["variants"][n] for n in names]
    med = [x["time_ratio"]["median"] for x in v]
    lo = [m - x["time_ratio"]["min"] for m, x in zip(med, v)]
    hi = [x["time_ratio"]["max"] - m for m, x in zip(med, v)]
    mem = [x["memory_ratio"] for x in v]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 0.32 * len(names) + 1.6), sharey=True)
    y = list(range(len(names)))
    colors = ["tab:green" if n.startswith("default") else "tab:blue" for n in names]
    a.barh(y, med, xerr=[lo, hi], color=colors, capsize=2)
    a.axvline(1.10, color="tab:red", ls="--", lw=1, label="goal 1.10x")
    a.set_yticks(y, names, fontsize=8)
    a.invert_yaxis()
    a.set_xlabel("step time / baseline (median, min-max over rounds)")
    a.legend(fontsize=7, loc="lower right")
    b.barh(y, mem, color=colors)
    b.axvline(1.05, color="tab:red", ls="--", lw=1, label="goal 1.05x")
    b.set_xlim(min(0.95, min(mem) - 0.01), max(1.1, max(mem) + 0.02))
    b.set_xlabel("peak memory / baseline (weights included)")
    b.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"ACCORD step cost, {step['size']} UNet ({step['unet_params_m']:.0f} M), {step['resolution']} px, "
                 f"batch {step['batch']}, {step['device']} ({step['clock']} time), {step['rounds']} rounds",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loader(loader: dict, path: Path) -> Path:
    plt = _plt()
    ws = sorted(loader["workers"], key=int)
    sps = [loader["workers"][w]["samples_per_s"] for w in ws]
    per = [loader["workers"][w]["samples_per_cpu_s"]["median"] for w in ws]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    x = [int(w) for w in ws]
    ax.errorbar(x, [s["median"] for s in sps], yerr=[[s["median"] - s["min"] for s in sps],
                                                     [s["max"] - s["median"] for s in sps]],
                marker="o", capsize=3, label="samples/s (wall), uint8 pixels (trainer)")
    ax.plot(x, per, "s--", label="samples per CPU-second (per core)")
    f32 = [loader["workers_float32_pixels"][w]["samples_per_cpu_s"]["median"] for w in ws]
    ax.plot(x, f32, "^:", color="tab:gray", label="per CPU-second, float32 pixels (before)")
    ax.axhline(loader.get("goal_samples_per_s_per_core", 150), color="tab:red", ls=":", lw=1,
               label="goal 150 samples/s per core")
    feed = loader.get("step_rate_to_feed")
    if feed:
        ax.axhline(feed["samples_per_s"], color="tab:gray", ls="-.", lw=1,
                   label=f"{feed['size']} baseline step consumes ({feed['samples_per_s']:.2g}/s)")
    ax.set_xticks(x)
    ax.set_xlabel("DataLoader workers (0 = in the main process)")
    ax.set_ylabel("samples / s")
    ax.set_title(f"loader at {loader['resolution']} px: decode + resize + collate, batch {loader['batch']}",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(results: dict, out: Path) -> list[Path]:
    from benchmarks.bench_zero import plot_losses

    paths = []
    for size in ("tiny", "sd15"):
        step = results.get("accord_step", {}).get(size)
        if step:
            paths.append(plot_step_cost(step, out / f"step_cost_{size}.png"))
    if "loader" in results:
        paths.append(plot_loader(results["loader"], out / "loader.png"))
    if "zero" in results:
        paths.append(plot_losses(results["zero"], out / "zero_losses.png"))
    return paths


def _ratio(r: dict) -> str:
    return f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})"


def markdown(results: dict) -> str:
    """One table per section; ratios are median (min-max) over the run's interleaved rounds."""
    m = results.get("machine", {})
    lines = [f"Machine: {m.get('cpus')} CPUs, torch {m.get('torch')}, {m.get('gpu', 'no GPU')}; load average at "
             f"start {m.get('load_average')}, at end {results.get('load_average_after')}"
             + (" (--quick)" if results.get("quick") else ""), ""]
    step = results.get("accord_step", {})
    d = step.get("default")
    if d:
        s = d["settings"]
        lines += [f"**Default ACCORD setting** (dd_batch_fraction={s['dd_batch_fraction']}, "
                  f"dd_every_n_steps={s['dd_every_n_steps']}, lambda_dd={s['lambda_dd']}, "
                  f"lambda_pd={s['lambda_pd']}) on the {d['size']} UNet: step time {d['time_ratio']:.3f}x "
                  f"({d['time_ratio_min']:.2f}-{d['time_ratio_max']:.2f}), peak memory {d['memory_ratio']:.3f}x "
                  f"of the baseline (goal <= 1.10x / <= 1.05x).", ""]
    for size in ("tiny", "sd15"):
        r = step.get(size)
        if not r:
            continue
        lines += [f"ACCORD step cost, {size} UNet ({r['unet_params_m']:.0f} M params), {r['resolution']} px, batch "
                  f"{r['batch']}, {r['device']}, {r['clock']} time, {r['rounds']} rounds "
                  f"(load {step.get('load_average_before')} -> {step.get('load_average_after')}):", "",
                  "| variant | s/step | time x baseline | peak memory x baseline | activations x baseline |",
                  "|---|---:|---:|---:|---:|"]
        for name, v in r["variants"].items():
            lines.append(f"| {name} | {v['sec_per_step']['median']:.3f} | {_ratio(v['time_ratio'])} | "
                         f"{v['memory_ratio']:.3f} | {v['activation_memory_ratio']:.2f} |")
        lines.append("")
    ld = results.get("loader")
    if ld:
        lines += [f"Loader, {ld['samples']} portraits stored at {ld['stored_px']} px -> {ld['resolution']} px, batch "
                  f"{ld['batch']}, {ld['rounds']} rounds (load {ld.get('load_average_before')}):", "",
                  "| workers | samples/s (wall), uint8 | per CPU-second, uint8 | samples/s, float32 pixels | "
                  "per CPU-second, float32 |", "|---:|---:|---:|---:|---:|"]
        for w, v in ld["workers"].items():
            f32 = ld["workers_float32_pixels"][w]
            lines.append(f"| {w} | {_ratio(v['samples_per_s'])} | {v['samples_per_cpu_s']['median']:.0f} | "
                         f"{_ratio(f32['samples_per_s'])} | {f32['samples_per_cpu_s']['median']:.0f} |")
        feed = ld.get("step_rate_to_feed")
        lines += ["", f"Per core: {ld['samples_per_s_per_core']:.0f} samples/s at {ld['per_core_from_workers']} "
                      f"workers (goal >= 150)" + (f"; the {feed['size']} baseline step here consumes "
                                                   f"{feed['samples_per_s']:.3g} samples/s" if feed else "") + ".", ""]
    pr = results.get("prep")
    if pr:
        lines += [f"Shard preparation, {pr['images']} images ({pr['backend']}) at {pr['resolution']} px:", "",
                  "| workers | images/s | images/s per worker | outside model inference |", "|---:|---:|---:|---:|"]
        for w, v in pr["workers"].items():
            lines.append(f"| {w} | {v['images_per_s']:.2f} | {v['images_per_s_per_worker']:.2f} | "
                         f"{100 * v['non_model_share']:.1f} % |")
        lines.append("")
    z = results.get("zero")
    if z:
        lines += [f"ZeRO on CPU (gloo), tiny trainer, global batch {z['global_batch']}, {z['steps']} steps "
                  f"(load {z.get('load_average_before')}):", "",
                  "| stage | ranks | wall s/step | CPU s/step per rank | peak RSS rank 0 (GiB) | "
                  "2-rank speedup, CPU (wall) | max loss gap 1 vs 2 ranks |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for v in z["runs"].values():
            sp = (f"{v['two_rank_speedup']:.2f} ({v.get('two_rank_speedup_wall', float('nan')):.2f})"
                  if "two_rank_speedup" in v else "")
            cpu = _ratio(v["cpu_s_per_rank"]) if "cpu_s_per_rank" in v else ""
            gap = f"{v['max_loss_gap_vs_2_ranks']:.1e}" if "max_loss_gap_vs_2_ranks" in v else ""
            lines.append(f"| {v['stage']} | {v['ranks']} | {_ratio(v['step_s'])} | {cpu} | {v['peak_rss_gib_rank0']:.2f} | "
                         f"{sp} | {gap} |")
        lines.append("")
    pf = results.get("profile")
    if pf:
        lines += [f"Where one step goes: {pf['size']} UNet, {pf['resolution']} px, batch {pf['batch']}, DD f=1 + PD, "
                  f"{pf['clock']} time, median of {pf['repeats']} steps:", "", "| phase | s | share |", "|---|---:|---:|"]
        for k, v in pf["phases_s"].items():
            lines.append(f"| {k} | {v:.2f} | {100 * pf['phases_share'][k]:.0f} % |")
        ops = ", ".join(f"{k} {100 * v:.0f} %" for k, v in pf["top_ops_share"][:6])
        kn = pf["branch_forward_vs_no_grad"]
        lines += ["", f"Top operators (share of self time): {ops}.",
                  f"No-grad branch forward ({kn['branch_batch']} samples) over no_grad + contiguous: inference_mode "
                  f"{kn['inference_mode']:.3f}x, channels_last {kn['no_grad + channels_last']:.3f}x.", ""]
    return "\n".join(lines)
