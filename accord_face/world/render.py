"""The identity world's renderer: procedural 64 px portraits of synthetic people.

A portrait is a pure function of ``(identity, context, photo seed)``:

- **identity** (``Identity``, drawn from the identity number alone, never named in a
  caption): skin tone, head shape and proportions, hair colour and style, eye colour,
  size and spacing, brows, nose, mouth, ears and facial hair;
- **context** (``Context``, named in the caption from a small grammar): background
  colour, shirt colour, an accessory (hat, glasses or none) and the framing
  (``a photo`` or ``a close up photo``);
- **nuisance** (from the photo seed): head position / size / tilt jitter, light
  direction, colour tint, brightness, blur and sensor noise, so that two photos of
  one person differ as two real photos do.

Captions read like Stable Diffusion's: "a photo of a person wearing a red shirt and
a hat on a blue background". The base model learns "a person", never a particular one.

Geometry lives in face-local units: ``u`` right, ``v`` down, the head's half-width
is 1 and its centre is the origin. ``landmarks`` gives the 5 points in the ArcFace
order (image-left eye, image-right eye, nose tip, mouth left, mouth right).
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass

import numpy as np

SIZE = 64          # image side, px
SUPERSAMPLE = 2    # rendered at 2x and box-filtered down (anti-aliased edges)

N_IDENTITIES = 2400
HELD_OUT_START = 2000  # identities >= this are held out of every training set (base, adapter, recognizers)

# ---------------------------------------------------------------- identity palettes (never in captions)
SKIN_TONES = ((255, 224, 196), (241, 194, 155), (224, 172, 120), (198, 134, 90),
              (161, 102, 66), (120, 75, 45), (88, 56, 38), (236, 188, 170))
HAIR_COLOURS = {"black": (25, 20, 20), "dark brown": (62, 40, 28), "brown": (110, 72, 40),
                "auburn": (140, 58, 35), "blond": (228, 192, 110), "ginger": (205, 96, 38),
                "gray": (150, 150, 152), "platinum": (238, 232, 214)}
HAIR_STYLES = ("bald", "short", "long", "bob", "curly", "mohawk", "side part")
EYE_COLOURS = {"brown": (95, 58, 28), "blue": (55, 110, 200), "green": (60, 145, 75), "gray": (125, 138, 150)}
FACIAL_HAIR = ("none", "moustache", "beard", "goatee")
LIP_COLOURS = ((170, 70, 70), (150, 80, 90), (120, 55, 50), (190, 100, 100))

# ---------------------------------------------------------------- context vocabulary (named in captions)
BACKGROUNDS = {"blue": (60, 100, 200), "green": (60, 160, 70), "red": (200, 55, 50),
               "yellow": (230, 205, 60), "purple": (130, 60, 160), "gray": (128, 128, 128)}
SHIRTS = {"red": (200, 35, 40), "blue": (35, 60, 190), "green": (35, 140, 55),
          "yellow": (235, 200, 30), "black": (28, 28, 30), "white": (242, 242, 242)}
ACCESSORIES = ("none", "hat", "glasses")
FRAMINGS = ("photo", "close up")
HAT_COLOUR = (45, 35, 30)
GLASSES_COLOUR = (20, 20, 25)

GRAMMAR_WORDS = tuple(sorted({"a", "photo", "close", "up", "of", "person", "wearing", "shirt", "and", "hat",
                              "glasses", "on", "background", *BACKGROUNDS, *SHIRTS}))
# Words that would describe a person (the grammar never uses them; "gray" is also a background colour).
IDENTITY_WORDS = tuple(sorted(({w for name in (*HAIR_COLOURS, *HAIR_STYLES, *EYE_COLOURS) for w in name.split()}
                               | {"hair", "eyes", "beard", "moustache", "goatee", "skin"}) - set(GRAMMAR_WORDS)))


@dataclass(frozen=True)
class Identity:
    """Everything that makes a person recognisable (face-local units, head half-width = 1)."""

    index: int
    skin: tuple[int, int, int]
    skin_index: int
    aspect: float        # head half-height / half-width
    squareness: float    # superellipse exponent: 2 = ellipse, larger = squarer
    jaw_taper: float     # how much the lower head narrows towards the chin
    hair_colour: str
    hair_style: str
    hairline: float      # v of the hairline
    eye_colour: str
    eye_size: float
    eye_spacing: float   # |u| of the eye centres
    eye_height: float    # v of the eye centres
    eye_narrow: float    # vertical / horizontal radius of the eye white
    brow_thickness: float
    brow_tilt: float     # radians, outer end up (> 0) or down
    nose_length: float
    nose_width: float
    mouth_width: float
    mouth_gap: float     # mouth below the nose tip
    lip: tuple[int, int, int]
    lip_thickness: float
    ear_size: float
    facial_hair: str

    @property
    def split(self) -> str:
        return "held_out" if self.index >= HELD_OUT_START else "train"


@dataclass(frozen=True)
class Context:
    """What a caption names."""

    background: str
    shirt: str
    accessory: str = "none"
    framing: str = "photo"

    def __post_init__(self):
        for value, options, name in ((self.background, BACKGROUNDS, "background"), (self.shirt, SHIRTS, "shirt"),
                                     (self.accessory, ACCESSORIES, "accessory"), (self.framing, FRAMINGS, "framing")):
            if value not in options:
                raise ValueError(f"context {name} {value!r} is not one of {list(options)}")

    def attributes(self) -> dict[str, str]:
        return {"background": self.background, "shirt": self.shirt, "accessory": self.accessory,
                "framing": self.framing}


def _rng(*keys: int | str) -> np.random.Generator:
    """A generator seeded by a stable hash of the keys (crc32, not hash(): same in every process)."""
    return np.random.default_rng([zlib.crc32(str(k).encode()) for k in keys])


@functools.lru_cache(maxsize=None)
def make_identity(index: int) -> Identity:
    """The person number ``index`` (deterministic: the same person every time)."""
    if not 0 <= index < N_IDENTITIES:
        raise ValueError(f"identity {index} outside 0..{N_IDENTITIES - 1}")
    r = _rng("identity", index)
    skin_index = int(r.integers(len(SKIN_TONES)))
    base = np.array(SKIN_TONES[skin_index], dtype=np.float64)
    skin = tuple(int(c) for c in np.clip(base + r.normal(0, 6, 3), 0, 255))
    style = HAIR_STYLES[int(r.integers(len(HAIR_STYLES)))]
    return Identity(
        index=index, skin=skin, skin_index=skin_index,
        aspect=float(r.uniform(1.12, 1.45)), squareness=float(r.choice([2.0, 2.0, 2.6, 3.2])),
        jaw_taper=float(r.uniform(0.0, 0.32)),
        hair_colour=str(r.choice(list(HAIR_COLOURS))), hair_style=style,
        hairline=float(r.uniform(-0.72, -0.45)),
        eye_colour=str(r.choice(list(EYE_COLOURS))), eye_size=float(r.uniform(0.8, 1.25)),
        eye_spacing=float(r.uniform(0.33, 0.46)), eye_height=float(r.uniform(-0.12, 0.06)),
        eye_narrow=float(r.uniform(0.45, 0.8)),
        brow_thickness=float(r.uniform(0.045, 0.11)), brow_tilt=float(r.uniform(-0.35, 0.35)),
        nose_length=float(r.uniform(0.30, 0.52)), nose_width=float(r.uniform(0.08, 0.17)),
        mouth_width=float(r.uniform(0.22, 0.44)), mouth_gap=float(r.uniform(0.16, 0.28)),
        lip=LIP_COLOURS[int(r.integers(len(LIP_COLOURS)))], lip_thickness=float(r.uniform(0.05, 0.11)),
        ear_size=float(r.uniform(0.85, 1.2)),
        facial_hair=str(r.choice(FACIAL_HAIR, p=[0.6, 0.14, 0.14, 0.12])),
    )


def random_context(rng: np.random.Generator) -> Context:
    return Context(background=str(rng.choice(list(BACKGROUNDS))), shirt=str(rng.choice(list(SHIRTS))),
                   accessory=str(rng.choice(ACCESSORIES, p=[0.5, 0.25, 0.25])),
                   framing=str(rng.choice(FRAMINGS, p=[0.65, 0.35])))


# ---------------------------------------------------------------- captions
def caption(ctx: Context, *, include_shirt: bool = True, include_background: bool = True,
            include_accessory: bool = True) -> str:
    """"a [close up] photo of a person [wearing a X shirt [and a hat | and glasses]] [on a Y background]"."""
    words = ["a close up photo" if ctx.framing == "close up" else "a photo", "of a person"]
    worn = []
    if include_shirt:
        worn.append(f"a {ctx.shirt} shirt")
    if include_accessory and ctx.accessory != "none":
        worn.append("a hat" if ctx.accessory == "hat" else "glasses")
    if worn:
        words.append("wearing " + " and ".join(worn))
    if include_background:
        words.append(f"on a {ctx.background} background")
    return " ".join(words)


def training_caption(ctx: Context, rng: np.random.Generator, p_omit: float = 0.15) -> str:
    """A truthful caption that sometimes leaves a phrase out (so partial prompts are in distribution)."""
    return caption(ctx, include_shirt=rng.random() >= p_omit, include_background=rng.random() >= p_omit,
                   include_accessory=rng.random() >= p_omit / 2)


# ---------------------------------------------------------------- drawing
@dataclass(frozen=True)
class Pose:
    """Where the head sits in the image (pixels) and how it is turned."""

    cx: float
    cy: float
    scale: float   # head half-width, px
    tilt: float    # radians, clockwise in image coordinates


def photo_pose(ctx: Context, rng: np.random.Generator, size: int = SIZE) -> Pose:
    close = ctx.framing == "close up"
    k = size / SIZE
    scale = (14.5 if close else 10.5) * float(rng.uniform(0.94, 1.06)) * k
    cx = size / 2 + float(rng.uniform(-3.5, 3.5)) * k
    cy = (31.0 if close else 27.0) * k + float(rng.uniform(-2.5, 2.5)) * k
    return Pose(cx, cy, scale, float(rng.uniform(-0.14, 0.14)))


def landmark_uv(ident: Identity) -> np.ndarray:
    """(5, 2) face-local landmarks: eyes (image left, right), nose tip, mouth corners (left, right)."""
    e, nose_v = ident.eye_height, ident.eye_height + ident.nose_length
    mouth_v = nose_v + ident.mouth_gap
    return np.array([[-ident.eye_spacing, e], [ident.eye_spacing, e], [0.0, nose_v],
                     [-ident.mouth_width / 2, mouth_v], [ident.mouth_width / 2, mouth_v]])


def uv_to_pixels(uv: np.ndarray, pose: Pose) -> np.ndarray:
    """Face-local (N, 2) -> image pixels (N, 2):  p = c + s R(tilt) (u, v)."""
    c, s = math.cos(pose.tilt), math.sin(pose.tilt)
    u, v = uv[:, 0], uv[:, 1]
    return np.stack([pose.cx + pose.scale * (c * u - s * v), pose.cy + pose.scale * (s * u + c * v)], axis=1)


def _shade(rgb, k: float) -> np.ndarray:
    return np.clip(np.asarray(rgb, dtype=np.float32) * k, 0, 255)


def _seg(u, v, a, b, width):
    """Points within ``width`` of the segment a-b (face-local units)."""
    (ax, ay), (bx, by) = a, b
    dx, dy = bx - ax, by - ay
    t = np.clip(((u - ax) * dx + (v - ay) * dy) / (dx * dx + dy * dy + 1e-12), 0, 1)
    return (u - ax - t * dx) ** 2 + (v - ay - t * dy) ** 2 <= width ** 2


def _ell(u, v, u0, v0, ru, rv):
    return ((u - u0) / ru) ** 2 + ((v - v0) / rv) ** 2 <= 1.0


def draw(ident: Identity, ctx: Context, pose: Pose, size: int = SIZE) -> np.ndarray:
    """The clean portrait (no photometric nuisance): float32 (size, size, 3) in [0, 255]."""
    n = size * SUPERSAMPLE
    ys, xs = (np.mgrid[0:n, 0:n].astype(np.float32) + 0.5) / SUPERSAMPLE
    img = np.empty((n, n, 3), dtype=np.float32)
    img[:] = BACKGROUNDS[ctx.background]
    s = pose.scale
    c, sn = math.cos(pose.tilt), math.sin(pose.tilt)
    dx, dy = xs - pose.cx, ys - pose.cy
    u, v = (c * dx + sn * dy) / s, (-sn * dx + c * dy) / s          # face-local coordinates
    A = ident.aspect
    skin, hair = np.array(ident.skin, np.float32), np.array(HAIR_COLOURS[ident.hair_colour], np.float32)

    # body: shoulders in the shirt colour, then the neck (image-aligned: the body does not tilt)
    bu, bv = dx / s, dy / s
    chin = pose.cy + A * s
    shoulders = (bv > A + 0.55) & (((bu / 2.3) ** 2 + ((bv - (A + 2.4)) / 1.9) ** 2) <= 1.0) | (bv > A + 2.3)
    img[shoulders] = SHIRTS[ctx.shirt]
    neck = (np.abs(bu) < 0.42) & (ys > pose.cy) & (ys < chin + 0.75 * s) & ~shoulders
    img[neck] = _shade(skin, 0.85)

    # hair behind the head
    style = ident.hair_style
    if style == "long":
        back = (np.abs(u) < 1.22) & (v > -A - 0.1) & (v < A + 0.7)
        back |= _ell(u, v, 0, -0.2, 1.22, A + 0.1)
        img[back] = hair
    elif style == "bob":
        img[_ell(u, v, 0, -0.1, 1.2, A * 0.95) | ((np.abs(u) < 1.2) & (v > -0.2) & (v < A * 0.6))] = hair
    elif style == "curly":
        img[_ell(u, v, 0, -0.45 * A, 1.55, 1.25 * A)] = hair

    # ears, then the head (a superellipse whose lower half narrows towards the chin)
    ey = ident.eye_height
    for side in (-1, 1):
        img[_ell(u, v, side * 1.0, ey + 0.15, 0.17 * ident.ear_size, 0.28 * ident.ear_size)] = _shade(skin, 0.92)
    taper = 1.0 - ident.jaw_taper * np.clip(v / A, 0, 1) ** 2
    p = ident.squareness
    head = (np.abs(u / taper) ** p + np.abs(v / A) ** p) <= 1.0
    img[head] = skin

    # hair on top of the head
    cap = _ell(u, v, 0, 0, 1.07, A * 1.04)
    if style in ("short", "long", "bob", "curly"):
        img[cap & (v < ident.hairline + (0.12 if style == "bob" else 0.0))] = hair
    elif style == "side part":
        img[cap & (v < ident.hairline + 0.28 * (u + 1.0) / 2 - 0.08)] = hair
    elif style == "mohawk":
        img[(np.abs(u) < 0.24) & (v > -A - 0.5) & (v < ident.hairline + 0.05) & (cap | (v < -A + 0.1))] = hair

    # eyes, brows, nose, mouth, facial hair
    lm = landmark_uv(ident)
    er = 0.16 * ident.eye_size
    iris = np.array(EYE_COLOURS[ident.eye_colour], np.float32)
    for side in (-1, 1):
        ex = side * ident.eye_spacing
        img[_ell(u, v, ex, ey, er, er * ident.eye_narrow)] = (245, 245, 240)
        img[_ell(u, v, ex, ey, er * 0.55, er * min(0.55, ident.eye_narrow))] = iris
        img[_ell(u, v, ex, ey, er * 0.25, er * 0.25)] = (15, 10, 10)
        by = ey - 0.2 - er * 0.3
        out = side * (ident.eye_spacing + 0.17)
        inner = side * (ident.eye_spacing - 0.15)
        img[_seg(u, v, (inner, by), (out, by - ident.brow_tilt * 0.3), ident.brow_thickness)] = _shade(hair, 0.7)
    tip = lm[2]
    nose = _seg(u, v, (0, ey + 0.08), (tip[0], tip[1]), ident.nose_width * 0.45)
    nose |= _ell(u, v, 0, tip[1], ident.nose_width, ident.nose_width * 0.6)
    img[nose] = _shade(skin, 0.78)
    mv = lm[3, 1]
    img[_ell(u, v, 0, mv, ident.mouth_width / 2, ident.lip_thickness)] = ident.lip
    if ident.facial_hair == "moustache":
        img[_ell(u, v, 0, (tip[1] + mv) / 2, ident.mouth_width / 2 + 0.06, 0.07)] = hair
    elif ident.facial_hair == "beard":
        img[head & (v > mv - 0.12) & ~_ell(u, v, 0, mv, ident.mouth_width / 2, ident.lip_thickness + 0.02)] = hair
    elif ident.facial_hair == "goatee":
        img[_ell(u, v, 0, (mv + A) / 2 + 0.05, 0.2, 0.17)] = hair

    # accessories
    if ctx.accessory == "glasses":
        for side in (-1, 1):
            ring = _ell(u, v, side * ident.eye_spacing, ey, 0.27, 0.22)
            ring &= ~_ell(u, v, side * ident.eye_spacing, ey, 0.2, 0.15)
            img[ring] = GLASSES_COLOUR
        img[_seg(u, v, (-ident.eye_spacing + 0.27, ey), (ident.eye_spacing - 0.27, ey), 0.035)] = GLASSES_COLOUR
    elif ctx.accessory == "hat":
        brim_v = min(ident.hairline, -0.45) - 0.05
        img[_ell(u, v, 0, brim_v, 1.45, 0.16)] = HAT_COLOUR
        img[(np.abs(u) < 0.95) & (v < brim_v) & (v > -A - 0.75)] = HAT_COLOUR
    return img.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))


def photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-photo nuisance on a float image: light direction, tint, brightness, blur, noise -> uint8."""
    import cv2

    size = img.shape[0]
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size - 0.5
    light = 1.0 + float(rng.uniform(0.0, 0.28)) * (math.cos(angle) * xx + math.sin(angle) * yy)
    img = img * light[..., None]
    img = img * rng.uniform(0.92, 1.08, 3).astype(np.float32) * float(rng.uniform(0.88, 1.12))
    sigma = float(rng.uniform(0.0, 0.9))
    if sigma > 0.25:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    img = img + rng.normal(0, float(rng.uniform(0, 5)), img.shape).astype(np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Photo:
    image: np.ndarray        # (SIZE, SIZE, 3) uint8 RGB
    identity: Identity
    context: Context
    pose: Pose
    landmarks: np.ndarray    # (5, 2) pixels

    @property
    def caption(self) -> str:
        return caption(self.context)


def render(identity: int | Identity, context: Context, photo_seed: int, size: int = SIZE) -> Photo:
    """One photo of ``identity`` in ``context``; nuisance drawn from ``photo_seed`` (deterministic)."""
    ident = identity if isinstance(identity, Identity) else make_identity(identity)
    rng = _rng("photo", ident.index, photo_seed, context.background, context.shirt, context.accessory,
               context.framing)
    pose = photo_pose(context, rng, size)
    image = photometric(draw(ident, context, pose, size), rng)
    return Photo(image, ident, context, pose, uv_to_pixels(landmark_uv(ident), pose))


def render_empty(context: Context, photo_seed: int, size: int = SIZE) -> np.ndarray:
    """A background-only photo (no person): the detector's negatives."""
    rng = _rng("empty", photo_seed, context.background)
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = BACKGROUNDS[context.background]
    if rng.random() < 0.5:  # a shirt-coloured blob at the bottom, as in portraits
        yy, xx = np.mgrid[0:size, 0:size]
        img[((xx - size / 2) / (0.6 * size)) ** 2 + ((yy - size) / (0.35 * size)) ** 2 <= 1] = SHIRTS[context.shirt]
    return photometric(img, rng)
