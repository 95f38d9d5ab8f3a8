"""Zero-shot generation with an exported identity adapter on a stock diffusers pipeline.

The adapter folder (written by the trainer) holds ``ip_adapter.safetensors`` in
diffusers' IP-Adapter FaceID layout and ``adapter_config.json`` recording the
base model and the face recognizer it was trained with. Generation is plain
diffusers: ``pipe.load_ip_adapter(folder, subfolder="", weight_name=...,
image_encoder_folder=None)`` and ``pipe(..., ip_adapter_image_embeds=[...])``
with a zero identity embedding as the classifier-free-guidance negative
(the "dropped identity" the trainer uses).

``FaceIDGenerator`` is the reusable piece (``evaluate`` drives it too);
``run_generate(GenerateConfig)`` is what ``accord-face generate`` wraps.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .adapter import CONFIG_NAME, WEIGHT_NAME, identity_image_embeds, load_adapter_config
from .config import field, to_dict

log = logging.getLogger(__name__)

# Which face backend computes a recognizer's embeddings, when the adapter does not record it.
RECOGNIZER_BACKENDS = {"sface": "opencv-zoo", "arcface": "insightface"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class GenerateError(RuntimeError):
    """A user-facing problem (missing file, no face, mismatched models); the CLI prints it in one line."""


# ----------------------------------------------------------------------------- config


@dataclass
class GenerateConfig:
    """Settings of one ``accord-face generate`` run (all recorded in generate.json)."""

    adapter: Optional[str] = field(None, help="exported identity adapter folder (OUTPUT/adapter: "
                                              "ip_adapter.safetensors + adapter_config.json)")
    lora: Optional[str] = field(None, help="exported LoRA folder (the LoRA trainer's OUTPUT/lora), alone or with "
                                           "an adapter")
    lora_scale: float = field(1.0, help="LoRA strength (0 = the base model); also the adapter's identity LoRA "
                                        "(pytorch_lora_weights.safetensors in the adapter folder)")
    faces: list[str] = field(default_factory=list, help="reference photo(s) of ONE person; embeddings are averaged "
                                                        "(Portrait: one embedding per photo; Plus: the first photo "
                                                        "also gives the CLIP face crop)")
    clip_image_encoder: Optional[str] = field(None, help="FaceID-Plus: CLIP vision tower (hub id or folder); "
                                                         "default: the adapter's recorded image_encoder_path")
    s_scale: Optional[float] = field(None, help="FaceID-Plus-V2 shortcut weight; default: the trained value")
    prompts: list[str] = field(default_factory=list, help="text prompts; each gets num_images images")
    negative_prompt: str = field("", help="negative prompt for classifier-free guidance")
    pretrained: Optional[str] = field(None, help="base model (hub id, folder or embedded:<size>); "
                                                 "default: the one recorded in adapter_config.json")
    num_images: int = field(1, help="images per prompt; image i uses seed + i")
    seed: int = field(0, help="base seed")
    scale: float = field(1.0, help="identity strength (IP-Adapter scale)")
    steps: int = field(30, help="denoising steps")
    guidance: float = field(5.0, help="classifier-free guidance scale (<= 1 disables guidance)")
    resolution: Optional[int] = field(None, help="image size in pixels; default: the adapter's training resolution")
    out: str = field("outputs/generate", help="output folder")
    device: Optional[str] = field(None, help="torch device; default cuda when available, else cpu")
    face_backend: Optional[str] = field(None, help="face analyzer backend; default: the one recorded by the adapter")
    face_model_root: Optional[str] = field(None, help="folder with face models for the analyzer (insightface)")

    def validate(self) -> None:
        if not self.adapter and not self.lora:
            raise ValueError("give an identity adapter (--adapter DIR) and/or a LoRA (--lora DIR)")
        if self.adapter and not self.faces:
            raise ValueError("give at least one reference photo (--face IMG) for the identity adapter")
        if self.faces and not self.adapter:
            raise ValueError("--face needs an identity adapter (--adapter DIR); a LoRA takes no photos")
        if not self.prompts:
            raise ValueError("give at least one prompt (--prompt TEXT)")
        if self.num_images < 1 or self.steps < 1:
            raise ValueError("num_images and steps must be >= 1")


# ----------------------------------------------------------------------------- adapter files


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """``adapter.load_adapter_config`` plus the weight file, with errors as GenerateError."""
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise GenerateError(f"adapter folder {folder} does not exist (expected the trainer's OUTPUT/adapter)")
    if not (folder / WEIGHT_NAME).is_file():
        raise GenerateError(f"{folder / WEIGHT_NAME} is missing: is {folder} an exported accord-face adapter folder?")
    try:
        cfg = load_adapter_config(folder)
    except (OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        raise GenerateError(f"{folder / CONFIG_NAME}: {err}") from None
    missing = [k for k in ("cross_attention_dim", "id_embed_dim", "recognizer") if k not in cfg]
    if missing:
        raise GenerateError(f"{folder / CONFIG_NAME} lacks key(s) {missing}; re-export the adapter")
    return cfg


def adapter_weight_shapes(adapter_dir: str | os.PathLike) -> tuple[int, int]:
    """(cross-attention dim, identity-embedding dim) read from the weight file itself."""
    from safetensors import safe_open

    path = Path(adapter_dir) / WEIGHT_NAME
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        if {"image_proj.norm.weight", "image_proj.proj.0.weight"} - keys:
            raise GenerateError(f"{path} is not an IP-Adapter FaceID file (no image_proj.norm / image_proj.proj.0)")
        cad = f.get_slice("image_proj.norm.weight").get_shape()[0]
        id_dim = f.get_slice("image_proj.proj.0.weight").get_shape()[1]
        return cad, id_dim


def resolve_base_model(adapter_cfg: dict[str, Any], override: Optional[str], lora: Optional[str] = None) -> str:
    """The base model to load: the override, else the adapter's recorded local path if it still exists, else its
    recorded id, else (no adapter) the LoRA's recorded base."""
    from .tiny import resolve_pretrained

    if override:
        return resolve_pretrained(override)
    local = adapter_cfg.get("base_model_path")
    if local and Path(local).is_dir():
        return local
    name = adapter_cfg.get("base_model")
    if not name and lora and not adapter_cfg:
        from .lora.export import lora_base_model

        name = lora_base_model(lora)
    if not name:
        raise GenerateError(f"{lora if lora and not adapter_cfg else 'adapter_config.json'} records no base model; "
                            "pass --pretrained ID_OR_DIR")
    return resolve_pretrained(name)


