"""The world's ``AutoencoderKL``: 64 px RGB <-> 16 x 16 x 4 latents, trained from scratch.

Fully convolutional (no mid-block attention), so it trains on 32 px crops (4x cheaper)
and runs on whole 64 px images. Loss: L1 reconstruction + ``kl_weight`` KL, as SD's
autoencoder without the perceptual and adversarial terms. ``scaling_factor`` is set
after training to 1 / std of the latents, as SD's 0.18215 was.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import VaeConfig
from .pool import Pool
from .render import SIZE

log = logging.getLogger(__name__)


def build_vae(cfg: VaeConfig, seed: int | None = None):
    from diffusers import AutoencoderKL

    torch.manual_seed(cfg.seed if seed is None else seed)
    n = len(cfg.channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(cfg.channels),
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         layers_per_block=1, norm_num_groups=16, sample_size=SIZE, mid_block_add_attention=False,
                         scaling_factor=1.0)


def train_vae(cfg: VaeConfig, pool: Pool, progress: bool = True):
    vae = build_vae(cfg).train()
    rng = np.random.default_rng(cfg.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    bar = tqdm(range(cfg.steps), desc="world VAE", disable=not progress, mininterval=15)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / 100) * (0.1 if step > 0.8 * cfg.steps else 1.0)
        idx = rng.integers(0, len(pool), cfg.batch_size)
        x, _ = pool.batch(idx)
        oy, ox = (int(v) for v in rng.integers(0, SIZE - 32 + 1, 2) // 4 * 4)  # crops on the latent grid
        x = torch.from_numpy(np.ascontiguousarray(x[:, :, oy:oy + 32, ox:ox + 32]))
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample()).sample
        loss = (rec - x).abs().mean() + cfg.kl_weight * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if (step + 1) % 250 == 0:
            log.info("world VAE step %d loss %.4f", step + 1, loss.item())
    vae.eval()
    with torch.no_grad():
        x, _ = pool.batch(rng.integers(0, len(pool), 256))
        z = vae.encode(torch.from_numpy(x)).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    return vae


@torch.no_grad()
def reconstruction_error(vae, pool: Pool, idx: np.ndarray) -> float:
    """Mean absolute error (0-255 scale) of encode-mean -> decode on full 64 px photos."""
    x, _ = pool.batch(idx)
    x = torch.from_numpy(x)
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return float((rec - x).abs().mean() * 127.5)
