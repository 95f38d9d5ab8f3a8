"""Benchmark smoke tests (issue 11): minutes on 2 cores, so skipped unless asked for.

    pytest -m bench tests/bench          # or ACCORD_FACE_BENCH=1 pytest tests/bench

They check that every figure is produced (never how fast anything is).
"""

from __future__ import annotations

import os

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "bench: benchmark smoke runs (minutes; pytest -m bench tests/bench)")


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(os.path.abspath(__file__))
    wanted = "bench" in (config.getoption("-m") or "") or os.environ.get("ACCORD_FACE_BENCH") == "1"
    skip = pytest.mark.skip(reason="benchmark smoke (minutes): run with pytest -m bench tests/bench")
    for item in items:
        if not str(item.fspath).startswith(here):
            continue
        item.add_marker(pytest.mark.bench)
        if not wanted:
            item.add_marker(skip)
