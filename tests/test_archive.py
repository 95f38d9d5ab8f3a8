"""The committed archive of finished runs: round trip, change detection, and that git keeps it."""

import gzip
import subprocess
from pathlib import Path

import pytest

from accord_face import archive

REPO = Path(__file__).resolve().parents[1]


def test_save_restore_round_trip_and_skips_unchanged(tmp_path):
    out, arch = tmp_path / "out", tmp_path / "arch"
    (out / "runs").mkdir(parents=True)
    a, b = out / "runs" / "a.json", out / "b.jsonl"
    a.write_text('{"x": 1}')
    b.write_bytes(b"line\n" * 100)
    assert archive.save(out, arch, [a, b, out / "missing.json"]) == 2
    assert gzip.decompress((arch / "runs" / "a.json.gz").read_bytes()) == b'{"x": 1}'
    assert archive.save(out, arch, [a, b]) == 0          # unchanged: nothing rewritten
    a.write_text('{"x": 2}')
    assert archive.save(out, arch, [a, b]) == 1
    fresh = tmp_path / "fresh"
    assert archive.restore(fresh, arch) == 2
    assert (fresh / "runs" / "a.json").read_text() == '{"x": 2}' and (fresh / "b.jsonl").read_bytes() == b.read_bytes()
    (fresh / "b.jsonl").write_text("newer, local")
    assert archive.restore(fresh, arch) == 0             # what the working folder has is never overwritten
    assert (fresh / "b.jsonl").read_text() == "newer, local"
    assert not list(tmp_path.rglob("*.tmp"))
    assert archive.restore(tmp_path / "x", tmp_path / "no-archive") == 0


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="needs the git checkout")
@pytest.mark.parametrize("rel", ["docs/encoder_coupling/runs/baseline-abc/seed0/records.jsonl.gz",
                                 "docs/testbed/archive/runs/baseline_ref0_seed0.json.gz",
                                 "docs/testbed/archive/strength.json.gz"])
def test_archives_are_not_ignored_by_git(rel):
    """An archive that .gitignore swallows is lost with the checkout (a top-level ``runs/`` rule once did)."""
    try:
        subprocess.run(["git", "--version"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git not installed")
    assert not archive.ignored_by_git(REPO / rel)
    assert archive.ignored_by_git(REPO / "testbed_out" / "runs" / "x.json")
