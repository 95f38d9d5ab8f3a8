"""Shard preparation end to end: bad inputs, resume after SIGKILL, shard inputs, read-back."""

from __future__ import annotations

import collections
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from accord_face.data import build_dataset
from data_pipelines.embedded import write_embedded_photos
from data_pipelines.journal import JOURNAL, SettingsMismatch
from data_pipelines.prepare import PrepareConfig, prepare_shards
from test_face_helpers import astronaut, cameraman, grace_hopper

ROOT = Path(__file__).resolve().parents[1]


def _config(inp, out, **kw) -> PrepareConfig:
    base = dict(input=str(inp), output=str(out), resolution=64, shard_size=3, progress=False)
    base.update(kw)
    return PrepareConfig(**base)


def _read_back(out: Path) -> list[dict]:
    """All samples of all shards, decoded by webdataset itself."""
    urls = sorted(str(p) for p in out.glob("*.tar"))
    ds = wds.WebDataset(urls, shardshuffle=False).decode("rgb8")
    return list(ds)


def _png_bomb(path: Path, side: int = 50_000) -> None:
    """A valid PNG header claiming side x side pixels (2.5 G) with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory) -> tuple[Path, set[str], dict[str, str]]:
    """Good photos in awkward formats + one bad file of every kind. Returns (folder, good, bad->reason)."""
    d = tmp_path_factory.mktemp("messy")
    hopper, collins, camera = grace_hopper(), astronaut(), cameraman()
    Image.fromarray(hopper).save(d / "hopper.jpg")
    (d / "hopper.txt").write_text("a portrait of Grace Hopper\n")
    Image.fromarray(collins).save(d / "collins.png")
    (d / "metadata.jsonl").write_text(json.dumps({"file_name": "collins.png", "caption": "an astronaut"}) + "\n"
                                      + "not json\n")
    sub = d / "sub"
    sub.mkdir()
    Image.fromarray(camera[..., 0], "L").save(sub / "gray.png")  # grayscale, no caption
    rotated = Image.fromarray(hopper).transpose(Image.Transpose.ROTATE_90)  # stored sideways...
    exif = Image.Exif()
    exif[0x0112] = 6  # ...with "rotate 90 CW to display"
    rotated.save(d / "exif_rotated.jpg", exif=exif)
    Image.fromarray(collins).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray((camera[..., 0].astype(np.uint16) * 257)).save(d / "sixteen_bit.png")
    rgba = Image.fromarray(hopper).convert("RGBA")
    rgba.putalpha(200)
    rgba.save(d / "alpha.png")
    good = {"hopper.jpg", "collins.png", "sub/gray.png", "exif_rotated.jpg", "cmyk.jpg", "sixteen_bit.png",
            "alpha.png"}

    data = (d / "hopper.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (d / "not_really.jpg").write_text("this is a text file with an image extension")
    (d / "empty.png").write_bytes(b"")
    Image.new("RGB", (1, 1)).save(d / "one_pixel.png")
    _png_bomb(d / "bomb.png")
    os.symlink(d / "does_not_exist.jpg", d / "dangling.jpg")
    import skimage.data
    Image.fromarray(skimage.data.coffee()).save(d / "coffee.jpg")
    two = np.zeros((600, 1100, 3), np.uint8)
    two[:, :512], two[:512, 560:1072] = hopper[:600], collins
    Image.fromarray(two).save(d / "two_people.jpg")
    (d / "two_people.txt").write_text("two people")
    small = np.full((1400, 1400, 3), 90, np.uint8)
    small[700:1000, 700:956] = np.asarray(Image.fromarray(hopper).resize((256, 300)))
    Image.fromarray(small).save(d / "small_face.jpg")
    (d / "notes.md").write_text("ignored: not an image extension")
    bad = {"truncated.jpg": "corrupt_image", "not_really.jpg": "not_an_image", "empty.png": "empty_file",
           "one_pixel.png": "too_small", "bomb.png": "too_large", "dangling.jpg": "unreadable",
           "coffee.jpg": "no_face", "two_people.jpg": "multiple_faces", "small_face.jpg": "face_too_small"}
    return d, good, bad


def test_messy_folder_keeps_exactly_the_good_photos(messy_folder, tmp_path):
    folder, good, bad = messy_folder
    out = tmp_path / "out"
    summary = prepare_shards(_config(folder, out))
    assert summary["num_samples"] == len(good)

    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert {s["source"]: s["reason"] for s in skipped} == bad

    samples = _read_back(out)
    by_source = {json.loads(json.dumps(s["json"]))["source"]: s for s in samples}
    assert len(samples) == len(by_source) == len(good) and set(by_source) == good
    for source, s in by_source.items():
        assert s["jpg"].shape == (64, 64, 3) and s["jpg"].dtype == np.uint8
        emb = s["sface.npy"]
        assert emb.shape == (128,) and emb.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(emb), 1.0, atol=1e-5)
        meta = s["json"]
        assert meta["num_faces"] == 1 and meta["recognizer"] == "sface" and meta["embedding_dim"] == 128
        assert "." not in s["__key__"]
    assert by_source["hopper.jpg"]["txt"] == "a portrait of Grace Hopper"
    assert by_source["collins.png"]["txt"] == "an astronaut"
    assert by_source["sub/gray.png"]["txt"] == "a photo of a person"
    assert by_source["sub/gray.png"]["json"]["caption_is_template"] is True
    assert by_source["hopper.jpg"]["json"]["caption_is_template"] is False
    # EXIF-rotated: analysed upright (same size and face box as the plain photo).
    rot, plain = by_source["exif_rotated.jpg"]["json"], by_source["hopper.jpg"]["json"]
    assert rot["original_size"] == plain["original_size"] == [512, 600]
    np.testing.assert_allclose(rot["bbox"], plain["bbox"], atol=4)
    # 16-bit was scaled, not clipped to white.
    assert by_source["sixteen_bit.png"]["jpg"].mean() < 200

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == len(good) and manifest["embedding_key"] == "sface.npy"
    assert manifest["embedding_dim"] == 128 and manifest["recognizer"]["name"] == "sface"
    assert manifest["skipped_by_reason"] == dict(collections.Counter(bad.values()))
    import hashlib
    for shard in manifest["shards"]:
        assert hashlib.sha256((out / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
    assert sum(s["samples"] for s in manifest["shards"]) == len(good)

    # The training reader gets the same samples, at its own resolution.
    batch = list(build_dataset(str(out), resolution=32, shuffle_buffer=1))
    assert sorted(b["meta"]["source"] for b in batch) == sorted(good)
    assert batch[0]["pixel_values"].shape == (3, 32, 32) and batch[0]["face_embedding"].shape == (128,)

    # Rerun: nothing left to do, same shards.
    again = prepare_shards(_config(folder, out))
    assert again["processed_now"] == 0 and again["num_samples"] == len(good)


def test_keep_largest_face_and_require_caption(messy_folder, tmp_path):
    folder, good, bad = messy_folder
    summary = prepare_shards(_config(folder, tmp_path / "o", multi_face="largest", require_caption=True))
    skipped = {json.loads(x)["source"]: json.loads(x)["reason"]
               for x in (tmp_path / "o" / "skipped.jsonl").read_text().splitlines()}
    assert "two_people.jpg" not in skipped and skipped["sub/gray.png"] == "missing_caption"
    assert summary["num_samples"] == 3  # hopper, collins (captioned) + the largest of two people


def _group_alive(pgid: int) -> bool:
    """Any live (non-zombie) process left in process group ``pgid``?"""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_bytes().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != b"Z":  # fields: state, ppid, pgrp, ...
            return True
    return False


def _journal_shard_lines(out: Path) -> int:
    try:
        return (out / JOURNAL).read_text().count('"shard": {')
    except FileNotFoundError:
        return 0


def test_sigkill_then_rerun_keeps_each_input_once(tmp_path):
    photos = write_embedded_photos(tmp_path / "in")
    for i, p in enumerate(sorted(photos.glob("*.jpg"))):  # 24 inputs
        (photos / f"copy{i:02d}.jpg").write_bytes(p.read_bytes())
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "scripts" / "prepare_shards.py"), "--input", str(photos),
           "--output", str(out), "--shard-size", "2", "--resolution", "64", "--no-progress",
           "--batch-size", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # One worker process, in a session of its own so that we can see it go away.
    proc = subprocess.Popen(cmd + ["--workers", "1"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while _journal_shard_lines(out) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # the main process only, as the OOM killer would
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
        done_before = _journal_shard_lines(out)
        assert 2 <= done_before < 12
        # The orphaned worker (and forkserver) notice and exit on their own.
        deadline = time.monotonic() + 30
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _group_alive(proc.pid), "worker processes outlived the killed main process"
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "done before" in rerun.stdout
    sources = [s["json"]["source"] for s in _read_back(out)]
    expected = sorted(p.name for p in photos.glob("*.jpg"))
    assert sorted(sources) == expected  # every input exactly once
    assert not list(out.glob(".*.tmp"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 24 and len(manifest["shards"]) == 12


def test_crash_between_rename_and_journal_and_torn_line(tmp_path):
    photos = write_embedded_photos(tmp_path / "in", variants=False)
    for p in sorted(photos.glob("*.jpg")):
        (photos / f"b_{p.name}").write_bytes(p.read_bytes())
    out = tmp_path / "out"
    cfg = _config(photos, out, shard_size=2)
    prepare_shards(cfg)
    lines = (out / JOURNAL).read_text().splitlines(keepends=True)
    # Forget the last shard's commit (as if killed after its rename) and tear a line.
    last = max(i for i, line in enumerate(lines) if '"shard": {' in line)
    (out / JOURNAL).write_text("".join(lines[:last]) + '{"shard": {"name": "fa')
    summary = prepare_shards(cfg)
    assert summary["processed_now"] >= 1
    sources = [s["json"]["source"] for s in _read_back(out)]
    assert sorted(sources) == sorted(p.name for p in photos.glob("*.jpg"))


def test_changed_settings_refuse_to_resume(tmp_path):
    photos = write_embedded_photos(tmp_path / "in", variants=False)
    prepare_shards(_config(photos, tmp_path / "out"))
    with pytest.raises(SettingsMismatch, match="resolution"):
        prepare_shards(_config(photos, tmp_path / "out", resolution=128))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "faces-000000.tar").write_bytes(b"someone else's shard")
    with pytest.raises(SettingsMismatch, match="already holds faces-000000.tar"):
        prepare_shards(_config(photos, tmp_path / "other"))
    assert (tmp_path / "other" / "faces-000000.tar").read_bytes() == b"someone else's shard"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_shards.py"), "--input", str(photos),
                          "--output", str(tmp_path / "out"), "--min-face", "2"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert res.returncode == 2 and "min_face" in res.stderr


def test_shard_input_img2dataset_layout_and_workers(tmp_path):
    photos = write_embedded_photos(tmp_path / "in", variants=False)
    src = tmp_path / "src"
    src.mkdir()
    with wds.TarWriter(str(src / "00000.tar")) as tw:
        for i, p in enumerate(sorted(photos.glob("*.jpg"))):
            tw.write({"__key__": f"{i:09d}", "jpg": p.read_bytes(), "txt": f"caption {i}",
                      "json": {"url": f"http://example/{i}"}})
        tw.write({"__key__": "000000099", "txt": "no image here"})
    (src / "00001.tar").write_bytes(b"garbage, not a tar" * 50)
    out = tmp_path / "out"
    summary = prepare_shards(_config(str(src), out, workers=2))
    assert summary["num_samples"] == 3
    skipped = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert sorted(s["reason"] for s in skipped) == ["no_image_member", "unreadable_shard"]
    samples = _read_back(out)
    assert sorted(s["txt"] for s in samples) == ["caption 0", "caption 1", "caption 2"]
    assert all(s["json"]["source"].startswith("00000.tar:") for s in samples)
    # Same content as the in-process path (workers change nothing but speed).
    prepare_shards(_config(str(src), tmp_path / "out0", workers=0))
    key = lambda s: s["__key__"]  # noqa: E731
    for a, b in zip(sorted(samples, key=key), sorted(_read_back(tmp_path / "out0"), key=key)):
        assert a["__key__"] == b["__key__"]
        np.testing.assert_array_equal(a["sface.npy"], b["sface.npy"])


def test_insightface_pack_writes_arcface_embeddings(tmp_path):
    from test_face_helpers import export_tiny_pack

    export_tiny_pack(tmp_path / "ifroot", "tiny_pack", dim=512)
    photos = write_embedded_photos(tmp_path / "in", variants=False)
    out = tmp_path / "out"
    prepare_shards(_config(photos, out, backend="insightface", model_root=str(tmp_path / "ifroot"),
                           model_name="tiny_pack", min_face=0.0))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["embedding_key"] == "arcface.npy" and manifest["embedding_dim"] == 512
    assert manifest["recognizer"]["backend"] == "insightface" and manifest["num_samples"] == 3
    samples = _read_back(out)
    assert all(s["arcface.npy"].shape == (512,) and s["json"]["recognizer"] == "arcface" for s in samples)
    got = list(build_dataset(str(out), resolution=32))  # embedding key taken from the manifest
    assert {tuple(g["face_embedding"].shape) for g in got} == {(512,)}
    with pytest.raises(Exception, match="not found"):
        prepare_shards(_config(photos, tmp_path / "o2", backend="insightface", model_root=str(tmp_path / "none")))


def test_analyzer_errors_skip_one_photo_but_stop_a_broken_model(tmp_path, monkeypatch):
    import data_pipelines.prepare as prep
    from accord_face.face import FaceAnalyzer, load_face_analyzer

    real = load_face_analyzer("opencv-zoo")

    class Flaky(FaceAnalyzer):  # raises on the grayscale cameraman only (R == G == B), like an OpenCV error
        def __init__(self, broken):
            self.broken = broken
            self.recognizer_name, self.embedding_dim, self.align_size = "sface", 128, 112

        def analyze(self, image, max_faces=None):
            if self.broken or (image[..., 0] == image[..., 1]).all():
                raise RuntimeError("cv2.error: simulated")
            return real.analyze(image, max_faces=max_faces)

        def embed_aligned(self, crop):
            return real.embed_aligned(crop)

        def describe(self):
            return real.describe()

    photos = write_embedded_photos(tmp_path / "in", variants=False)
    monkeypatch.setattr(prep, "make_analyzer", lambda cfg, threads: Flaky(broken=False))
    summary = prepare_shards(_config(photos, tmp_path / "out"))
    assert summary["num_samples"] == 2 and summary["skipped_now"] == {"analysis_error": 1}
    skipped = json.loads((tmp_path / "out" / "skipped.jsonl").read_text())
    assert skipped["source"] == "cameraman_orig.jpg" and "simulated" in skipped["detail"]

    monkeypatch.setattr(prep, "make_analyzer", lambda cfg, threads: Flaky(broken=True))
    monkeypatch.setattr(prep, "MAX_CONSECUTIVE_FAILURES", 3)
    with pytest.raises(prep.AnalysisFailure, match="3 inputs in a row"):
        prepare_shards(_config(photos, tmp_path / "out2"))


def shard_digests(out: Path) -> set[tuple[str, tuple]]:
    """{(key, ((member, sha256), ...))} over every tar in ``out``, read with tarfile (not webdataset)."""
    import hashlib
    import tarfile

    groups: dict[str, dict[str, str]] = collections.defaultdict(dict)
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                assert ext not in groups[key], f"{key}.{ext} twice"
                groups[key][ext] = hashlib.sha256(tar.extractfile(m).read()).hexdigest()
    return {(k, tuple(sorted(v.items()))) for k, v in groups.items()}


def skip_reasons(out: Path) -> dict[str, int]:
    """Skipped inputs by reason (from skipped.jsonl) and how many distinct sources they are."""
    rows = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    return {"sources": len({r["source"] for r in rows}), **collections.Counter(r["reason"] for r in rows)}


def test_batched_recognition_writes_the_same_samples(messy_folder, tmp_path):
    folder, good, bad = messy_folder
    one = prepare_shards(_config(folder, tmp_path / "b1", batch_size=1))
    many = prepare_shards(_config(folder, tmp_path / "b5", batch_size=5))
    assert one["num_samples"] == many["num_samples"] == len(good)
    a, b = shard_digests(tmp_path / "b1"), shard_digests(tmp_path / "b5")
    assert len(a) == len(good) and a == b
    assert skip_reasons(tmp_path / "b1") == skip_reasons(tmp_path / "b5") == {"sources": len(bad),
                                                                              **collections.Counter(bad.values())}
