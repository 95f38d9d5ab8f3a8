"""Disk full (an injected writer raising ENOSPC / EFBIG) while `evaluate` and `generate` write their records:
the previous complete files stay byte for byte, the error is one line naming the path, exit 2, and the rerun
after space is freed completes."""

from __future__ import annotations

import errno
import json
import os
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_pipeline_helpers import export_test_adapter, grace_hopper  # noqa: E402

import accord_face.pipeline as pipeline  # noqa: E402
from accord_face.cli import main  # noqa: E402

RECORDS = ("samples.jsonl", "metrics.json", "samples.csv", "report.md", "grid_grace.png", "settings.json",
           "tradeoff.png", "grid_eileen.png")


@pytest.fixture(scope="module")
def inputs(tiny_pipeline_dir, tmp_path_factory):
    from data_pipelines.embedded import load_portrait

    root = tmp_path_factory.mktemp("eval_inputs")
    faces = root / "faces"
    (faces / "grace").mkdir(parents=True)
    grace_hopper().save(faces / "grace" / "orig.jpg", quality=95)
    load_portrait("eileen_collins").save(faces / "eileen.png")
    (root / "prompts.txt").write_text("a photo of a person\n")
    return {"faces": faces, "prompts": root / "prompts.txt", "photo": faces / "grace" / "orig.jpg",
            "adapter": export_test_adapter(tiny_pipeline_dir, root / "adapter")}


def _evaluate(inputs, out: Path) -> list[str]:
    return ["evaluate", "--adapter", str(inputs["adapter"]), "--faces", str(inputs["faces"]), "--prompts",
            str(inputs["prompts"]), "--scales", "0,1", "--seeds", "0", "--batch-size", "2", "--steps", "1",
            "--clip-model", "none", "--coupling-samples", "0", "--out", str(out)]


def _full_disk(monkeypatch, name: str, code: int = errno.ENOSPC, after: int = 0):
    """The record writer raises ``code`` for a file whose name contains ``name`` (after ``after`` good writes)."""
    real, seen = pipeline._write_all, [0]

    def write(f, data, path):
        if Path(path).name == name:
            seen[0] += 1
            if seen[0] > after:
                f.write(data[:len(data) // 2])        # part of it reaches the file first, as on a real disk
                raise OSError(code, "No space left on device" if code == errno.ENOSPC else "File too large")
        return real(f, data, path)

    monkeypatch.setattr(pipeline, "_write_all", write)


def _one_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.strip().splitlines()
           if ln.startswith("accord-face ") or "Traceback" in ln or "Error" in ln]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def _snapshot(out: Path) -> dict[str, bytes]:
    return {n: (out / n).read_bytes() for n in RECORDS if (out / n).is_file()}


def _no_temp_files(out: Path) -> bool:
    return not [p for p in out.rglob(".*") if p.is_file()]


@pytest.mark.parametrize("target, code", [("metrics.json", errno.ENOSPC), ("grid_grace.png", errno.EFBIG),
                                          ("samples.csv", errno.ENOSPC), ("settings.json", errno.ENOSPC),
                                          ("tradeoff.png", errno.ENOSPC)])
def test_full_disk_while_rewriting_records_keeps_the_complete_ones(inputs, tmp_path, monkeypatch, capsys,
                                                                   target, code):
    out = tmp_path / "eval"
    assert main(_evaluate(inputs, out)) == 0
    before = _snapshot(out)
    assert set(before) == set(RECORDS)
    capsys.readouterr()
    _full_disk(monkeypatch, target, code)
    assert main(_evaluate(inputs, out)) == 2               # the rerun rewrites every record: one fails
    line = _one_line(capsys)
    assert str(out / target) in line and ("the disk is full" if code == errno.ENOSPC else "larger than allowed") \
        in line and "rerun the same command" in line, line
    assert _snapshot(out) == before, "a complete record was damaged"
    assert _no_temp_files(out)
    monkeypatch.undo()
    assert main(_evaluate(inputs, out)) == 0               # space freed: the rerun completes
    assert json.loads((out / "metrics.json").read_text())["num_samples"] == 4


def test_full_disk_while_appending_samples_then_rerun_resumes(inputs, tmp_path, monkeypatch, capsys):
    reference = tmp_path / "reference"
    assert main(_evaluate(inputs, reference)) == 0
    out = tmp_path / "eval"
    capsys.readouterr()
    _full_disk(monkeypatch, "samples.jsonl", after=2)      # the 3rd of 4 records does not fit
    assert main(_evaluate(inputs, out)) == 2
    line = _one_line(capsys)
    assert f"{out / 'samples.jsonl'}: the disk is full" in line and "samples.jsonl)" in line, line
    kept = (out / "samples.jsonl").read_text()
    assert kept.endswith("\n") and len(kept.splitlines()) == 2, "the half-written record was not cut off"
    assert all(json.loads(ln)["key"] for ln in kept.splitlines())
    assert not (out / "metrics.json").exists()
    monkeypatch.undo()
    assert main(_evaluate(inputs, out)) == 0
    redone = (out / "samples.jsonl").read_text().splitlines()
    assert redone[:2] == kept.splitlines() and len(redone) == 4
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (reference, out))
    assert a["overall"] == b["overall"] and a["per_scale"] == b["per_scale"]


def test_generate_full_disk_names_the_file_and_keeps_the_previous_grid(inputs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "gen"
    argv = ["generate", "--adapter", str(inputs["adapter"]), "--face", str(inputs["photo"]), "--prompt",
            "a photo of a person", "--steps", "1", "--out", str(out)]
    assert main(argv) == 0
    before = {n: (out / n).read_bytes() for n in ("grid.png", "generate.json")}
    capsys.readouterr()
    for target in ("grid.png", "generate.json"):
        _full_disk(monkeypatch, target)
        assert main(argv) == 2
        line = _one_line(capsys)
        assert line.startswith("accord-face generate: error:") and f"{out / target}: the disk is full" in line, line
        assert {n: (out / n).read_bytes() for n in before} == before and _no_temp_files(out)
        monkeypatch.undo()
    assert main(argv) == 0


def test_a_bug_is_not_dressed_up_as_a_disk_error(monkeypatch):
    """Only disk / permission errnos become one line: anything else keeps its traceback."""
    from accord_face.train.errors import disk_error

    assert disk_error(OSError(errno.EBADF, "Bad file descriptor", "x")) is None
    assert "x: the disk quota is exceeded" in disk_error(OSError(errno.EDQUOT, "Disk quota exceeded", "x"))


@pytest.mark.heavy
def test_a_real_ulimit_f_is_one_line_and_keeps_the_complete_records(inputs, tmp_path):
    """RLIMIT_FSIZE below the grid's size in a subprocess (Python ignores SIGXFSZ, so the write gets EFBIG);
    three evaluate processes, about a minute: pytest -m heavy."""
    import resource
    import subprocess

    out = tmp_path / "eval"
    argv = [sys.executable, "-m", "accord_face.cli"] + _evaluate(inputs, out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    assert subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600).returncode == 0
    before = _snapshot(out)
    limit = (out / "grid_grace.png").stat().st_size // 2
    assert max(len(v) for k, v in before.items() if k.endswith((".json", ".jsonl"))) < limit, "test premise"

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, preexec_fn=small_files)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("accord-face evaluate: error:") and "larger than allowed (ulimit -f?)" in line, line
    assert re.search(rf"{re.escape(str(out))}/(grid_\w+|tradeoff)\.png: ", line), line   # the first png over the limit
    assert _snapshot(out) == before and _no_temp_files(out)
    assert subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600).returncode == 0
