"""Shard preparation records identity groups (person_id) and stores what FaceID-Plus needs for its face crop."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from accord_face.face import identity_similarity, load_face_analyzer
from accord_face.family.clip_image import face_crop_from_sample
from data_pipelines.embedded import write_embedded_photos
from data_pipelines.prepare import MANIFEST_FORMAT, PrepareConfig, prepare_shards
from data_pipelines.sources import iter_folder, tag_person


@pytest.fixture(scope="module")
def people(tmp_path_factory) -> Path:
    """personA/ holds Grace Hopper twice (one mirrored), personB/ Eileen Collins; metadata names one more."""
    from PIL import Image, ImageOps

    src = write_embedded_photos(tmp_path_factory.mktemp("src"), variants=False)
    root = tmp_path_factory.mktemp("people")
    (root / "personA").mkdir()
    (root / "personB").mkdir()
    shutil.copy(src / "grace_hopper_orig.jpg", root / "personA" / "a1.jpg")
    ImageOps.mirror(Image.open(src / "grace_hopper_orig.jpg")).save(root / "personA" / "a2.jpg")
    shutil.copy(src / "eileen_collins_orig.jpg", root / "personB" / "b1.jpg")
    return root


def test_iter_folder_person_labels(people, tmp_path):
    by_folder = {i.source: i.person_id for i in iter_folder(people, person_from="folder")}
    assert by_folder == {"personA/a1.jpg": "personA", "personA/a2.jpg": "personA", "personB/b1.jpg": "personB"}
    assert all(i.person_id is None for i in iter_folder(people, person_from="none"))
    (people / "personB" / "metadata.jsonl").write_text(json.dumps({"file_name": "b1.jpg", "caption": "x",
                                                                   "person_id": "collins"}) + "\n")
    try:
        by_meta = {i.source: i.person_id for i in iter_folder(people)}
    finally:
        (people / "personB" / "metadata.jsonl").unlink()
    assert by_meta == {"personA/a1.jpg": None, "personA/a2.jpg": None, "personB/b1.jpg": "collins"}
    with pytest.raises(ValueError, match="person_from"):
        list(iter_folder(people, person_from="faces"))
    sample = {"json": json.dumps({"score": 1.0}).encode()}
    assert json.loads(tag_person(sample, "p7")["json"]) == {"score": 1.0, "person_id": "p7"}


def test_prepare_records_person_id_and_the_face_crop_reembeds(people, tmp_path):
    out = tmp_path / "shards"
    summary = prepare_shards(PrepareConfig(input=str(people), output=str(out), resolution=256, shard_size=8,
                                           progress=False, person_from="folder"))
    assert summary["num_samples"] == 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == MANIFEST_FORMAT == "accord-face-shards/2"
    samples = list(wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False))
    metas = [json.loads(s["json"]) for s in samples]
    assert sorted(m["person_id"] for m in metas) == ["personA", "personA", "personB"]
    # The aligned crop computed from the stored jpg + landmarks + crop_box is the recognizer's own crop:
    # embedding it again gives (nearly) the stored embedding.
    analyzer = load_face_analyzer("opencv-zoo")
    for s, meta in zip(samples, metas):
        crop = face_crop_from_sample(s["jpg"], meta, 112).permute(1, 2, 0).numpy()
        again = analyzer.embed_aligned(np.ascontiguousarray(crop))
        stored = np.load(__import__("io").BytesIO(s["sface.npy"]))
        assert identity_similarity(again, stored) > 0.8, meta["source"]
