"""Shared fixtures. Tests are CPU only and offline: no hub is ever contacted."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _embedded_cache(tmp_path_factory):
    """Keep embedded pipelines built by tests out of the user's cache."""
    if "ACCORD_FACE_CACHE" not in os.environ:
        os.environ["ACCORD_FACE_CACHE"] = str(tmp_path_factory.mktemp("accord_face_cache"))
    yield


@pytest.fixture(scope="session")
def tiny_pipeline_dir(_embedded_cache) -> str:
    """A saved embedded 'tiny' pipeline folder (built once per session)."""
    from accord_face.tiny import ensure_pipeline

    return str(ensure_pipeline("tiny", seed=0))


def pytest_collection_modifyitems(config, items):
    """``heavy`` tests (multi-process training runs over ~20 s) run only when asked: ``pytest -m heavy``
    (or ``ACCORD_FACE_HEAVY=1``); ``make test`` stays short."""
    if "heavy" in (config.getoption("-m") or "") or os.environ.get("ACCORD_FACE_HEAVY") == "1":
        return
    skip = pytest.mark.skip(reason="heavy: run with pytest -m heavy (or ACCORD_FACE_HEAVY=1)")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)
