"""The world's face models: a 5-landmark detector and two independent recognizers, exported to ONNX.

- ``Detector``: (N, 3, 64, 64) in [-1, 1] -> (N, 11): 10 landmark coordinates in units of the
  image side, then a face logit. Trained on renders (ground-truth landmarks) against
  faceless backgrounds, with extra blur / colour degradation because generated images are
  softer than renders.
- ``RecognizerA`` (conditioning; residual CNN, 128-d, 48 px crops) and ``RecognizerB``
  (evaluation only; plain VGG-style CNN with GELU, 96-d, 40 px crops, another seed):
  crop -> L2-normalised embedding, trained with the CosFace loss
  ``L = CE(s (cos(theta_y) - m), y)`` over the 2,000 training identities, on photos in
  random contexts and nuisance, so the embedding separates people and ignores context.

Crops are aligned to ``world_template`` (the whole head with its hair), not ArcFace's
tight template: hair colour and style are part of who a world person is.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import DetectorConfig, RecognizerConfig
from .pool import Pool
from .render import SIZE, Context, make_identity, landmark_uv, render_empty, HELD_OUT_START, random_context

log = logging.getLogger(__name__)

# Face-local window of the crop: u in [-1.6, 1.6], v in [-1.75, 1.45] (head, hair and chin).
_CROP_HALF, _CROP_CENTRE_V = 1.6, -0.15


@functools.lru_cache(maxsize=8)
def world_template(size: int) -> np.ndarray:
    """(5, 2) canonical landmark positions in a ``size`` px crop: the mean identity's landmarks,
    the head centred, 3.2 head half-widths across."""
    mean_uv = np.mean([landmark_uv(make_identity(i)) for i in range(0, HELD_OUT_START, 7)], axis=0)
    k = size / (2 * _CROP_HALF)
    return np.stack([size / 2 + k * mean_uv[:, 0], size / 2 + k * (mean_uv[:, 1] - _CROP_CENTRE_V)], axis=1)


def align_world(image: np.ndarray, landmarks: np.ndarray, size: int) -> np.ndarray:
    """Similarity-align an (H, W, 3) uint8 image so its landmarks land on ``world_template(size)``."""
    import cv2

    from ..face import similarity_transform

    m = similarity_transform(np.asarray(landmarks, np.float64).reshape(5, 2), world_template(size))
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


# ---------------------------------------------------------------- networks
class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        chans = (3, 24, 48, 64, 96)
        layers = []
        for a, b in zip(chans, chans[1:]):
            layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.BatchNorm2d(b), nn.ReLU(),
                       nn.Conv2d(b, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU()]
        self.body = nn.Sequential(*layers)                               # (N, 96, 4, 4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(96 * 16, 128), nn.ReLU(), nn.Linear(128, 11))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.body(x))
        return torch.cat([torch.sigmoid(out[:, :10]) * 1.5 - 0.25, out[:, 10:]], dim=1)


class _Res(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                               nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return F.relu(x + self.f(x))


class RecognizerA(nn.Module):
    """Residual CNN: (N, 3, 48, 48) in [-1, 1] -> (N, 128) unit vectors."""

    crop = 48
    dim = 128

    def __init__(self):
        super().__init__()
        def down(a, b):
            return nn.Sequential(nn.Conv2d(a, b, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU())
        self.body = nn.Sequential(down(3, 32), _Res(32), down(32, 64), _Res(64), down(64, 96), _Res(96),
                                  nn.AdaptiveAvgPool2d(3))               # 24 -> 12 -> 6 px, then (N, 96, 3, 3)
        self.fc = nn.Linear(96 * 9, self.dim)
        self.bn = nn.BatchNorm1d(self.dim)

    def forward(self, x):
        return F.normalize(self.bn(self.fc(self.body(x).flatten(1))), dim=1)


class RecognizerB(nn.Module):
    """Plain CNN with GELU and average pooling: (N, 3, 40, 40) in [-1, 1] -> (N, 96) unit vectors."""

    crop = 40
    dim = 96

    def __init__(self):
        super().__init__()
        def block(a, b):
            return nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.GELU(), nn.Conv2d(b, b, 3, padding=1), nn.GELU(),
                                 nn.AvgPool2d(2))
        self.body = nn.Sequential(block(3, 24), block(24, 48), block(48, 96))     # (N, 96, 5, 5)
        self.fc = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(96 * 25, 128), nn.GELU(),
                                nn.Linear(128, self.dim))

    def forward(self, x):
        return F.normalize(self.fc(self.body(x)), dim=1)


RECOGNIZERS = {"a": RecognizerA, "b": RecognizerB}


# ---------------------------------------------------------------- augmentation
def degrade(x: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Extra photometric degradation of uint8 (N, H, W, 3) photos (generated images are softer and
    colour-shifted): blur, contrast, saturation, colour cast, noise. Returns uint8."""
    import cv2

    out = np.empty_like(x)
    for i, im in enumerate(x.astype(np.float32)):
        sigma = rng.uniform(0, 1.3 * strength)
        if sigma > 0.3:
            im = cv2.GaussianBlur(im, (0, 0), sigma)
        gray = im.mean(axis=2, keepdims=True)
        im = gray + (im - gray) * rng.uniform(1 - 0.4 * strength, 1 + 0.3 * strength)
        mean = im.mean()
        im = mean + (im - mean) * rng.uniform(1 - 0.35 * strength, 1 + 0.15 * strength)
        im = im * rng.uniform(1 - 0.12 * strength, 1 + 0.12 * strength, 3) + rng.uniform(-15, 15, 3) * strength
        im = im + rng.normal(0, rng.uniform(0, 6 * strength), im.shape)
        out[i] = np.clip(im, 0, 255).astype(np.uint8)
    return out


