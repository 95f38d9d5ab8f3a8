"""Statistics of the coupling testbed: intervals over runs, paired differences, power of a paired t-test."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def t_half_width(values, level: float = 0.95) -> float:
    """Student-t half-width  t_{(1+level)/2, n-1} * s / sqrt(n)  (nan for n < 2)."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if n < 2:
        return float("nan")
    return float(stats.t.ppf(0.5 + level / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))


def summarize(values: list[float]) -> dict:
    """{mean, ci95, n, per_run}: Student-t 95 % half-width over runs (n = runs)."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "ci95": t_half_width(v), "n": len(v), "per_run": [round(float(x), 4) for x in v]}


def paired(arm: dict[tuple, float], reference: dict[tuple, float]) -> dict:
    """Paired difference arm - reference over the keys both have ((reference set, seed)).

        d_k = arm_k - reference_k;  mean_diff = mean_k d_k;  ci95 = t_{0.975, n-1} sd(d) / sqrt(n)
    """
    keys = sorted(set(arm) & set(reference))
    d = np.array([arm[k] - reference[k] for k in keys], dtype=np.float64)
    if not len(d):
        return {"mean_diff": float("nan"), "ci95": float("nan"), "n": 0, "sd": float("nan"), "keys": []}
    return {"mean_diff": float(d.mean()), "ci95": t_half_width(d), "n": len(d),
            "sd": float(d.std(ddof=1)) if len(d) > 1 else float("nan"), "keys": [list(k) for k in keys]}


def paired_t_power(n: int, effect: float, sd: float, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test with n pairs for a true mean difference ``effect``:

        P(|T| > t_{1-alpha/2, n-1}),  T ~ noncentral t(df = n - 1, nc = effect * sqrt(n) / sd)
    """
    if n < 2 or not np.isfinite(sd) or sd <= 0:
        return float("nan") if n < 2 or not np.isfinite(sd) else 1.0
    df, nc = n - 1, abs(effect) * math.sqrt(n) / sd
    crit = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))


def pairs_needed(effect: float, sd: float, power: float = 0.8, alpha: float = 0.05, n_max: int = 10_000) -> int | None:
    """Smallest n >= 2 with paired_t_power(n) >= power (None if not reached by n_max)."""
    if not np.isfinite(sd) or effect == 0:
        return None
    for n in range(2, n_max + 1):
        if paired_t_power(n, effect, sd, alpha) >= power:
            return n
    return None


def power_analysis(diff: dict, baseline_mean: float, relative_reduction: float = 0.3, power: float = 0.8,
                   alpha: float = 0.05) -> dict:
    """For one arm-vs-baseline paired difference: the effect to detect (relative_reduction x baseline's
    mean), the pairs needed for ``power`` with the observed sd of the differences, and the power the
    current number of pairs reaches."""
    effect = relative_reduction * baseline_mean
    need = pairs_needed(effect, diff["sd"], power, alpha)
    return {"effect": effect, "sd_of_differences": diff["sd"], "pairs": diff["n"], "pairs_needed": need,
            "power_achieved": paired_t_power(diff["n"], effect, diff["sd"], alpha)}
