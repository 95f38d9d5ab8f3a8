"""The world judge: which context a generated image shows, and coarse attributes of the person in it.

Heads: background, shirt, accessory, framing (what prompts name: prompt alignment and
coupling are read off these) and skin tone, hair colour, hair style, facial hair (never
prompted: their spread over unconditioned draws says how varied the base model's people
are). Trained on renders with the recognizers' extra degradation, because generated
images are softer and colour-shifted.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import JudgeConfig
from .face_models import degrade, to_tensor
from .pool import CONTEXT_FIELDS, Pool
from .render import FACIAL_HAIR, HAIR_COLOURS, HAIR_STYLES, SKIN_TONES, make_identity

log = logging.getLogger(__name__)

IDENTITY_FIELDS = {"skin": tuple(range(len(SKIN_TONES))), "hair_colour": tuple(HAIR_COLOURS),
                   "hair_style": HAIR_STYLES, "facial_hair": FACIAL_HAIR}
HEADS = {**{k: len(v) for k, v in CONTEXT_FIELDS.items()}, **{k: len(v) for k, v in IDENTITY_FIELDS.items()}}


def identity_codes(index: int) -> np.ndarray:
    ident = make_identity(index)
    return np.array([ident.skin_index, list(HAIR_COLOURS).index(ident.hair_colour),
                     HAIR_STYLES.index(ident.hair_style), FACIAL_HAIR.index(ident.facial_hair)], np.int64)


class Judge(nn.Module):
    """(N, 3, 64, 64) in [-1, 1] -> {head: logits (N, classes)}."""

    def __init__(self, width: int = 32):
        super().__init__()
        c = width
        def block(a, b):
            return nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(),
                                 nn.Conv2d(b, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2))
        self.body = nn.Sequential(block(3, c), block(c, 2 * c), block(2 * c, 2 * c), block(2 * c, 4 * c))  # 4x4
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(4 * c * 16, 256), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(256, n) for k, n in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.fc(self.body(x))
        return {k: head(h) for k, head in self.heads.items()}


def labels(pool: Pool, idx: np.ndarray) -> dict[str, torch.Tensor]:
    ids = np.stack([identity_codes(int(i)) for i in pool.identity[idx]])
    out = {k: torch.from_numpy(pool.context[idx, j]) for j, k in enumerate(CONTEXT_FIELDS)}
    out.update({k: torch.from_numpy(ids[:, j]) for j, k in enumerate(IDENTITY_FIELDS)})
    return out


def train_judge(cfg: JudgeConfig, pool: Pool, progress: bool = True) -> Judge:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    net = Judge().train()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    for step in tqdm(range(cfg.steps), desc="world judge", disable=not progress, mininterval=15):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * (0.1 if step > 0.8 * cfg.steps else 1.0)
        idx = rng.integers(0, len(pool), cfg.batch_size)
        out = net(to_tensor(degrade(pool.images[idx], rng, 1.2)))
        y = labels(pool, idx)
        loss = sum(F.cross_entropy(out[k], y[k]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 250 == 0:
            log.info("world judge step %d loss %.4f", step + 1, loss.item())
    return net.eval()


@torch.no_grad()
def predict(net: Judge, images_uint8: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
    """{head: (N, classes) probabilities} for uint8 (N, 64, 64, 3) images."""
    outs: dict[str, list] = {k: [] for k in HEADS}
    for i in range(0, len(images_uint8), batch):
        for k, v in net(to_tensor(images_uint8[i:i + batch])).items():
            outs[k].append(F.softmax(v, dim=1).numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


def accuracy(net: Judge, images: np.ndarray, truth: dict[str, np.ndarray]) -> dict[str, float]:
    probs = predict(net, images)
    return {k: float((probs[k].argmax(1) == truth[k]).mean()) for k in truth}
