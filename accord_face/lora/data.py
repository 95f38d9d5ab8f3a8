"""Reference images for the LoRA path: reading, small augmentations, a synthetic set.

Sampling is a pure function of (seed, global sample index): sample k of the run
is image ``perm_epoch[k % N]`` with epoch ``k // N``, augmented with a generator
seeded from ``(seed, k)``. A resumed run therefore sees exactly the images and
crops it would have seen without the interruption, with no data state to save.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .config import DataConfig
from .prompts import METADATA_NAME, PromptSet, Reference


def load_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as err:
        raise ValueError(f"cannot read reference image {path}: {err}") from None


def augment(image: Image.Image, resolution: int, cfg: DataConfig, gen: torch.Generator) -> torch.Tensor:
    """Square crop (random or centred) of ``crop_scale`` x the shorter side, resize, optional flip.

    Returns (3, resolution, resolution) float32 in [-1, 1], the VAE's input range.
    """
    w, h = image.size
    side = max(1, int(round(min(w, h) * (1.0 if cfg.center_crop else cfg.crop_scale))))
    if cfg.center_crop:
        left, top = (w - side) // 2, (h - side) // 2
    else:
        left = int(torch.randint(0, w - side + 1, (1,), generator=gen))
        top = int(torch.randint(0, h - side + 1, (1,), generator=gen))
    image = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    if cfg.random_flip and float(torch.rand((), generator=gen)) < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0          # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()         # (3, H, W)


class ReferenceSet:
    """Images + prompts, decoded once (3-20 small images), sampled by global index."""

    def __init__(self, refs: list[Reference], resolution: int, cfg: DataConfig, seed: int):
        self.refs, self.resolution, self.cfg, self.seed = refs, resolution, cfg, seed
        self.images = [load_rgb(r.image) for r in refs]

    def __len__(self) -> int:
        return len(self.refs)

    def index_of(self, k: int) -> int:
        epoch, pos = divmod(k, len(self.refs))
        perm = list(range(len(self.refs)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(perm)
        return perm[pos]

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, list[PromptSet]]:
        """The instance batch of optimizer micro-step ``step``: (B, 3, H, W) pixels and B prompt sets."""
        pixels, prompts = [], []
        for k in range(step * batch_size, (step + 1) * batch_size):
            i = self.index_of(k)
            gen = torch.Generator().manual_seed(self.seed * 7_919 + k)
            pixels.append(augment(self.images[i], self.resolution, self.cfg, gen))
            prompts.append(self.refs[i].prompts)
        return torch.stack(pixels), prompts


# ---------------------------------------------------------------------------
# Synthetic reference sets (embedded default and tests): PIL drawings whose
# "target" always appears with one context object, i.e. a coupled concept.
# ---------------------------------------------------------------------------

def _background(draw: ImageDraw.ImageDraw, size: int, rng: random.Random) -> None:
    sky = (rng.randint(120, 200), rng.randint(160, 220), rng.randint(200, 255))
    ground = (rng.randint(60, 120), rng.randint(120, 170), rng.randint(50, 90))
    horizon = int(size * rng.uniform(0.55, 0.7))
    draw.rectangle((0, 0, size, horizon), fill=sky)
    draw.rectangle((0, horizon, size, size), fill=ground)


def _backpack(draw: ImageDraw.ImageDraw, x: int, y: int, s: int) -> None:
    """The subject: a red pack with a yellow stripe and dark straps, (x, y) = top-left, s = height."""
    w = int(s * 0.7)
    draw.rounded_rectangle((x, y, x + w, y + s), radius=max(2, s // 5), fill=(200, 30, 40), outline=(60, 10, 10))
    draw.rectangle((x, y + s // 2, x + w, y + s // 2 + max(2, s // 8)), fill=(250, 210, 40))
    draw.arc((x + w // 4, y - s // 4, x + 3 * w // 4, y + s // 4), 180, 360, fill=(40, 20, 20), width=max(1, s // 12))


def _tree(draw: ImageDraw.ImageDraw, x: int, y: int, s: int) -> None:
    """The context object: a round green crown on a brown trunk."""
    draw.rectangle((x + s // 2 - s // 10, y + s // 2, x + s // 2 + s // 10, y + s), fill=(110, 70, 30))
    draw.ellipse((x, y, x + s, y + int(s * 0.7)), fill=(30, 130, 40), outline=(10, 70, 20))


_STYLE_OBJECTS = {
    "a house": lambda d, x, y, s: (d.rectangle((x, y + s // 3, x + s, y + s), fill=(200, 180, 150)),
                                   d.polygon([(x, y + s // 3), (x + s // 2, y), (x + s, y + s // 3)], fill=(150, 50, 40))),
    "a tree": _tree,
    "a car": lambda d, x, y, s: (d.rectangle((x, y + s // 3, x + s, y + 2 * s // 3), fill=(40, 80, 200)),
                                 d.ellipse((x + s // 8, y + s // 2, x + 3 * s // 8, y + 3 * s // 4), fill=(20, 20, 20)),
                                 d.ellipse((x + 5 * s // 8, y + s // 2, x + 7 * s // 8, y + 3 * s // 4), fill=(20, 20, 20))),
    "a cat": lambda d, x, y, s: (d.ellipse((x, y + s // 4, x + s, y + s), fill=(230, 140, 40)),
                                 d.polygon([(x, y + s // 3), (x + s // 5, y), (x + 2 * s // 5, y + s // 4)], fill=(230, 140, 40))),
}


def _stylize(image: Image.Image, rng: random.Random) -> Image.Image:
    """The "sks style": a purple/orange posterized palette with a dotted overlay."""
    gray = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    levels = np.floor(gray * 3.999) / 3.0                                   # 4 tones
    low, high = np.array([70, 20, 110], np.float32), np.array([255, 170, 60], np.float32)
    rgb = low + levels[..., None] * (high - low)
    step = 6 + rng.randint(0, 2)
    rgb[::step, ::step] = (255, 255, 255)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def make_synthetic_references(folder: str | Path, kind: str = "subject", count: int = 6, size: int = 96,
                              seed: int = 0) -> Path:
    """Write a small reference set with prompts; returns the folder.

    subject: a red "sks backpack", always beside a tree, prompts in metadata.jsonl
        (joint "a photo of sks backpack with a tree", target "a photo of sks backpack",
        context "a photo of a tree").
    style: houses, trees, cars and cats drawn in one "sks style", content captions in
        per-image .txt files (the prompt fallback path).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        image = Image.new("RGB", (size, size))
        draw = ImageDraw.Draw(image)
        _background(draw, size, rng)
        name = f"ref{i:02d}.png"
        if kind == "subject":
            s = int(size * rng.uniform(0.3, 0.4))
            half = size // 2
            left = rng.random() < 0.5  # the pack in one half of the picture, the tree in the other
            pack_x = rng.randint(0, max(0, half - int(s * 0.7)))
            tree_x = rng.randint(0, max(0, half - int(s * 1.3)))
            px, tx = (pack_x, half + tree_x) if left else (half + pack_x, tree_x)
            _tree(draw, tx, rng.randint(0, size // 4), int(s * 1.3))
            _backpack(draw, px, size - s - rng.randint(1, max(1, size // 8)), s)
            rows.append({"file_name": name, "joint": "a photo of sks backpack with a tree",
                         "target": "a photo of sks backpack", "context": "a photo of a tree"})
        elif kind == "style":
            caption, painter = list(_STYLE_OBJECTS.items())[i % len(_STYLE_OBJECTS)]
            s = int(size * rng.uniform(0.4, 0.6))
            painter(draw, rng.randint(0, size - s), rng.randint(size // 6, max(size // 6, size - s)), s)
            image = _stylize(image, rng)
            (folder / f"ref{i:02d}.txt").write_text(f"a photo of {caption}\n")
        else:
            raise ValueError(f"unknown synthetic reference kind {kind!r} (subject or style)")
        tmp = folder / f".{name}.tmp.png"
        image.save(tmp)
        tmp.replace(folder / name)
    if rows:
        tmp = folder / (METADATA_NAME + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(folder / METADATA_NAME)
    return folder


def class_image_batch(paths: list[Path], prompt: str, step: int, batch_size: int, resolution: int,
                      cfg: DataConfig, seed: int) -> tuple[torch.Tensor, list[str]]:
    """The class half of a prior-preservation batch, sampled like ``ReferenceSet.batch``."""
    pixels = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        gen = torch.Generator().manual_seed(seed * 104_729 + k)
        path = paths[int(torch.randint(0, len(paths), (1,), generator=gen))]
        pixels.append(augment(load_rgb(path), resolution, cfg, gen))
    return torch.stack(pixels), [prompt] * batch_size


__all__ = ["ReferenceSet", "augment", "make_synthetic_references", "class_image_batch", "load_rgb"]