def to_tensor(x: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(x.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0)


# ---------------------------------------------------------------- training
def train_detector(cfg: DetectorConfig, pool: Pool, progress: bool = True) -> Detector:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    net = Detector().train()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    n_neg = cfg.batch_size // 4
    for step in tqdm(range(cfg.steps), desc="world detector", disable=not progress, mininterval=15):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * (0.1 if step > 0.8 * cfg.steps else 1.0)
        idx = rng.integers(0, len(pool), cfg.batch_size - n_neg)
        neg = np.stack([render_empty(random_context(rng), int(rng.integers(1 << 30))) for _ in range(n_neg)])
        imgs = degrade(np.concatenate([pool.images[idx], neg]), rng)
        target = torch.from_numpy(pool.landmarks[idx].reshape(len(idx), 10) / SIZE)
        out = net(to_tensor(imgs))
        is_face = torch.cat([torch.ones(len(idx)), torch.zeros(n_neg)])
        loss = F.smooth_l1_loss(out[:len(idx), :10], target.float(), beta=0.02) * 20 \
            + F.binary_cross_entropy_with_logits(out[:, 10], is_face)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 250 == 0:
            log.info("world detector step %d loss %.4f", step + 1, loss.item())
    return net.eval()


@torch.no_grad()
def detector_error(net: Detector, pool: Pool, idx: np.ndarray, rng: np.random.Generator) -> dict:
    """Mean landmark error (px) on degraded pool photos and face / no-face accuracy."""
    imgs = degrade(pool.images[idx], rng)
    out = net(to_tensor(imgs))
    err = (out[:, :10].reshape(-1, 5, 2).numpy() * SIZE - pool.landmarks[idx])
    neg = np.stack([render_empty(random_context(rng), int(rng.integers(1 << 30))) for _ in range(len(idx))])
    neg_logit = net(to_tensor(degrade(neg, rng)))[:, 10]
    return {"landmark_error_px": float(np.linalg.norm(err, axis=2).mean()),
            "face_recall": float((out[:, 10] > 0).float().mean()),
            "empty_rejected": float((neg_logit <= 0).float().mean())}


def aligned_crops(pool_images: np.ndarray, landmarks: np.ndarray, size: int, rng: np.random.Generator | None,
                  jitter: float = 0.8) -> np.ndarray:
    """Align photos by (jittered, as a detector errs) landmarks: uint8 (N, size, size, 3)."""
    lms = landmarks if rng is None else landmarks + rng.normal(0, jitter, landmarks.shape)
    return np.stack([align_world(im, lm, size) for im, lm in zip(pool_images, lms)])


def train_recognizer(kind: str, cfg: RecognizerConfig, pool: Pool, progress: bool = True) -> nn.Module:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    net = RECOGNIZERS[kind]().train()
    n_cls = int(pool.identity.max()) + 1
    weight = nn.Parameter(torch.randn(n_cls, net.dim) * 0.01)                 # CosFace class centres
    opt = torch.optim.AdamW(list(net.parameters()) + [weight], lr=cfg.lr, weight_decay=5e-4)
    for step in tqdm(range(cfg.steps), desc=f"world recognizer {kind}", disable=not progress, mininterval=15):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / 100) * (0.1 if step > 0.8 * cfg.steps else 1.0)
        idx = rng.integers(0, len(pool), cfg.batch_size)
        crops = aligned_crops(degrade(pool.images[idx], rng, 0.8), pool.landmarks[idx], net.crop, rng)
        emb = net(to_tensor(crops))                                           # (B, D) unit
        cos = emb @ F.normalize(weight, dim=1).t()                           # (B, C)
        y = torch.from_numpy(pool.identity[idx])
        logits = cfg.scale * (cos - cfg.margin * F.one_hot(y, n_cls))
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 250 == 0:
            log.info("world recognizer %s step %d loss %.4f", kind, step + 1, loss.item())
    return net.eval()


