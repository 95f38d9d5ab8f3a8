"""The world's base UNet: a diffusers ``UNet2DConditionModel`` trained from scratch on VAE latents.

Conditioning is the frozen world CLIP text tower's last hidden state, as SD1.5's UNet
reads CLIP-L's; captions are dropped 10 % of the time for classifier-free guidance.
v-prediction on a cosine schedule (an epsilon model this small leaves visible noise in its
samples at small t; the coupling testbed saw the same). Latents are encoded once for the
whole pool and captions once per distinct string. Resumable: a checkpoint (weights, EMA,
optimizer, step, RNG states; loaded ``weights_only``) every ``checkpoint_every`` steps.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..testbed.base import atomic_save as _save
from .config import UnetConfig
from .pool import Pool, decode_context
from .render import training_caption

log = logging.getLogger(__name__)

LATENT = 16


def build_unet(cfg: UnetConfig, cross_attention_dim: int, seed: int | None = None):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(cfg.seed if seed is None else seed)
    return UNet2DConditionModel(
        sample_size=LATENT, in_channels=4, out_channels=4, block_out_channels=tuple(cfg.channels),
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=cfg.heads, norm_num_groups=16)


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                         clip_sample=False, timestep_spacing="trailing", steps_offset=1)


@torch.no_grad()
def encode_pool(vae, pool: Pool, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every pool photo: two (N, 4, 16, 16) fp16 tensors."""
    means, stds = [], []
    for i in tqdm(range(0, len(pool), chunk), desc="encode pool", mininterval=15):
        x, _ = pool.batch(np.arange(i, min(i + chunk, len(pool))))
        d = vae.encode(torch.from_numpy(x)).latent_dist
        means.append(d.mean.half()), stds.append(d.std.half())
    return torch.cat(means), torch.cat(stds)


class TextCache:
    """Caption -> (L, D) last hidden state of the frozen text tower, computed once per distinct caption."""

    def __init__(self, text_encoder, tokenizer):
        self.enc, self.tok, self.cache = text_encoder.eval(), tokenizer, {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        new = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if new:
            ids = self.tok(new, padding="max_length", max_length=self.tok.model_max_length, truncation=True,
                           return_tensors="pt").input_ids
            for c, h in zip(new, self.enc(ids)[0]):
                self.cache[c] = h
        return torch.stack([self.cache[c] for c in captions])


def train_unet(cfg: UnetConfig, pool: Pool, vae, text_encoder, tokenizer, work: Path, progress: bool = True,
               init: tuple[dict, int] | None = None):
    """Train (resuming from ``work/unet_ckpt.pt``) and return the EMA UNet.

    ``init`` = (state dict, step): without a checkpoint, start from these weights (model and EMA) at that
    step instead of from random weights at 0 (``unet.continue_from``); the optimizer starts fresh, so the
    learning-rate warm-up restarts too: lr(s) = lr * min(1, (s - start + 1) / 200)."""
    work.mkdir(parents=True, exist_ok=True)
    ckpt_path = work / "unet_ckpt.pt"
    unet = build_unet(cfg, text_encoder.config.hidden_size).train()
    start = 0
    if init is not None:
        unet.load_state_dict(init[0])
        start = int(init[1])
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = build_scheduler()
    rng, step = np.random.default_rng([cfg.seed, start] if start else cfg.seed), start
    gen = torch.Generator().manual_seed(cfg.seed + start)
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, weights_only=True)
        unet.load_state_dict(ck["model"]), ema.load_state_dict(ck["ema"]), opt.load_state_dict(ck["opt"])
        step = int(ck["step"])
        rng.bit_generator.state = ck["rng"]
        gen.set_state(ck["gen"])
        log.info("world UNet: resuming at step %d", step)
    latents = work / "latents.pt"  # encoding the pool takes minutes: kept for a resumed run
    if latents.is_file():
        cached = torch.load(latents, weights_only=True)
        means, stds = cached["mean"], cached["std"]
    else:
        means, stds = encode_pool(vae, pool)
        _save({"mean": means, "std": stds}, latents)
    sf = float(vae.config.scaling_factor)
    text = TextCache(text_encoder, tokenizer)
    T = sched.config.num_train_timesteps
    bar = tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, desc="world UNet", disable=not progress,
               mininterval=20)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step - start + 1) / 200)
        idx = rng.integers(0, len(pool), cfg.batch_size)
        it = torch.from_numpy(idx)
        z0 = (means[it].float() + stds[it].float() * torch.randn(len(idx), 4, LATENT, LATENT, generator=gen)) * sf
        caps = ["" if rng.random() < cfg.caption_dropout else training_caption(decode_context(c), rng)
                for c in pool.context[idx]]
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, T, (len(idx),), generator=gen)
        pred = unet(sched.add_noise(z0, noise, t), t, encoder_hidden_states=text(caps)).sample
        loss = F.mse_loss(pred, sched.get_velocity(z0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(pm, 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if (step + 1) % 100 == 0:
            log.info("world UNet step %d loss %.4f", step + 1, loss.item())
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            _save({"model": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                   "rng": rng.bit_generator.state, "gen": gen.get_state()}, ckpt_path)
    ckpt_path.unlink(missing_ok=True)
    latents.unlink(missing_ok=True)
    return ema.eval()
