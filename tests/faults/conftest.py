"""The fault suite (issue 17): every test here is marked ``faults`` (``pytest -m faults`` runs them alone).

The long kill -9 trial loops are marked ``soak`` (and ``slow``) and skipped unless asked for:
``pytest -m soak tests/faults`` (or ``ACCORD_FACE_SOAK=1``).
"""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(os.path.abspath(__file__))
    wanted = "soak" in (config.getoption("-m") or "") or os.environ.get("ACCORD_FACE_SOAK") == "1"
    skip = pytest.mark.skip(reason="kill -9 trial loop: run with pytest -m soak tests/faults")
    for item in items:
        if not str(item.fspath).startswith(here):
            continue
        item.add_marker(pytest.mark.faults)
        if "soak" in item.keywords and not wanted:
            item.add_marker(skip)
