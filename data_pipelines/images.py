"""Per-image work: decode safely, find the face, embed it, crop the training image.

``process_item`` is a pure function of (bytes, settings, analyzer): it returns
either a shard sample or a ``Skip`` with a reason code from ``REASONS``.
Bad input never raises out of it; only a broken analyzer would.
"""

from __future__ import annotations

import io
import json
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from accord_face.face import FaceAnalyzer

# Every reason a photo can be rejected; skipped.jsonl uses these codes.
REASONS = {
    "unreadable": "the file could not be read (permissions, I/O error)",
    "empty_file": "the file has zero bytes",
    "not_an_image": "the bytes are not an image format PIL knows (wrong extension?)",
    "corrupt_image": "the image data is truncated or corrupt",
    "too_large": "more pixels than --max-pixels (decompression-bomb guard)",
    "too_small": "shorter side below --min-image-size",
    "no_face": "no face found above --min-score",
    "multiple_faces": "more than one face (use --multi-face largest to keep the largest)",
    "face_too_small": "face box area / image area below --min-face",
    "missing_caption": "no caption and --require-caption is set",
    "unreadable_shard": "an input shard could not be read",
    "no_image_member": "an input shard sample has no image member",
    "analysis_error": "face detection / recognition raised on this image (detail has the error)",
}

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
TEMPLATE_CAPTION = "a photo of a person"


@dataclass
class Skip:
    reason: str
    detail: str = ""


@dataclass
class ProcessSettings:
    """The per-image knobs (a plain, picklable copy of the relevant config fields)."""

    resolution: int = 512
    context_scale: float = 2.0
    min_face: float = 0.01
    min_image_size: int = 64
    max_pixels: int = 64_000_000
    multi_face: str = "skip"  # "skip" | "largest"
    require_caption: bool = False
    template_caption: str = TEMPLATE_CAPTION
    jpeg_quality: int = 95


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit scaled (not clipped), alpha composited on white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    return im.convert("RGB") if im.mode != "RGB" else im


