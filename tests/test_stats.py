"""accord_face.stats against independent formulas and simulated two-level data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from accord_face import stats


def test_curve_gap_of_parallel_lines_is_their_offset():
    x = [0.1, 0.3, 0.5]
    assert stats.curve_gap(x, [1.0, 1.2, 1.4], [0.0, 0.2, 0.4, 0.6], [0.7, 0.9, 1.1, 1.3]) == pytest.approx(0.2)


def test_curve_gap_sorts_points_and_uses_the_overlap_only():
    # a: y = x on [0, 1] (unsorted); b: y = 0 on [0.5, 2]: gap over [0.5, 1] = mean of x there = 0.75
    assert stats.curve_gap([1.0, 0.0, 0.5], [1.0, 0.0, 0.5], [0.5, 2.0], [0.0, 0.0], points=1001) == \
        pytest.approx(0.75, abs=1e-3)
    assert stats.curve_gap([0, 1], [0, 1], [2, 3], [0, 0]) is None
    assert stats.curve_gap([0, float("nan")], [0, 1], [0, 1], [0, 0]) is None


def test_t_interval_matches_scipy():
    v = [0.1, 0.4, 0.35, 0.2, 0.5]
    got = stats.t_interval(v)
    lo, hi = sps.t.interval(0.95, len(v) - 1, loc=np.mean(v), scale=sps.sem(v))
    assert got["ci95"] == pytest.approx([lo, hi]) and got["n"] == 5
    assert stats.t_interval([0.3])["ci95"] is None


def test_variance_components_recover_simulated_values():
    rng = np.random.default_rng(0)
    S, I, s_seed, s_unit = 400, 60, 0.3, 1.0
    d = 0.5 + rng.normal(0, s_seed, (S, 1)) + rng.normal(0, s_unit, (S, I))
    vc = stats.variance_components(d)
    assert vc["sigma_seed2"] == pytest.approx(s_seed ** 2, rel=0.2)
    assert vc["sigma_unit2"] == pytest.approx(s_unit ** 2, rel=0.05)


def test_power_matches_the_normal_formula_and_seeds_needed_reaches_it():
    vc = {"sigma_seed2": 0.04, "sigma_unit2": 1.0}
    sd = math.sqrt(0.04 / 5 + 1.0 / (5 * 50))
    assert stats.power(0.2, vc, 5, 50) == pytest.approx(sps.norm.cdf(0.2 / sd - sps.norm.ppf(0.975)))
    n = stats.seeds_needed(0.2, vc, 50)
    assert stats.power(0.2, vc, n, 50) >= 0.8 > stats.power(0.2, vc, n - 1, 50)
    assert stats.power(0.2, vc, 10, 50) > stats.power(0.2, vc, 3, 50)


def test_hierarchical_bootstrap_covers_the_mean_about_95_percent():
    rng = np.random.default_rng(1)
    hits, trials = 0, 60
    for t in range(trials):
        x = 0.2 * rng.normal(size=(6, 1)) + rng.normal(size=(6, 30))        # true mean 0
        lo, hi = stats.hierarchical_bootstrap(lambda a: float(a.mean()), [x], reps=300, seed=t)
        hits += lo <= 0 <= hi
    assert hits / trials > 0.8
