"""Validation grids: fixed faces x fixed prompts (rows) at a few adapter scales (columns).

Sampling uses the training wrapper itself (so it also runs under ZeRO-3, where
every rank must take part in each forward) with a DDIM scheduler built from the
training scheduler's config and classifier-free guidance whose unconditional
branch is the empty caption + zero identity, exactly as the exported adapter
is used through diffusers (``adapter.identity_image_embeds``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import adapter
from .models import FrozenParts, encode_text, sdxl_time_ids

__all__ = ["sample_images", "save_grid"]


@torch.no_grad()
def sample_images(model, parts: FrozenParts, prompts: list[str], id_embeds: torch.Tensor, scale: float,
                  steps: int, guidance: float, resolution: int, seed: int, device: torch.device,
                  clip: torch.Tensor | None = None) -> np.ndarray:
    """prompts[i] with identity id_embeds[i] -> uint8 images (N, R, R, 3).

    FaceID-Plus: ``clip`` (N, n, L, H) CLIP face states; the negative branch gets the dropped identity's
    CLIP states (``parts.image_encoder.null_embeds()``), as training and ``accord-face generate`` do.
    """
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(parts.scheduler.config)
    sched.set_timesteps(steps, device=device)
    unet = model.unet
    adapter.set_ip_scale(unet, scale)
    n = len(prompts)
    # Negative branch first, as diffusers lays out CFG batches: ("" + zero identity, prompt + identity);
    # the zeros are what adapter.identity_image_embeds feeds a pipeline's negative branch.
    text, pooled = encode_text(parts, [""] * n + list(prompts), device)               # (2N, L, cad)
    ids = torch.cat([torch.zeros_like(id_embeds), id_embeds]).float().to(device)       # (2N, D)
    extra = {}
    if clip is not None:
        null = parts.image_encoder.null_embeds().float()[None].expand(*clip.shape[:2], -1, -1)
        extra = {"clip_embeds": torch.cat([null, clip.float()]).to(device)}          # (2N, n, L, H)
    added = {"text_embeds": pooled, "time_ids": sdxl_time_ids(2 * n, resolution, device)} if parts.is_sdxl else None
    vae_scale = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    gen = torch.Generator().manual_seed(seed)
    shape = (n, unet.config.in_channels, resolution // vae_scale, resolution // vae_scale)
    latents = (torch.randn(shape, generator=gen) * sched.init_noise_sigma).to(device)
    for t in sched.timesteps:
        x = torch.cat([latents, latents])
        pred, _ = model(x, t.expand(2 * n).to(device), text, ids, added, **extra)
        uncond, cond = pred.float().chunk(2)
        latents = sched.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    vae = parts.vae
    images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample.float()
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def save_grid(columns: list[np.ndarray], path: Path) -> Path:
    """Columns of (N, R, R, 3) images -> one PNG (rows = samples), written atomically."""
    grid = np.concatenate([np.concatenate(list(col), axis=0) for col in columns], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    Image.fromarray(grid).save(tmp)
    tmp.replace(path)
    return path
