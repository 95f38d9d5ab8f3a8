"""The job-wide progress bar's counts, and the scaling benchmark's figures (small, CPU)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from data_pipelines.progress import JobProgress, format_counts

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def test_format_counts_lists_reasons_most_frequent_first():
    assert format_counts(5, {}) == "kept=5 skipped=0"
    assert format_counts(2, {"no_face": 1, "corrupt_image": 3, "too_small": 0}) == \
        "kept=2 skipped=4 (corrupt_image=3 no_face=1)"


def test_job_progress_follows_deltas_and_cluster_snapshots():
    import io

    out = io.StringIO()
    bar = JobProgress(enabled=True, file=out)
    bar.add(3)
    bar.add(0, {"no_face": 2})
    assert (bar.kept, dict(bar.skipped), bar.done) == (3, {"no_face": 2}, 5)
    bar.set_totals(7, {"no_face": 2, "multiple_faces": 1})  # a snapshot of the Ray counter actor
    assert (bar.kept, dict(bar.skipped), bar.done) == (7, {"no_face": 2, "multiple_faces": 1}, 10)
    bar.close()
    last = out.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("prepare-shards: 10img") and "img/s" in last
    assert last.endswith("kept=7 skipped=3 (no_face=2 multiple_faces=1)]")


def test_scaling_benchmark_reports_consistent_recognition_ratios():
    from benchmarks.bench_shards import measure_scaling

    r = measure_scaling(crops=6, batch=3, repeats=1, sections=("recognition",))
    assert [row["threads"] for row in r["recognition"]] == [1, 2]
    for row in r["recognition"]:
        assert row["batched_axis"] is True and row["providers"] == ["CPUExecutionProvider"]
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("loop_ms_per_crop", "batched_ms_per_crop"))
        assert row["speedup"] == pytest.approx(row["loop_ms_per_crop"] / row["batched_ms_per_crop"], rel=0.01)
    assert "distributor" not in r and "batch_size" not in r
