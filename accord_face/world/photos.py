"""World photos on disk, in the layout ``scripts/prepare_shards.py`` reads.

``write_training_photos``: PNG files with a ``metadata.jsonl`` (file name, caption,
``person_id``), identities from the training split. ``write_reference_photos``: one
reference photo per held-out identity (a loose photo is one identity for
``accord-face evaluate``), ``references.json`` with each one's context and a
``metadata.jsonl`` with their captions.
Both are resumable: a photo already on disk is kept (names are deterministic).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..pipeline import atomic_save_image, atomic_write_text

from .render import HELD_OUT_START, Context, caption, random_context, render, training_caption


def _save_png(image: np.ndarray, path: Path) -> None:
    if not path.is_file():  # deterministic names: a photo on disk is already the right one
        atomic_save_image(Image.fromarray(image), path)


def _write_lines(path: Path, lines: list[str]) -> None:
    atomic_write_text(path, "".join(line + "\n" for line in lines))


ContextFn = Callable[[int, int, np.random.Generator], Context]


def write_training_photos(folder: str | os.PathLike, identities: Iterable[int], photos_per_identity: int,
                          seed: int = 0, context_fn: ContextFn | None = None, progress: bool = True,
                          p_omit: float = 0.0) -> Path:
    """``photos_per_identity`` photos of each identity; ``context_fn(identity, photo, rng)`` picks the context
    (default: uniformly random). Captions name the context truthfully; in full when ``p_omit`` = 0, else
    each of the shirt and background phrases is left out with probability ``p_omit`` (the accessory with
    ``p_omit / 2``), drawn from their own generator (the contexts do not depend on ``p_omit``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = list(identities)
    if any(i >= HELD_OUT_START for i in ids):
        raise ValueError(f"training photos must come from training identities (< {HELD_OUT_START})")
    rng = np.random.default_rng(seed)
    cap_rng = np.random.default_rng([seed, 77])
    lines = []
    for i in tqdm(ids, desc="world photos", disable=not progress, mininterval=10):
        for j in range(photos_per_identity):
            ctx = context_fn(i, j, rng) if context_fn else random_context(rng)
            name = f"p{i:04d}_{j:02d}.png"
            _save_png(render(i, ctx, seed * 1_000 + j).image, folder / name)
            text = training_caption(ctx, cap_rng, p_omit) if p_omit > 0 else caption(ctx)
            lines.append(json.dumps({"file_name": name, "caption": text, "person_id": f"p{i:04d}"}))
    _write_lines(folder / "metadata.jsonl", lines)
    return folder


def write_reference_photos(folder: str | os.PathLike, n_identities: int, seed: int = 0,
                           first: int = HELD_OUT_START) -> dict[str, dict]:
    """One reference photo per held-out identity ``first .. first + n - 1``, each in a random context A.
    Returns (and writes to ``references.json``) {name: {"identity", "file", "context"}}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(10_000 + seed)
    refs, lines = {}, []
    for i in range(first, first + n_identities):
        ctx = random_context(rng)
        name = f"h{i:04d}"
        _save_png(render(i, ctx, 50_000 + seed).image, folder / f"{name}.png")
        refs[name] = {"identity": i, "file": f"{name}.png", "context": ctx.attributes()}
        lines.append(json.dumps({"file_name": f"{name}.png", "caption": caption(ctx), "person_id": name}))
    _write_lines(folder / "references.json", [json.dumps(refs, indent=1)])
    _write_lines(folder / "metadata.jsonl", lines)  # captions, for shards of the references
    return refs


def write_extra_photos(folder: str | os.PathLike, refs: dict[str, dict], per_identity: int,
                       seed: int = 0) -> dict[str, list[str]]:
    """``per_identity`` more photos of each reference's person (own random contexts and photo seeds, never
    the reference's): {name: [file, ...]} relative to ``folder``, written under ``folder/extra/``.

    For conditioning on several photos of one person, as ``accord-face generate --photo`` repeated does."""
    folder = Path(folder)
    (folder / "extra").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20_000 + seed)
    out: dict[str, list[str]] = {}
    for name, ref in refs.items():
        files = []
        for k in range(per_identity):
            rel = f"extra/{name}_{k}.png"
            _save_png(render(int(ref["identity"]), random_context(rng), 70_000 + 97 * seed + k).image, folder / rel)
            files.append(rel)
        out[name] = files
    return out
