"""Held-out denoising loss of an identity adapter: does it help the frozen UNet denoise people it never saw?

    L(adapter) = mean_i || f(x_t_i, t_i, caption_i, E(id_i)) - target_i ||^2

over shard samples of held-out identities, with the trainer's own batch preparation
(the per-sample generators fix noise, t and VAE draws by sample key, so every adapter
sees exactly the same x_t) and no condition dropout. ``adapter=None`` is the untrained
adapter: the trainer's initial weights for ``cfg.seed``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..config import load_config
from ..train.config import TrainConfig


@torch.no_grad()
def heldout_loss(config: str, shards: str, adapter: str | None = None, batches: int = 4, batch_size: int = 16,
                 overrides: list[str] | None = None) -> float:
    from .. import losses
    from ..adapter import load_adapter_state_dict, load_into_training
    from ..data import build_dataset, collate
    from ..train.models import build_model, load_frozen_parts
    from ..train.step import prepare_batch

    cfg = load_config(TrainConfig, config, [f"shards={shards}", *(overrides or [])])
    cfg = dataclasses.replace(cfg, dropout=dataclasses.replace(cfg.dropout, identity=0.0, caption=0.0, both=0.0))
    device = torch.device("cpu")
    parts = load_frozen_parts(cfg, device, torch.float32, with_clip=False)
    model = build_model(cfg, parts).eval()
    if adapter is not None:
        load_into_training(load_adapter_state_dict(adapter), model.encoder, model.unet)
    ds = build_dataset(shards, resolution=cfg.resolution, shuffle_buffer=0, split_by_node=False,
                       split_by_worker=False)
    total, n, buf = 0.0, 0, []
    for sample in ds:
        buf.append(sample)
        if len(buf) < batch_size:
            continue
        sb = prepare_batch(collate(buf), parts, cfg, 0, device, torch.float32)
        buf = []
        pred, _ = model(sb.noisy, sb.timesteps, sb.text, sb.id_embeds)
        target = losses.denoising_target(parts.scheduler, sb.x0, sb.noise, sb.timesteps)
        total += float(F.mse_loss(pred.float(), target.float())) * len(sb.keys)
        n += len(sb.keys)
        if n >= batches * batch_size:
            break
    if n == 0:
        raise ValueError(f"{shards}: fewer than {batch_size} samples")
    return total / n
