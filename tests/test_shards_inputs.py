"""Inputs at scale: img2dataset output (tar + parquet metadata, or parquet with the images) read in place,
through fsspec urls (``file://`` here; ``s3://`` / ``gs://`` use the same code with their drivers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import webdataset as wds

from data_pipelines.embedded import write_embedded_photos
from data_pipelines.prepare import PrepareConfig, prepare_shards
from data_pipelines.remote import expand_inputs
from test_shards import _read_back, shard_digests, skip_reasons

pq = pytest.importorskip("pyarrow.parquet", reason="parquet inputs need pyarrow: pip install -e '.[parquet]'")
pa = pytest.importorskip("pyarrow")


def _config(inp, out, **kw) -> PrepareConfig:
    return PrepareConfig(input=str(inp), output=str(out), resolution=64, shard_size=2, progress=False, **kw)


@pytest.fixture(scope="module")
def img2dataset_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """(webdataset-format folder: 2 tars, the first with its parquet; parquet-format folder: 1 parquet)."""
    root = tmp_path_factory.mktemp("i2d")
    jpgs = sorted(write_embedded_photos(root / "photos", variants=False).glob("*.jpg"))  # 3 portraits
    wdsdir, pqdir = root / "wds", root / "pq"
    wdsdir.mkdir(), pqdir.mkdir()
    with wds.TarWriter(str(wdsdir / "00000.tar")) as tw:
        tw.write({"__key__": "000000000", "jpg": jpgs[0].read_bytes(), "txt": "caption in the tar",
                  "json": {"url": "http://example/0.jpg", "key": "000000000"}})
        tw.write({"__key__": "000000001", "jpg": jpgs[1].read_bytes(), "json": {"key": "000000001"}})  # no txt
    pq.write_table(pa.table({"key": ["000000000", "000000001", "000000002"],
                             "url": ["http://example/0.jpg", "http://example/1.jpg", "http://example/2.jpg"],
                             "caption": ["caption in the parquet 0", "caption in the parquet 1", "never fetched"],
                             "status": ["success", "success", "failed_to_download"]}), wdsdir / "00000.parquet")
    with wds.TarWriter(str(wdsdir / "00001.tar")) as tw:
        tw.write({"__key__": "000010000", "jpg": jpgs[2].read_bytes(), "txt": "third"})
    pq.write_table(pa.table({"key": ["000000000", "000000001", "000000002"],
                             "jpg": [jpgs[0].read_bytes(), None, jpgs[2].read_bytes()],
                             "txt": ["zero", None, "two"], "url": ["u0", "u1", "u2"],
                             "status": ["success", "failed_to_download", "success"]}), pqdir / "00000.parquet")
    return wdsdir, pqdir


def test_expand_inputs_treats_a_same_stem_parquet_as_metadata(img2dataset_dirs):
    wdsdir, pqdir = img2dataset_dirs
    assert [Path(u).name for u in expand_inputs(str(wdsdir))] == ["00000.tar", "00001.tar"]
    assert expand_inputs(f"file://{wdsdir}/{{00000..00001}}.tar") == [f"file://{wdsdir}/00000.tar",
                                                                     f"file://{wdsdir}/00001.tar"]
    assert [Path(u).name for u in expand_inputs(f"file://{pqdir}/*.parquet")] == ["00000.parquet"]
    with pytest.raises(FileNotFoundError, match="no input shards"):
        expand_inputs(f"file://{wdsdir}/nothing-*.tar")


def test_img2dataset_webdataset_output_through_a_file_url(img2dataset_dirs, tmp_path):
    wdsdir, _ = img2dataset_dirs
    summary = prepare_shards(_config(f"file://{wdsdir}/{{00000..00001}}.tar", tmp_path / "url"))
    assert summary["num_samples"] == 3 and summary["num_skipped"] == 0
    got = {s["json"]["source"]: s for s in _read_back(tmp_path / "url")}
    assert set(got) == {"00000.tar:000000000", "00000.tar:000000001", "00001.tar:000010000"}
    assert got["00000.tar:000000000"]["txt"] == "caption in the tar"  # the tar's own txt wins
    assert got["00000.tar:000000001"]["txt"] == "caption in the parquet 1"  # no txt: parquet caption
    assert got["00000.tar:000000001"]["json"]["caption_is_template"] is False
    assert got["00000.tar:000000001"]["json"]["url"] == "http://example/1.jpg"
    assert "url" not in got["00001.tar:000010000"]["json"]  # no parquet, no json url
    # The plain folder path reads the same shards: identical samples.
    prepare_shards(_config(wdsdir, tmp_path / "plain"))
    assert shard_digests(tmp_path / "url") == shard_digests(tmp_path / "plain")


def test_img2dataset_parquet_output_with_the_images_inside(img2dataset_dirs, tmp_path):
    _, pqdir = img2dataset_dirs
    summary = prepare_shards(_config(f"file://{pqdir}", tmp_path / "out"))
    assert summary["num_samples"] == 2
    got = {s["json"]["source"]: s for s in _read_back(tmp_path / "out")}
    assert {k: v["txt"] for k, v in got.items()} == {"00000.parquet:000000000": "zero",
                                                    "00000.parquet:000000002": "two"}
    assert got["00000.parquet:000000002"]["json"]["url"] == "u2"
    assert skip_reasons(tmp_path / "out") == {"sources": 1, "no_image_member": 1}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["skipped_by_reason"] == {"no_image_member": 1}