# ----------------------------------------------------------------------------- faces


def load_image_rgb(path: str | os.PathLike) -> np.ndarray:
    """Photo file -> (H, W, 3) uint8 RGB; GenerateError if missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise GenerateError(f"face photo {path} does not exist")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise GenerateError(f"face photo {path} is not a readable image ({err})") from None


def make_face_analyzer(adapter_cfg: dict[str, Any], backend: Optional[str] = None, model_root: Optional[str] = None):
    """The analyzer the adapter was trained with (recorded recognizer), checked for embedding size."""
    from .face import load_face_analyzer

    rec = adapter_cfg.get("recognizer") or {}
    backend = backend or rec.get("backend") or RECOGNIZER_BACKENDS.get(rec.get("name"), "opencv-zoo")
    try:
        analyzer = load_face_analyzer(backend=backend, model_root=model_root,
                                      model_name=rec.get("model_name") or rec.get("pack"))
    except (OSError, ValueError) as err:  # face.ModelNotFoundError is an OSError
        raise GenerateError(f"cannot load the face analyzer '{backend}' recorded by the adapter: "
                            f"{str(err).splitlines()[0]}") from None
    check_recognizer(adapter_cfg, analyzer)
    return analyzer


def check_recognizer(adapter_cfg: dict[str, Any], analyzer) -> None:
    """GenerateError when the analyzer's embeddings cannot feed the adapter (size mismatch)."""
    want = int(adapter_cfg["id_embed_dim"])
    if int(analyzer.embedding_dim) != want:
        rec = adapter_cfg.get("recognizer") or {}
        raise GenerateError(
            f"recognizer mismatch: the adapter takes {want}-d identity embeddings "
            f"({rec.get('name', '?')}, {rec.get('backend', '?')}), but the face analyzer "
            f"'{analyzer.recognizer_name}' ({analyzer.backend}) gives {analyzer.embedding_dim}-d ones; "
            "use the recognizer the adapter was trained with")


