"""The judge: a small CNN that says which shapes are in an image, whether the target (an orange
cross, ``sks``) is among them, and what the background is.

Trained on renders with heavy augmentation (desaturation, colour cast, contrast
loss, blur, noise) because generated images are washed out, noisy and blurry,
and a judge trained on clean renders misses them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from accord_face.testbed.base import load_state, save_state
from accord_face.testbed.config import JudgeConfig
from accord_face.testbed.world import BG_NAMES, LABELS, random_scene, render_batch

log = logging.getLogger(__name__)


class Judge(nn.Module):
    """images (N, 3, 32, 32) in [-1, 1] -> (label logits (N, len(LABELS)), background logits (N, len(BG_NAMES)))."""

    def __init__(self, width: int = 32):
        super().__init__()
        c = width
        self.body = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                                     # 16 x 16
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                                     # 8 x 8
            nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.ReLU(),
        )
        self.shape_head = nn.Conv2d(2 * c, len(LABELS), 1)   # per-location evidence, max-pooled: "anywhere"
        self.bg_head = nn.Linear(2 * c, len(BG_NAMES))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)                                        # (N, 2c, 8, 8)
        shapes = self.shape_head(h).flatten(2).amax(dim=2)      # (N, S)
        return shapes, self.bg_head(h.mean(dim=(2, 3)))


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Heavy photometric degradation of a batch in [-1, 1] (each image its own strengths)."""
    n = x.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    gray = x.mean(dim=1, keepdim=True)
    # saturation x0.3 .. x1.6: fine-tuned models also over-saturate (a bright green read as purple by v1)
    x = gray + (x - gray) * (0.3 + 1.3 * u(n, 1, 1, 1))
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + (x - mean) * (0.45 + 0.6 * u(n, 1, 1, 1))                          # contrast
    x = x * (0.75 + 0.5 * u(n, 3, 1, 1)) + 0.35 * (u(n, 3, 1, 1) - 0.5)           # colour cast
    x = x + 0.7 * (u(n, 1, 1, 1) - 0.5)                                          # brightness
    sigma = 1.3 * u(n)                                                           # blur
    k = torch.arange(-2, 3, dtype=torch.float32)
    ker = torch.exp(-k[None] ** 2 / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
    ker = ker / ker.sum(dim=1, keepdim=True)                                     # (N, 5)
    xb = x.reshape(1, n * 3, *x.shape[2:])
    kh = ker.repeat_interleave(3, 0)[:, None, None, :]                           # (3N, 1, 1, 5)
    xb = F.conv2d(F.pad(xb, (2, 2, 0, 0), mode="replicate"), kh, groups=3 * n)
    xb = F.conv2d(F.pad(xb, (0, 0, 2, 2), mode="replicate"), kh.transpose(2, 3), groups=3 * n)
    x = xb.reshape_as(x)
    x = x + 0.25 * u(n, 1, 1, 1) * torch.randn(x.shape, generator=gen)            # noise
    return x.clamp(-1.2, 1.2)


def judge_batch(rng: np.random.Generator, n: int, orange: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """n scenes with 0-3 base shapes, each orange with probability ``orange`` (an orange cross is the
    target; an orange square is only a square) -> images, labels (N, len(LABELS) + 1)."""
    scenes = [random_scene(rng, max_objects=3, orange=orange) for _ in range(n)]
    return torch.from_numpy(render_batch(scenes)), torch.from_numpy(np.stack([s.labels() for s in scenes]))


def judge_loss(j: Judge, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    s, b = j(x)
    return F.binary_cross_entropy_with_logits(s, y[:, :-1]) + F.cross_entropy(b, y[:, -1].long())


@torch.no_grad()
def probabilities(j: Judge, x: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """images -> (label probabilities (N, len(LABELS)) = sigmoid, background probabilities (N, BG) = softmax)."""
    outs = [j(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)]
    return torch.sigmoid(torch.cat([o[0] for o in outs])), torch.softmax(torch.cat([o[1] for o in outs]), dim=1)


@torch.no_grad()
def predict(j: Judge, x: torch.Tensor, threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """images -> (present (N, len(LABELS)) bool, background index (N,))."""
    p, b = probabilities(j, x)
    return p > threshold, b.argmax(dim=1)


def accuracy(j: Judge, x: torch.Tensor, y: torch.Tensor, threshold: float = 0.5) -> dict[str, float]:
    """Per-label accuracy (shape presence, background) and the all-labels-right rate."""
    present, bg = predict(j.eval(), x, threshold)
    shape_ok = present == (y[:, :-1] > 0.5)                          # (N, S)
    bg_ok = bg == y[:, -1].long()
    out = {f"label_{name}": float(shape_ok[:, i].float().mean()) for i, name in enumerate(LABELS)}
    out["background"] = float(bg_ok.float().mean())
    out["all_labels"] = float((shape_ok.all(dim=1) & bg_ok).float().mean())
    return out


def train_judge(cfg: JudgeConfig, cache: Path) -> tuple[Judge, dict[str, dict[str, float]]]:
    """Train (or load) the judge; returns it with held-out accuracy on clean and augmented renders."""
    path = cache / f"judge_v{cfg.version}.safetensors"
    torch.manual_seed(cfg.seed)
    j = Judge()
    gen = torch.Generator().manual_seed(cfg.seed)
    if path.exists():
        j.load_state_dict(load_state(path))
    else:
        rng = np.random.default_rng(cfg.seed)
        opt = torch.optim.Adam(j.parameters(), lr=cfg.lr)
        for step in tqdm(range(cfg.steps), desc="judge", mininterval=30):
            for g in opt.param_groups:
                g["lr"] = cfg.lr * 0.5 * (1 + np.cos(np.pi * step / cfg.steps))
            x, y = judge_batch(rng, cfg.batch_size, cfg.orange)
            x = torch.where(torch.rand(x.shape[0], 1, 1, 1, generator=gen) < 0.85, augment(x, gen), x)
            loss = judge_loss(j, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if (step + 1) % 250 == 0:
                log.info("judge step %d loss %.4f", step + 1, loss.item())
        save_state(j.state_dict(), path)
    rng = np.random.default_rng(10_000 + cfg.seed)  # held-out scenes: a seed never used for training
    x, y = judge_batch(rng, cfg.eval_renders, cfg.orange)
    report = {"clean_renders": accuracy(j, x, y, cfg.threshold),
              "augmented_renders": accuracy(j, augment(x, gen), y, cfg.threshold)}
    return j.eval(), report