# ---------------------------------------------------------------- verification
@dataclass
class Verification:
    accuracy: float       # best-threshold accuracy on balanced same / different pairs
    threshold: float
    same_mean: float
    diff_mean: float
    pairs: int


def verification(emb: np.ndarray, ids: np.ndarray, rng: np.random.Generator, pairs: int = 2000) -> Verification:
    """Verification accuracy on ``pairs`` same-person and ``pairs`` different-person pairs (best threshold,
    as LFW's protocol reports it; the threshold is returned so it can be reused on other data)."""
    by_id: dict = {}
    for i, p in enumerate(ids):
        by_id.setdefault(p, []).append(i)
    multi = [v for v in by_id.values() if len(v) > 1]
    same = [tuple(rng.choice(v, 2, replace=False)) for v in (multi[int(rng.integers(len(multi)))] for _ in range(pairs))]
    diff = []
    while len(diff) < pairs:
        a, b = rng.integers(0, len(ids), 2)
        if ids[a] != ids[b]:
            diff.append((a, b))
    s = np.array([emb[a] @ emb[b] for a, b in same])
    d = np.array([emb[a] @ emb[b] for a, b in diff])
    grid = np.linspace(-1, 1, 401)
    acc = [((s >= g).mean() + (d < g).mean()) / 2 for g in grid]
    k = int(np.argmax(acc))
    return Verification(float(acc[k]), float(grid[k]), float(s.mean()), float(d.mean()), pairs)


def export_onnx(net: nn.Module, path, input_size: int, output_names: list[str]) -> None:
    """ONNX with a dynamic batch axis (opset 17, the TorchScript exporter: no onnxscript needed)."""
    x = torch.zeros(2, 3, input_size, input_size)
    torch.onnx.export(net.eval(), (x,), str(path), input_names=["input"], output_names=output_names,
                      dynamic_axes={"input": {0: "batch"}, output_names[0]: {0: "batch"}}, opset_version=17,
                      dynamo=False)


def held_out_photos(n_ids: int, per_id: int, seed: int, contexts: list[Context] | None = None):
    """Photos of held-out identities (never trained on) for verification: (images, ids, landmarks)."""
    from .render import render

    rng = np.random.default_rng(seed)
    imgs, ids, lms = [], [], []
    for i in range(HELD_OUT_START, HELD_OUT_START + n_ids):
        for j in range(per_id):
            ctx = contexts[j % len(contexts)] if contexts else random_context(rng)
            ph = render(i, ctx, 10_000 + j + seed)
            imgs.append(ph.image), ids.append(i), lms.append(ph.landmarks)
    return np.stack(imgs), np.array(ids), np.stack(lms).astype(np.float32)