def identity_embedding(analyzer, photos: list[str | os.PathLike]) -> tuple[np.ndarray, list[dict]]:
    """Normalised mean identity embedding of one person's photos, plus per-photo notes.

        e = normalize( sum_i e_i / n ),   e_i the L2-normalised embedding of the largest face in photo i

    GenerateError names a photo with no face; several faces in one photo -> the
    largest is used and a warning is logged (and recorded in the notes).
    """
    embeds, notes = [], []
    for photo in photos:
        faces = analyzer.analyze(load_image_rgb(photo))
        if not faces:
            raise GenerateError(f"no face found in {photo}; use a photo with one clearly visible face")
        if len(faces) > 1:
            log.warning("%s: %d faces found; using the largest", photo, len(faces))
        emb = np.asarray(faces[0].embedding, dtype=np.float64).reshape(-1)
        embeds.append(emb / max(np.linalg.norm(emb), 1e-12))
        notes.append({"file": str(photo), "faces": len(faces), "score": float(getattr(faces[0], "score", math.nan)),
                      "bbox": [float(v) for v in np.asarray(faces[0].bbox).reshape(-1)[:4]]})
    mean = np.mean(embeds, axis=0)
    return (mean / max(np.linalg.norm(mean), 1e-12)).astype(np.float32), notes