def decode_image(data: bytes, max_pixels: int) -> Image.Image | Skip:
    """Bytes -> EXIF-upright RGB image, or a Skip (never raises on bad bytes)."""
    if not data:
        return Skip("empty_file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            # Check the header's size before decoding a single pixel.
            if w * h > max_pixels:
                return Skip("too_large", f"{w}x{h} > {max_pixels} pixels")
            im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return Skip("too_large", str(err)[:200])
    except UnidentifiedImageError as err:
        return Skip("not_an_image", str(err)[:200])
    except Exception as err:  # truncated / corrupt streams raise OSError, SyntaxError, ValueError...
        return Skip("corrupt_image", f"{type(err).__name__}: {str(err)[:200]}")
    try:
        im = ImageOps.exif_transpose(im)
        return to_rgb(im)
    except Exception as err:
        return Skip("corrupt_image", f"{type(err).__name__}: {str(err)[:200]}")


def square_crop_box(bbox: np.ndarray, width: int, height: int, context_scale: float) -> tuple[int, int, int, int]:
    """A square around the face centre, side = context_scale * max(face w, face h), shifted (then
    shrunk) to stay inside the image.  Returns integer (left, top, right, bottom)."""
    x1, y1, x2, y2 = [float(v) for v in bbox]
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    side = min(max(x2 - x1, y2 - y1) * context_scale, width, height)
    side = max(1, int(round(side)))
    left = int(round(min(max(cx - side / 2, 0), width - side)))
    top = int(round(min(max(cy - side / 2, 0), height - side)))
    return left, top, left + side, top + side


@dataclass
class _Detected:
    """An image past decoding, detection and the filters, waiting for its face embedding."""

    im: Image.Image
    rgb: np.ndarray  # (H, W, 3) uint8
    faces: list
    fraction: float
    caption: str
    source: str
    key: str
    times: dict[str, float]


def _detect(data: bytes, caption: str | None, source: str, key: str, settings: ProcessSettings,
            analyzer: FaceAnalyzer) -> tuple[_Detected | Skip, dict[str, float]]:
    """Decode, detect and filter one photo (the part of the work done image by image); + timings."""
    times = {"decode": 0.0, "model": 0.0, "crop_encode": 0.0}
    t0 = time.perf_counter()
    caption = caption.strip() if caption else ""
    if not caption and settings.require_caption:
        return Skip("missing_caption"), times
    im = decode_image(data, settings.max_pixels)
    times["decode"] = time.perf_counter() - t0
    if isinstance(im, Skip):
        return im, times
    w, h = im.size
    if min(w, h) < settings.min_image_size:
        return Skip("too_small", f"{w}x{h} < {settings.min_image_size}"), times
    rgb = np.asarray(im)  # (H, W, 3) uint8
    t1 = time.perf_counter()
    times["decode"] = t1 - t0

    faces = analyzer.analyze(rgb, max_faces=0)  # detect only; the chosen faces are embedded as one batch
    times["model"] = time.perf_counter() - t1
    if not faces:
        return Skip("no_face"), times
    if len(faces) > 1 and settings.multi_face == "skip":
        return Skip("multiple_faces", f"{len(faces)} faces"), times
    face = faces[0]  # largest
    fraction = face.area / float(w * h)
    if fraction < settings.min_face:
        return Skip("face_too_small", f"face fraction {fraction:.4f} < {settings.min_face}"), times
    return _Detected(im, rgb, faces, fraction, caption, source, key, times), times


def _finish(d: _Detected, settings: ProcessSettings, analyzer: FaceAnalyzer) -> dict[str, Any]:
    """Crop, resize and encode the training image of a detected, embedded photo."""
    t3 = time.perf_counter()
    im, face, faces, caption, fraction = d.im, d.faces[0], d.faces, d.caption, d.fraction
    w, h = im.size
    box = square_crop_box(face.bbox, w, h, settings.context_scale)
    crop = im.crop(box).resize((settings.resolution, settings.resolution), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    crop.save(buf, format="JPEG", quality=settings.jpeg_quality)
    meta = {
        "bbox": [round(float(v), 2) for v in face.bbox],
        "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in face.landmarks],
        "score": round(float(face.score), 4),
        "face_fraction": round(fraction, 5),
        "num_faces": len(faces),
        "source": d.source,
        "recognizer": analyzer.recognizer_name,
        "embedding_dim": int(face.embedding.shape[0]),
        "original_size": [w, h],
        "crop_box": list(box),
        "caption_is_template": not caption,
    }
    sample = {
        "__key__": d.key,
        "jpg": buf.getvalue(),
        "txt": (caption or settings.template_caption).encode("utf-8"),
        f"{analyzer.recognizer_name}.npy": np.asarray(face.embedding, dtype=np.float32),
        "json": json.dumps(meta).encode("utf-8"),
    }
    d.times["crop_encode"] = time.perf_counter() - t3
    return sample


def process_batch(entries: list[tuple[bytes, str | None, str, str]], settings: ProcessSettings,
                  analyzer: FaceAnalyzer) -> list[tuple[dict[str, Any] | Skip, dict[str, float]]]:
    """(bytes, caption, source, key) per photo -> (shard sample or Skip, timings by stage) per photo.

    Detection runs image by image; the aligned crops of every photo that passed the filters
    then go through the recognizer as ONE batch (``analyzer.embed_aligned_batch``), whose
    time is shared equally among them. Same samples as one photo at a time.
    """
    detected, times = zip(*[_detect(*entry, settings, analyzer) for entry in entries]) if entries else ((), ())
    todo = [d for d in detected if isinstance(d, _Detected) and d.faces[0].embedding is None]
    if todo:
        t0 = time.perf_counter()
        crops = [analyzer.align(d.rgb, d.faces[0].landmarks) for d in todo]
        for d, emb in zip(todo, analyzer.embed_aligned_batch(crops)):  # (B, D)
            d.faces[0].embedding = emb
        share = (time.perf_counter() - t0) / len(todo)
        for d in todo:
            d.times["model"] += share
    return [(d, t) if isinstance(d, Skip) else (_finish(d, settings, analyzer), t) for d, t in zip(detected, times)]


def process_item(data: bytes, caption: str | None, source: str, key: str, settings: ProcessSettings,
                 analyzer: FaceAnalyzer) -> tuple[dict[str, Any] | Skip, dict[str, float]]:
    """One input photo -> (shard sample or Skip, timings in seconds by stage)."""
    return process_batch([(data, caption, source, key)], settings, analyzer)[0]
