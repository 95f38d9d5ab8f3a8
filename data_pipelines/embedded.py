"""Embedded default photos: real public-domain portraits taken at run time from installed packages.

Nothing is downloaded and no image is stored in this repository:

- Grace Hopper (US Navy photo, public domain): matplotlib ``mpl-data/sample_data/grace_hopper.jpg``
- Eileen Collins (NASA photo, public domain): ``skimage.data.astronaut()``
- "Cameraman" (no known copyright restrictions, per scikit-image): ``skimage.data.camera()``, grayscale

Each person gets the original plus a few "re-photos" (crop, small rotation, exposure, mirror):
several photos of one identity for the demo. They are augmentations of one photo,
not independent photographs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance


def _grace_hopper() -> Image.Image:
    import matplotlib

    return Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")


def _skimage(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray(np.asarray(getattr(skimage.data, name)()))


# name -> (loader, caption of the original)
PEOPLE = {
    "grace_hopper": (_grace_hopper, "a portrait photo of a woman in a naval officer uniform"),
    "eileen_collins": (lambda: _skimage("astronaut"), "a photo of a woman astronaut in a spacesuit with a flag"),
    "cameraman": (lambda: _skimage("camera"), "a black and white photo of a man with a camera on a tripod"),
}


def load_portrait(name: str) -> Image.Image:
    """One of ``PEOPLE`` as a PIL image (RGB, or L for the grayscale cameraman)."""
    return PEOPLE[name][0]()


def rephotos(image: Image.Image) -> list[tuple[str, Image.Image]]:
    """Deterministic variants of a portrait: mirrored, rotated + darker, cropped + brighter."""
    w, h = image.size
    return [
        ("mirror", image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
        ("rot", ImageEnhance.Brightness(image.rotate(8, resample=Image.Resampling.BICUBIC)).enhance(0.8)),
        ("crop", ImageEnhance.Brightness(image.crop((w // 12, h // 16, w - w // 12, h - h // 20))).enhance(1.15)),
    ]


def write_embedded_photos(folder: str | os.PathLike, variants: bool = True) -> Path:
    """Write the embedded portraits (and their re-photos) with same-stem .txt captions; returns ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, (_, caption) in PEOPLE.items():
        image = load_portrait(name)
        items = [("orig", image)] + (rephotos(image) if variants else [])
        for tag, im in items:
            stem = folder / f"{name}_{tag}"
            im.save(stem.with_suffix(".jpg"), quality=95)
            (stem.with_suffix(".txt")).write_text(caption + "\n", encoding="utf-8")
    return folder