# ----------------------------------------------------------------------------- generation


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class FaceIDGenerator:
    """A diffusers text-to-image pipeline with the adapter (and/or a LoRA) loaded; generates from identity embeddings.

    ``adapter_dir=None`` with a ``lora`` folder: plain text-to-image with the LoRA (no identity).
    """

    def __init__(self, adapter_dir: str | os.PathLike | None, pretrained: Optional[str] = None,
                 device: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                 lora: str | os.PathLike | None = None, lora_scale: float = 1.0,
                 clip_image_encoder: Optional[str] = None, s_scale: Optional[float] = None):
        from diffusers import DiffusionPipeline

        self.adapter_dir = str(adapter_dir) if adapter_dir else None
        self.adapter_cfg = read_adapter_config(adapter_dir) if adapter_dir else {}
        self.lora_dir, self.lora_scale = (str(lora) if lora else None), lora_scale
        self.base_model = resolve_base_model(self.adapter_cfg, pretrained, self.lora_dir)
        self.device = device or default_device()
        self.dtype = dtype or (torch.float16 if self.device.startswith("cuda") else torch.float32)
        try:
            pipe = DiffusionPipeline.from_pretrained(self.base_model, dtype=self.dtype,
                                                     safety_checker=None, requires_safety_checker=False)
        except (OSError, ValueError) as err:
            raise GenerateError(f"cannot load base model {self.base_model!r}: {str(err).splitlines()[0]} "
                                "(pass --pretrained ID_OR_DIR, or run once with network access)") from None
        from .family.generation import FamilyDriver
        from .family.identity_lora import ADAPTER_NAME, load_identity_lora

        self.family, self.identity_lora = None, False      # FaceID family member driver; adapter's identity LoRA
        self.base_check: Optional[dict] = None             # set by check_base: is this the base it was trained on?
        if self.adapter_dir:
            if not hasattr(pipe, "load_ip_adapter"):
                raise GenerateError(f"{type(pipe).__name__} ({self.base_model}) does not support IP-Adapters")
            self.check_base(pipe)
            # The identity LoRA first: loaded after a FaceID-Plus adapter, peft's name matching would also wrap
            # the resampler's attention projections (with zero LoRA weights: harmless, but noisy).
            self.identity_lora = load_identity_lora(pipe, self.adapter_dir, lora_scale)
            pipe.load_ip_adapter(self.adapter_dir, subfolder="", weight_name=WEIGHT_NAME, image_encoder_folder=None)
            self.family = FamilyDriver(self.adapter_cfg, self.device, self.dtype, clip_image_encoder, s_scale)
        if self.lora_dir:
            from .lora.export import load_into_pipeline

            try:
                load_into_pipeline(pipe, self.lora_dir, scale=lora_scale, adapter_name="lora")
            except (ValueError, RuntimeError, KeyError) as err:  # shapes of another base model
                raise GenerateError(f"--lora {self.lora_dir} does not fit {self.base_model}: "
                                    f"{str(err).splitlines()[0][:200]}; pass the base it was trained on "
                                    "with --pretrained") from None
        if self.identity_lora and self.lora_dir:        # both LoRAs active (set_adapters keeps only those named)
            pipe.set_adapters([ADAPTER_NAME, "lora"], adapter_weights=[lora_scale, lora_scale])
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        self.is_sdxl = "XL" in type(pipe).__name__

    def check_base(self, pipe) -> None:
        """GenerateError when the adapter was trained for a base with another cross-attention size; a one-line
        warning when the base is of the same shape but not the one it was trained on (``base_fingerprint``)."""
        from .fingerprint import base_fingerprint, describe_base, fingerprint_difference

        cad, _ = adapter_weight_shapes(self.adapter_dir)
        base_cad = pipe.unet.config.cross_attention_dim
        if cad != base_cad:
            raise GenerateError(
                f"adapter/base mismatch: {self.adapter_dir} was trained for a UNet with cross-attention dim {cad} "
                f"(base {self.adapter_cfg.get('base_model')!r}), but {self.base_model} has {base_cad}; "
                "pass the base model it was trained on with --pretrained")
        recorded = self.adapter_cfg.get("base_fingerprint")
        if not recorded:
            self.base_check = {"trained_on": self.adapter_cfg.get("base_model"), "same": None,
                               "difference": "not recorded (adapter exported without a base fingerprint)"}
            return
        current = base_fingerprint(self.base_model, self.base_model, pipe.unet)
        why = fingerprint_difference(recorded, current)
        self.base_check = {"trained_on": recorded.get("name"), "same": why is None, "difference": why}
        if why:
            log.warning("%s was trained on base %s, but the base loaded is %s (%s): identity may transfer worse; "
                        "pass --pretrained %s for the base it was trained on (ignore this if you retarget on purpose)",
                        self.adapter_dir, describe_base(recorded), describe_base(current), why, recorded.get("name"))

    def set_identity_lora(self, on: bool) -> None:
        """Switch the adapter's identity LoRA on (at ``lora_scale``) or off (the base UNet): an adapter-scale-0
        draw of an adapter with a LoRA is the base model only with the LoRA off too. No-op without one."""
        if not self.identity_lora:
            return
        from .family.identity_lora import ADAPTER_NAME

        names, weights = [ADAPTER_NAME], [self.lora_scale if on else 0.0]
        if self.lora_dir:
            names, weights = names + ["lora"], weights + [self.lora_scale]
        self.pipe.set_adapters(names, adapter_weights=weights)

    @property
    def resolution(self) -> int:
        res = self.adapter_cfg.get("resolution")
        return int(res) if res else int(self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)

    def generate(self, embedding: Optional[np.ndarray], prompt: str, *, seeds: list[int], **kwargs) -> list:
        """One image of ``prompt`` per seed (image i from ``torch.Generator().manual_seed(seeds[i])``)."""
        return self.generate_pairs(embedding, [prompt] * len(seeds), seeds, **kwargs)

    @torch.no_grad()
    def generate_pairs(self, embedding: Optional[np.ndarray], prompts: list[str], seeds: list[int], *,
                       scale: float = 1.0,
                       steps: int = 30, guidance: float = 5.0, negative_prompt: str = "",
                       resolution: Optional[int] = None) -> list:
        """One image per (prompts[i], seeds[i]) pair, in one batched pipeline call.

        Generators live on the CPU, so a seed gives the same starting noise on any device.
        """
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds")
        size = resolution or self.resolution
        embeds = None
        if self.adapter_dir:
            self.pipe.set_ip_adapter_scale(scale)
            emb = torch.as_tensor(np.asarray(embedding, np.float32))
            if self.family.kind != "faceid":
                emb = emb.reshape(-1, emb.shape[-1])   # (n, D): one identity, n photos (Portrait) or 1 (Plus)
            elif emb.ndim == 1:
                emb = emb.reshape(1, -1).repeat(len(prompts), 1)                                    # (N, D)
            embeds = identity_image_embeds(emb, guidance > 1.0, dtype=self.dtype, device=self.device)   # [(2N, 1, D)]
            self.family.before_call(self.pipe, len(prompts), guidance > 1.0)
        out = self.pipe(prompt=list(prompts), negative_prompt=[negative_prompt] * len(prompts) if negative_prompt
                        else None, ip_adapter_image_embeds=embeds, num_inference_steps=steps,
                        guidance_scale=guidance, num_images_per_prompt=1, height=size, width=size,
                        generator=[torch.Generator().manual_seed(int(s)) for s in seeds])
        return out.images

    def describe(self) -> dict[str, Any]:
        return {"adapter": self.adapter_dir, "base_model": self.base_model,
                "pipeline": type(self.pipe).__name__, "device": self.device, "dtype": str(self.dtype),
                "recognizer": self.adapter_cfg.get("recognizer"), "adapter_format": self.adapter_cfg.get("format"),
                "adapter_train_steps": self.adapter_cfg.get("train_steps"), "lora": self.lora_dir,
                "lora_scale": self.lora_scale if self.lora_dir or self.identity_lora else None,
                "identity_lora": self.identity_lora, "base_check": self.base_check,
                **(self.family.describe() if self.family else {})}


