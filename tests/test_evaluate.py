"""`accord-face evaluate`: the run on the tiny pipeline, metrics.json schema, resume, and --compare."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from accord_face.cli import main
from accord_face.evaluate import aggregate, load_identities, load_prompts
from accord_face.evaluate_report import compare_metrics
from accord_face.pipeline import GenerateError
from data_pipelines.embedded import load_portrait, rephotos
from test_pipeline_helpers import export_test_adapter, save_tiny_clip

# The schema of metrics.json (version 1). Changing a key is a schema change: bump SCHEMA_VERSION.
TOP_KEYS = {"schema_version", "adapter", "identity_model", "clip_model", "settings", "num_identities", "num_prompts",
            "num_samples", "overall", "per_scale", "per_identity", "coupling"}
SUMMARY_KEYS = {"n", "identity_similarity", "face_not_found_rate", "clip_t"}
IDENTITY_MODEL_KEYS = {"recognizer", "backend", "embedding_dim", "same_as_conditioning"}
DD_KEYS = {"discrepancy", "weighted_mean", "delta_by_quartile", "abs_delta_by_t", "num_samples", "source"}
PD_KEYS = {"abs_gap", "signed_gap", "num_identities", "num_captions", "projection_model", "superclass", "pd_mapping"}


@pytest.fixture(scope="module")
def inputs(tiny_pipeline_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_inputs")
    faces = root / "faces"
    (faces / "grace").mkdir(parents=True)
    grace = load_portrait("grace_hopper")
    grace.save(faces / "grace" / "orig.jpg", quality=95)
    rephotos(grace)[0][1].save(faces / "grace" / "mirror.png")
    load_portrait("eileen_collins").save(faces / "eileen.png")
    (root / "prompts.txt").write_text("# evaluation prompts\n\na photo of a person on a beach\n")
    return {"faces": faces, "prompts": root / "prompts.txt",
            "adapter": export_test_adapter(tiny_pipeline_dir, root / "adapter"),
            "clip": save_tiny_clip(root / "clip")}


def _argv(inputs, out, scales="0,1"):
    return ["evaluate", "--adapter", str(inputs["adapter"]), "--faces", str(inputs["faces"]), "--prompts",
            str(inputs["prompts"]), "--scales", scales, "--seeds", "0,1", "--batch-size", "2", "--steps", "2",
            "--clip-model", str(inputs["clip"]), "--coupling-samples", "2", "--coupling-timesteps", "2",
            "--out", str(out)]


def test_evaluate_end_to_end_schema_resume(inputs, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(inputs, out)) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m) == TOP_KEYS and m["schema_version"] == 1
    assert set(m["overall"]) == SUMMARY_KEYS and set(m["identity_model"]) == IDENTITY_MODEL_KEYS
    assert [set(r) for r in m["per_scale"]] == [SUMMARY_KEYS | {"scale"}] * 2
    assert set(m["per_identity"]) == {"grace", "eileen"}
    assert set(m["coupling"]) == {"adapter_scale", "dd", "pd"}
    assert set(m["coupling"]["dd"]) == DD_KEYS and set(m["coupling"]["pd"]) == PD_KEYS
    assert m["identity_model"]["same_as_conditioning"] is True  # only SFace is available offline
    assert m["num_samples"] == 2 * 1 * 2 * 2 and m["clip_model"] == str(inputs["clip"])
    assert m["coupling"]["dd"]["discrepancy"] > 0 and m["coupling"]["dd"]["source"] == "reference photos x prompts"

    # The aggregates agree with the per-sample table, recomputed here.
    rows = list(csv.DictReader((out / "samples.csv").open()))
    assert len(rows) == 8 and {r["identity"] for r in rows} == {"grace", "eileen"}
    for entry in m["per_scale"]:
        sel = [r for r in rows if float(r["scale"]) == entry["scale"]]
        assert entry["n"] == len(sel) == 4
        assert entry["clip_t"] == pytest.approx(np.mean([float(r["clip_t"]) for r in sel]))
        found = [float(r["identity_similarity"]) for r in sel if r["face_found"] == "True"]
        assert entry["face_not_found_rate"] == pytest.approx(1 - len(found) / 4)
        assert entry["identity_similarity"] == (pytest.approx(np.mean(found)) if found else None)

    assert Image.open(out / "grid_grace.png").size == (2 * 64, 64)  # 2 scales x 1 prompt
    assert Image.open(out / "tradeoff.png").format == "PNG"
    report = (out / "report.md").read_text()
    assert "| scale | identity similarity |" in report and "same as the conditioning recognizer" in report

    # Interrupted run (killed mid-write after 5 images): the rerun measures only the 3 missing ones
    # and keeps the 5 records it has.
    lines = (out / "samples.jsonl").read_text().splitlines()
    (out / "samples.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])
    assert main(_argv(inputs, out)) == 0
    redone = (out / "samples.jsonl").read_text().splitlines()
    assert redone[:5] == lines[:5] and len(redone) == 8  # the torn line is dropped, not glued to the next record
    keys = [json.loads(ln)["key"] for ln in redone[5:]]
    assert sorted(keys) == sorted(json.loads(ln)["key"] for ln in lines[5:])
    m2 = json.loads((out / "metrics.json").read_text())
    assert m2["num_samples"] == 8 and m2["coupling"] == m["coupling"]  # the diagnostics are deterministic

    # Other settings into the same folder: refused with a one-line message.
    capsys.readouterr()
    assert main(_argv(inputs, out, scales="0.5")) == 2
    err = capsys.readouterr().err
    assert "holds an evaluation with other settings" in err and "Traceback" not in err


def test_inputs_are_checked(tmp_path):
    (tmp_path / "faces" / "empty").mkdir(parents=True)
    with pytest.raises(GenerateError, match="no photos"):
        load_identities(tmp_path / "faces")
    with pytest.raises(GenerateError, match="does not exist"):
        load_prompts(tmp_path / "missing.txt")
    (tmp_path / "p.txt").write_text("# only a comment\n\n")
    with pytest.raises(GenerateError, match="holds no prompts"):
        load_prompts(tmp_path / "p.txt")


def test_missing_identity_model_is_a_one_line_error(inputs, tmp_path, capsys):
    argv = _argv(inputs, tmp_path / "run") + ["--id-model", "insightface", "--id-model-root", str(tmp_path / "none")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("accord-face evaluate: error: identity model 'insightface':") and "\n" not in err


def test_aggregate_counts_missing_faces_as_failures():
    recs = [{"identity": "a", "scale": 0.5, "face_found": True, "identity_similarity": 0.6, "clip_t": 30.0},
            {"identity": "a", "scale": 0.5, "face_found": False, "identity_similarity": None, "clip_t": 20.0},
            {"identity": "b", "scale": 1.0, "face_found": True, "identity_similarity": 0.2, "clip_t": 25.0},
            {"identity": "b", "scale": 1.0, "face_found": True, "identity_similarity": 0.4, "clip_t": 27.0}]
    agg = aggregate(recs, [1.0, 0.5], ["a", "b"])
    assert [r["scale"] for r in agg["per_scale"]] == [0.5, 1.0]
    assert agg["per_scale"][0] == {"scale": 0.5, "n": 2, "identity_similarity": 0.6, "face_not_found_rate": 0.5,
                                   "clip_t": 25.0}
    assert agg["overall"]["identity_similarity"] == pytest.approx(0.4)
    assert agg["overall"]["face_not_found_rate"] == 0.25 and agg["per_identity"]["b"]["clip_t"] == 26.0


def _crafted(id_sim: float, clip_t: float, dd: float | None) -> dict:
    summary = {"n": 4, "identity_similarity": id_sim, "face_not_found_rate": 0.25, "clip_t": clip_t}
    return {"schema_version": 1, "overall": summary, "clip_model": "clip", "identity_model": {"recognizer": "sface"},
            "per_scale": [{"scale": 0.5, **summary, "identity_similarity": id_sim / 2}, {"scale": 1.0, **summary}],
            "coupling": {"dd": {"discrepancy": dd} if dd is not None else {"skipped": "x"},
                         "pd": {"abs_gap": 0.1, "signed_gap": -0.1}}}


def test_compare_reports_the_right_deltas(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, data in [(a, _crafted(0.30, 25.0, 2.0)), (b, _crafted(0.42, 24.5, None))]:
        folder.mkdir()
        (folder / "metrics.json").write_text(json.dumps(data))
    rows = {r["metric"]: r for r in compare_metrics(_crafted(0.30, 25.0, 2.0), _crafted(0.42, 24.5, None))}
    assert rows["overall.identity_similarity"]["delta"] == pytest.approx(0.12)
    assert rows["overall.clip_t"]["delta"] == pytest.approx(-0.5)
    assert rows["scale=0.5.identity_similarity"]["delta"] == pytest.approx(0.06)
    assert rows["overall.face_not_found_rate"]["delta"] == 0
    assert rows["coupling.dd.discrepancy"]["a"] == 2.0 and rows["coupling.dd.discrepancy"]["delta"] is None

    assert main(["evaluate", "--compare", str(a), str(b)]) == 0
    table = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:5]]
             for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ") and "---" not in ln}
    assert table["overall.identity_similarity"] == ["0.3", "0.42", "+0.12"]
    assert table["scale=1.overall".replace(".overall", ".clip_t")] == ["25", "24.5", "-0.5"]
    assert table["coupling.dd.discrepancy"] == ["2", "n/a", "n/a"]

    # with --out: the same table in compare.md, and both trade-off curves in one plot
    assert main(["evaluate", "--compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "cmp" / "compare.md").read_text() in printed
    assert Image.open(tmp_path / "cmp" / "compare_tradeoff.png").format == "PNG"

    (b / "metrics.json").write_text(json.dumps({**_crafted(0.4, 24.0, 1.0), "schema_version": 99}))
    assert main(["evaluate", "--compare", str(a), str(b)]) == 2
    assert "schema_version 99" in capsys.readouterr().err
    assert not math.isnan(rows["overall.clip_t"]["b"])


def test_trained_adapter_generates_and_evaluates_on_held_out_shards(tiny_pipeline_dir, inputs, tmp_path):
    """The trainer's script -> OUTPUT/adapter -> `generate` and `evaluate --shards` (coupling on shards)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from shards_util import write_shards

    root = Path(__file__).resolve().parents[1]
    shards = write_shards(tmp_path / "shards", n_shards=1, per_shard=4)
    import socket

    with socket.socket() as sock:  # a free port for the single-process gloo group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "MASTER_PORT": str(port)}
    proc = subprocess.run(
        [sys.executable, str(root / "scripts" / "train_encoder.py"), "--config", str(root / "configs" / "tiny.yaml"),
         f"pretrained_model={tiny_pipeline_dir}", f"shards={shards}", f"output_dir={tmp_path / 'train'}",
         "max_steps=2", "train_batch_size=2", "data.shuffle_buffer=0", "checkpointing.checkpointing_steps=0",
         "checkpointing.checkpoints_total_limit=0", "validation.enabled=false", "logging.progress=false"],  # 0: save at the end only
        env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    adapter = tmp_path / "train" / "adapter"

    face = next((inputs["faces"] / "grace").glob("orig.jpg"))
    assert main(["generate", "--adapter", str(adapter), "--face", str(face), "--prompt", "a photo of a person",
                 "--steps", "2", "--out", str(tmp_path / "gen")]) == 0
    info = json.loads((tmp_path / "gen" / "generate.json").read_text())
    assert info["adapter_train_steps"] == 2 and info["base_model"] == tiny_pipeline_dir

    out = tmp_path / "eval"
    assert main(["evaluate", "--adapter", str(adapter), "--faces", str(inputs["faces"]), "--prompts",
                 str(inputs["prompts"]), "--scales", "1", "--steps", "2", "--clip-model", "none", "--shards",
                 str(shards), "--coupling-samples", "3", "--coupling-timesteps", "2", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["coupling"]["dd"]["source"] == f"shards:{shards}" and m["coupling"]["dd"]["num_samples"] == 3
    assert m["clip_model"] is None and m["overall"]["clip_t"] is None
