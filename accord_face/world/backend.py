"""The ``world`` face backend: the world's detector and recognizers on onnxruntime, behind ``FaceAnalyzer``.

``WorldAnalyzer(model_root, model_name)``: ``model_name`` "a" is the conditioning
recognizer (``world_a``, 128-d), "b" the independent evaluation recognizer (``world_b``,
96-d). ``model_root`` is a folder holding ``detector.onnx`` and ``recognizer_<name>.onnx``;
default: the cached world pipeline's ``face_models/`` (built from the committed assets).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..face import Face, FaceAnalyzer, ModelNotFoundError, _check_image, _ort_session, file_sha256, l2_normalize

DETECTOR_FILE = "detector.onnx"
DET_SIZE = 64


def recognizer_file(name: str) -> str:
    return f"recognizer_{name}.onnx"


def default_model_root() -> Path:
    from .assemble import face_models_dir

    return face_models_dir()


class WorldAnalyzer(FaceAnalyzer):
    backend = "world"

    def __init__(self, model_root: str | os.PathLike | None = None, model_name: str | None = None, *,
                 det_threshold: float = 0.5, threads: int | None = None, providers=None, **_: object):
        from .face_models import RECOGNIZERS

        name = model_name or "a"
        if name not in RECOGNIZERS:
            raise ModelNotFoundError(f"world recognizer {name!r} does not exist: use --model-name a (conditioning) "
                                     "or b (evaluation)")
        root = Path(model_root) if model_root else default_model_root()
        det, rec = root / DETECTOR_FILE, root / recognizer_file(name)
        for path in (det, rec):
            if not path.is_file():
                raise ModelNotFoundError(f"world face model {path} not found: build the world "
                                         "(python -m accord_face.world.build) or pass --model-root DIR")
        self._det = _ort_session(str(det), threads, providers)
        self._rec = _ort_session(str(rec), threads, providers)
        self.det_threshold = det_threshold
        self.recognizer_name = f"world_{name}"
        self.align_size = RECOGNIZERS[name].crop
        self.embedding_dim = int(self._rec.get_outputs()[0].shape[-1])
        self.model_files = {p.name: file_sha256(p) for p in (det, rec)}

    def describe(self) -> dict:
        return {**super().describe(), "model_name": self.recognizer_name.split("_", 1)[1]}

    def detect(self, image: np.ndarray) -> list[Face]:
        import cv2

        image = _check_image(image)
        h, w = image.shape[:2]
        small = image if (h, w) == (DET_SIZE, DET_SIZE) else cv2.resize(image, (DET_SIZE, DET_SIZE),
                                                                         interpolation=cv2.INTER_AREA)
        x = small.astype(np.float32).transpose(2, 0, 1)[None] / 127.5 - 1.0
        out = self._det.run(None, {"input": x})[0][0]                       # (11,)
        score = float(1.0 / (1.0 + np.exp(-out[10])))
        if score < self.det_threshold:
            return []
        lm = out[:10].reshape(5, 2) * np.array([w, h], np.float32)
        # The box: the crop window mapped back into the image (head and hair).
        from .face_models import world_template
        from ..face import similarity_transform

        size = 64
        m = similarity_transform(world_template(size), lm.astype(np.float64))   # crop -> image
        corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64) @ m.T
        x1, y1 = corners.min(0)
        x2, y2 = corners.max(0)
        return [Face(bbox=np.array([x1, y1, x2, y2], np.float32), landmarks=lm.astype(np.float32), score=score)]

    def align(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        from .face_models import align_world

        return align_world(image, landmarks, self.align_size)

    def embed_aligned(self, crop: np.ndarray) -> np.ndarray:
        return self.embed_aligned_batch([crop])[0]

    def embed_aligned_batch(self, crops: list[np.ndarray]) -> np.ndarray:
        if not len(crops):
            return np.zeros((0, self.embedding_dim), np.float32)
        for c in crops:
            if _check_image(c).shape[:2] != (self.align_size, self.align_size):
                raise ValueError(f"{self.recognizer_name} wants {self.align_size}px aligned crops, got {c.shape}")
        x = np.stack(crops).astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
        return l2_normalize(self._rec.run(None, {"input": x})[0])