# ----------------------------------------------------------------------------- outputs


def make_grid(images: list, cols: int, labels: Optional[list[str]] = None):
    """Paste equal-sized PIL images into a grid, row-major."""
    from PIL import Image

    if not images:
        raise ValueError("make_grid needs at least one image")
    w, h = images[0].size
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB").resize((w, h)), ((i % cols) * w, (i // cols) * h))
    return grid


def _write_all(f, data: bytes, path: Path) -> None:
    """The one place generation and evaluation records reach the disk (tests inject ENOSPC / EFBIG here);
    ``f`` is open on ``path`` or on its temp file."""
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def _named(err: OSError, path: Path) -> OSError:
    """``err`` with ``path`` as its filename (a write's ENOSPC carries none; a temp name says nothing to users)."""
    return OSError(err.errno, err.strerror or str(err), str(path))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """``path`` holds the old bytes or the new ones, never a part: temp file in the same folder, fsync, rename.

    A failed write (disk full, ``ulimit -f``) removes the temp file and raises OSError naming ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_all(f, data, path)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as err:
        raise _named(err, path) from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save_image(image, path: Path) -> None:
    """A PIL image encoded in memory (format from the suffix), then ``atomic_write_bytes``."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    image.save(buf, format=Image.registered_extensions().get(Path(path).suffix.lower(), "PNG"))
    atomic_write_bytes(Path(path), buf.getvalue())


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(Path(path), text.encode())


def append_line(path: Path, line: str) -> None:
    """Append one record and fsync; a failed append is cut back off, so the file keeps only whole records."""
    path = Path(path)
    with open(path, "ab") as f:
        size = f.tell()
        try:
            _write_all(f, line.encode(), path)
        except OSError as err:
            try:
                f.truncate(size)
            except OSError:
                pass    # a torn last line is dropped by the reader (evaluate's _load_done)
            raise _named(err, path) from err


ADAPTER_FIX = "re-export it (rerun the training command: it exports from the last complete checkpoint) or copy it again"
LORA_FIX = "rerun the LoRA training command (it exports from its last checkpoint) or copy the folder again"


def check_adapter_files(adapter_dir: str | os.PathLike) -> None:
    """The adapter's weight files are complete safetensors and match the sizes/sha256 the export recorded."""
    from . import checks
    from .family.identity_lora import LORA_WEIGHTS

    recorded = read_adapter_config(adapter_dir).get("files")
    checks.check_weight_files(adapter_dir, (WEIGHT_NAME, LORA_WEIGHTS), recorded, ADAPTER_FIX)


