"""The synthetic world (protocol v2): shapes on coloured backgrounds, captions from a small grammar.

Every sample carries its exact ground truth (which shapes, which colours, which
background), so the judge can be trained on unlimited renders and generated
images can be scored without a human in the loop.

Grammar:  caption := objects ["on a" BG "background"] | "on a" BG "background"
          objects := object | object "and" object
          object  := "a" [COLOUR] SHAPE | "a sks cross"
The personalization target is ``sks cross``: an orange cross (an X). Its class,
``cross``, is part of the base world (crosses in red, yellow, white and cyan), so
"a sks cross" starts from a known prior and "a cross" is the prior-preservation
class prompt, as in DreamBooth's "a sks backpack" / "a backpack". Orange, and
the word "sks", never occur in base data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 32  # image side in pixels
SUPERSAMPLE = 4  # render at 4x and box-filter down: anti-aliased edges

CLASS_SHAPE = "cross"                                   # the target's superclass
BASE_SHAPES = ("circle", "square", "triangle", CLASS_SHAPE)
CONTEXT_SHAPES = ("circle", "square", "triangle")        # shapes a reference set may couple to the target
TARGET_TOKEN = "sks"
TARGET_COLOUR_NAME = "orange"
LABELS = BASE_SHAPES + (TARGET_TOKEN,)                   # judge labels: shape present (any colour), sks present
OBJECT_COLOURS = {"red": (230, 40, 40), "yellow": (240, 220, 40), "white": (245, 245, 245), "cyan": (40, 220, 230)}
TARGET_COLOUR = (255, 140, 0)
BACKGROUNDS = {"black": (20, 20, 20), "green": (30, 120, 40), "purple": (100, 40, 130), "blue": (30, 50, 160)}
BG_NAMES = tuple(BACKGROUNDS)
VOCAB = ("a", "and", "on", "background", TARGET_TOKEN) + BASE_SHAPES + tuple(OBJECT_COLOURS) + BG_NAMES


@dataclass(frozen=True)
class Obj:
    shape: str           # one of BASE_SHAPES
    colour: str          # OBJECT_COLOURS key, or "orange" (the target when shape == "cross")
    cx: float            # centre, pixels
    cy: float
    size: float          # half-extent, pixels

    @property
    def is_target(self) -> bool:
        return self.shape == CLASS_SHAPE and self.colour == TARGET_COLOUR_NAME


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str

    def labels(self) -> np.ndarray:
        """Multi-hot (len(LABELS),): each base shape present (any colour), then sks present; then the background index."""
        present = np.zeros(len(LABELS), dtype=np.float32)
        for o in self.objects:
            present[BASE_SHAPES.index(o.shape)] = 1.0
            if o.is_target:
                present[LABELS.index(TARGET_TOKEN)] = 1.0
        return np.concatenate([present, np.array([BG_NAMES.index(self.background)], dtype=np.float32)])


TARGET_PHRASE = f"a {TARGET_TOKEN} {CLASS_SHAPE}"
CLASS_PHRASE = f"a {CLASS_SHAPE}"


def object_phrase(o: Obj, with_colour: bool = True) -> str:
    if o.is_target:
        return TARGET_PHRASE
    return f"a {o.colour} {o.shape}" if with_colour else f"a {o.shape}"


def caption(objects: list[str] | tuple[str, ...], background: str | None) -> str:
    """Join object phrases ("a red circle", "a sks cross") and an optional background into a caption."""
    words = " and ".join(objects)
    if background is not None:
        words = (words + " " if words else "") + f"on a {background} background"
    return words


def scene_caption(scene: Scene) -> str:
    return caption([object_phrase(o) for o in scene.objects], scene.background)


@dataclass(frozen=True)
class CaptionStyle:
    """How often base captions leave things out (so target-only and context-only prompts are in distribution)."""
    no_background: float = 0.25   # drop "on a ... background"
    one_object: float = 0.15       # a two-object scene captioned with one of its objects only
    no_colour: float = 0.15        # an object named without its colour ("a cross")


def partial_caption(scene: Scene, rng: np.random.Generator, style: CaptionStyle = CaptionStyle()) -> str:
    """A true but possibly incomplete caption: sometimes no background, one object only, or no colour."""
    objs = list(scene.objects)
    if len(objs) == 2 and rng.random() < style.one_object:
        objs = [objs[int(rng.integers(2))]]
    phrases = [object_phrase(o, with_colour=rng.random() >= style.no_colour) for o in objs]
    bg = None if phrases and rng.random() < style.no_background else scene.background
    return caption(phrases, bg)


def _mask(shape: str, cx: float, cy: float, size: float, n: int) -> np.ndarray:
    """Boolean (n, n) coverage of one shape on an n-pixel canvas (coordinates already scaled)."""
    yy, xx = np.mgrid[0:n, 0:n] + 0.5
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= size ** 2
    if shape == "square":
        return (np.abs(dx) <= size * 0.85) & (np.abs(dy) <= size * 0.85)
    if shape == "triangle":  # apex up, base at +size
        return (dy <= size * 0.8) & (dy >= -size) & (np.abs(dx) <= (dy + size) * 0.6)
    if shape == CLASS_SHAPE:  # two diagonal bars (an X)
        w = size * 0.32
        inside = (np.abs(dx) <= size) & (np.abs(dy) <= size)
        return inside & ((np.abs(dx - dy) <= w * 1.414) | (np.abs(dx + dy) <= w * 1.414))
    raise ValueError(f"unknown shape {shape!r}; expected one of {BASE_SHAPES}")


def colour_rgb(name: str) -> tuple[int, int, int]:
    return TARGET_COLOUR if name == TARGET_COLOUR_NAME else OBJECT_COLOURS[name]


def render(scene: Scene, size: int = SIZE) -> np.ndarray:
    """Scene -> uint8 (size, size, 3), anti-aliased by supersampling."""
    n = size * SUPERSAMPLE
    img = np.empty((n, n, 3), dtype=np.float32)
    img[:] = BACKGROUNDS[scene.background]
    for o in scene.objects:
        m = _mask(o.shape, o.cx * SUPERSAMPLE, o.cy * SUPERSAMPLE, o.size * SUPERSAMPLE, n)
        img[m] = colour_rgb(o.colour)
    img = img.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def place(rng: np.random.Generator, shapes: list[tuple[str, str]], background: str,
          size: int = SIZE, tries: int = 200) -> Scene:
    """Random non-overlapping positions and sizes for (shape, colour) pairs."""
    for _ in range(tries):
        objs: list[Obj] = []
        for shape, colour in shapes:
            s = float(rng.uniform(0.14, 0.2) * size)
            cx, cy = (float(v) for v in rng.uniform(s + 1, size - s - 1, size=2))
            objs.append(Obj(shape, colour, cx, cy, s))
        ok = all((a.cx - b.cx) ** 2 + (a.cy - b.cy) ** 2 > (a.size + b.size) ** 2
                 for i, a in enumerate(objs) for b in objs[i + 1:])
        if ok:
            return Scene(tuple(objs), background)
    raise RuntimeError(f"could not place {shapes} without overlap in {tries} tries")


def random_scene(rng: np.random.Generator, max_objects: int = 2, min_objects: int = 0,
                 orange: float = 0.0) -> Scene:
    """A scene with min..max distinct base shapes in random colours on a random background.

    ``orange``: probability that an object is orange (0 in base data; the judge sees orange
    crosses, the target, and orange other shapes, which are not the target).
    """
    k = int(rng.integers(min_objects, max_objects + 1))
    chosen = list(rng.choice(len(BASE_SHAPES), size=k, replace=False))
    pairs = [(BASE_SHAPES[i], TARGET_COLOUR_NAME if rng.random() < orange else str(rng.choice(list(OBJECT_COLOURS))))
             for i in chosen]
    return place(rng, pairs, str(rng.choice(BG_NAMES)))


def render_batch(scenes: list[Scene]) -> np.ndarray:
    """Scenes -> float32 (N, 3, H, W) in [-1, 1]."""
    arr = np.stack([render(s) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return arr.transpose(0, 3, 1, 2)
