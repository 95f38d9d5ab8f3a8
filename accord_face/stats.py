"""Statistics for paired, two-level experiments (training seeds x evaluation units), with power.

Data layout: ``x[s, i]`` is a metric of training seed ``s`` on evaluation unit ``i`` (a held-out
identity, a reference set ...); arms share seeds and units, so differences are paired.

- ``t_interval``: mean with a Student-t 95 % interval (one level).
- ``hierarchical_bootstrap``: percentile interval of any statistic of one or more (S, I, ...)
  arrays, resampling seeds and, within the resampled seeds, units (both with replacement, the
  same indices for every array: pairing is kept).
- ``variance_components`` / ``power``: for the grand mean of a paired difference d[s, i],

      Var(mean d) = sigma_seed^2 / S + sigma_unit^2 / (S * I)

  with sigma_unit^2 the within-seed variance over units and sigma_seed^2 the variance of
  seed means beyond what unit sampling explains (method of moments, floored at 0). The power
  of a two-sided level-alpha test of an effect delta is (normal approximation)

      power = Phi(|delta| / sqrt(Var) - z_{1 - alpha/2}),

  and the seeds needed for power 1 - beta at I units solve |delta| / sqrt(Var) = z_{1-alpha/2} + z_{1-beta}.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

__all__ = ["t_interval", "hierarchical_bootstrap", "variance_components", "power", "seeds_needed", "curve_gap"]


def t_interval(values: Sequence[float], level: float = 0.95) -> dict:
    """{mean, ci95, n, per_run}: Student-t interval over the finite values (None below 2 values)."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if len(v) < 2:
        return {"mean": float(v.mean()) if len(v) else None, "ci95": None, "n": int(len(v)),
                "per_run": [round(float(x), 5) for x in v]}
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return {"mean": float(v.mean()), "ci95": [float(v.mean() - half), float(v.mean() + half)], "n": int(len(v)),
            "per_run": [round(float(x), 5) for x in v]}


def hierarchical_bootstrap(stat: Callable[..., float], arrays: Sequence[np.ndarray], reps: int = 2000,
                           seed: int = 0, level: float = 0.95) -> list[float] | None:
    """Percentile interval of ``stat(*arrays[seeds][:, units])``; arrays are (S, I, ...), NaN = missing.

    With one seed only units are resampled (the interval then ignores training-seed variance)."""
    S, I = arrays[0].shape[:2]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(reps):
        s = rng.integers(0, S, S) if S > 1 else np.zeros(1, int)
        i = rng.integers(0, I, I)
        v = stat(*[a[s][:, i] for a in arrays])
        if v is not None and np.isfinite(v):
            out.append(v)
    if len(out) < reps // 2:
        return None
    lo, hi = np.quantile(out, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def variance_components(d: np.ndarray) -> dict:
    """d: (S, I) paired differences -> {sigma_seed2, sigma_unit2, S, I} (method of moments)."""
    d = np.asarray(d, np.float64)
    S, I = d.shape
    unit = float(np.nanmean(np.nanvar(d, axis=1, ddof=1))) if I > 1 else 0.0
    seed_means = np.nanmean(d, axis=1)
    between = float(np.var(seed_means, ddof=1)) if S > 1 else 0.0
    return {"sigma_seed2": max(between - unit / I, 0.0), "sigma_unit2": unit, "S": S, "I": I}


def _var(vc: dict, seeds: int, units: int) -> float:
    return vc["sigma_seed2"] / seeds + vc["sigma_unit2"] / (seeds * units)


def power(delta: float, vc: dict, seeds: int, units: int, alpha: float = 0.05) -> float:
    """Two-sided power to detect ``delta`` with ``seeds`` x ``units`` (normal approximation)."""
    from scipy import stats

    sd = math.sqrt(max(_var(vc, seeds, units), 1e-300))
    return float(stats.norm.cdf(abs(delta) / sd - stats.norm.ppf(1 - alpha / 2)))


def seeds_needed(delta: float, vc: dict, units: int, target: float = 0.8, alpha: float = 0.05,
                 max_seeds: int = 1000) -> int | None:
    """Smallest number of seeds reaching ``target`` power at ``units`` units (None beyond ``max_seeds``)."""
    for s in range(1, max_seeds + 1):
        if power(delta, vc, s, units, alpha) >= target:
            return s
    return None


def curve_gap(x_a: Sequence[float], y_a: Sequence[float], x_b: Sequence[float], y_b: Sequence[float],
              points: int = 64) -> float | None:
    """Mean vertical gap between two curves over their common x range (the area between them / its width):

        gap = 1 / (hi - lo) * integral_lo^hi [y_a(x) - y_b(x)] dx,   lo = max(min x_a, min x_b), hi = min(max ...)

    each curve linear between its points sorted by x. None when the x ranges do not overlap."""
    xa, ya, xb, yb = (np.asarray(v, np.float64) for v in (x_a, y_a, x_b, y_b))
    if not (np.isfinite(xa).all() and np.isfinite(ya).all() and np.isfinite(xb).all() and np.isfinite(yb).all()):
        return None
    oa, ob = np.argsort(xa), np.argsort(xb)
    lo, hi = max(xa.min(), xb.min()), min(xa.max(), xb.max())
    if not hi > lo:
        return None
    grid = np.linspace(lo, hi, points)
    return float(np.mean(np.interp(grid, xa[oa], ya[oa]) - np.interp(grid, xb[ob], yb[ob])))