def check_lora_files(lora_dir: str | os.PathLike) -> None:
    """A LoRA folder's weight files (LoRA + learned token) are complete safetensors."""
    from . import checks
    from .family.identity_lora import LORA_WEIGHTS

    checks.check_weight_files(lora_dir, (LORA_WEIGHTS, "learned_embeds.safetensors"), None, LORA_FIX)


def check_generate_inputs(cfg: GenerateConfig) -> None:
    """Every path, the device and the base model's reachability, before anything loads (UsageError)."""
    from . import checks

    if cfg.adapter:
        checks.check_adapter_dir(cfg.adapter)
    if cfg.lora:
        checks.check_lora_dir(cfg.lora)
    for photo in cfg.faces:
        checks.check_photo(photo, "--face", IMAGE_SUFFIXES)
    checks.check_device(cfg.device)
    if cfg.pretrained:
        checks.check_hub_reachable(cfg.pretrained, "--pretrained")
    elif cfg.adapter:
        rec = read_adapter_config(cfg.adapter)
        local = rec.get("base_model_path")
        if not (local and Path(local).is_dir()):
            checks.check_hub_reachable(rec.get("base_model") or "", "the adapter's base model (--pretrained)")
    # Last of the cheap checks (after the path mistakes): the weight files are whole and as exported.
    if cfg.adapter:
        check_adapter_files(cfg.adapter)
    if cfg.lora:
        check_lora_files(cfg.lora)


def run_generate(cfg: GenerateConfig) -> dict[str, Any]:
    """Analyse the reference photos, generate num_images per prompt, write images + grid + generate.json."""
    from importlib.metadata import version

    check_generate_inputs(cfg)
    # Faces first: a bad photo fails in a second, before a multi-GB base model is loaded.
    analyzer, embedding, photo_notes = None, None, []
    if cfg.adapter:
        analyzer = make_face_analyzer(read_adapter_config(cfg.adapter), cfg.face_backend, cfg.face_model_root)
        embedding, photo_notes = identity_embedding(analyzer, cfg.faces)
    gen = FaceIDGenerator(cfg.adapter, cfg.pretrained, cfg.device, lora=cfg.lora, lora_scale=cfg.lora_scale,
                          clip_image_encoder=cfg.clip_image_encoder, s_scale=cfg.s_scale)
    if gen.family is not None and (gen.family.kind != "faceid"):
        from .family.generation import photo_inputs

        inputs = photo_inputs(gen.adapter_cfg, analyzer, cfg.faces, gen.family.clip_size)
        embedding = inputs["embedding"]                   # Portrait: (n, D), one per photo
        gen.family.set_face_crop(inputs["crop"])          # Plus: CLIP states of the first photo's crop
    out = Path(cfg.out)
    records, images = [], []
    for p_idx, prompt in enumerate(cfg.prompts):
        seeds = [cfg.seed + i for i in range(cfg.num_images)]
        batch = gen.generate(embedding, prompt, seeds=seeds, scale=cfg.scale, steps=cfg.steps,
                             guidance=cfg.guidance, negative_prompt=cfg.negative_prompt, resolution=cfg.resolution)
        for seed, image in zip(seeds, batch):
            name = f"p{p_idx:02d}_seed{seed}.png"
            atomic_save_image(image, out / name)
            records.append({"file": name, "prompt": prompt, "seed": seed})
            images.append(image)
    atomic_save_image(make_grid(images, cols=cfg.num_images), out / "grid.png")
    summary = {
        "settings": to_dict(cfg), **gen.describe(), "resolution": cfg.resolution or gen.resolution,
        "face_analyzer": {"backend": analyzer.backend, "recognizer": analyzer.recognizer_name,
                          "embedding_dim": int(analyzer.embedding_dim)} if analyzer else None,
        "reference_photos": photo_notes, "images": records, "grid": "grid.png",
        "versions": {pkg: version(pkg) for pkg in ("torch", "diffusers", "transformers")},
    }
    atomic_write_text(out / "generate.json", json.dumps(summary, indent=2))
    return summary
