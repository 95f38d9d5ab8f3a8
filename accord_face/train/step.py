"""One training step's loss assembly: base denoising loss + lambda_dd L_DD + lambda_pd L_PD (+ lambda_id L_id).

    batch -> latents (VAE) -> per-sample noise, t, condition dropout
          -> one batched no-grad forward of (p, g, 0) on the DD subset   (before the joint forward:
                                                                            no stored activations yet)
          -> joint forward (grad)              -> base MSE (fp32)         [loss "mse"]
          -> Delta_t from the joint prediction and the three branches    [loss "dd"]
          -> f_p from the joint forward's identity tokens, f_s (cached), f_g from the text forward above [loss "pd"]
          -> lambda_id > 0: recognizer embedding of VAE.decode(x0_hat) vs the conditioning one   [loss "id"]
                                                                          (train/identity_loss.py)

Randomness (noise, t, dropout, DDLoss draws) comes from a generator seeded by
(seed, step, sample key), so a sample gets the same draws whatever rank or
micro batch it lands in: 1 and 2 ranks train alike, and a resumed run repeats
the uninterrupted one.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .. import losses
from ..data import pixels_to_unit_range
from .config import TrainConfig
from .models import PD_MAPPINGS, FrozenParts, clip_text_features, encode_text_with_features, sdxl_time_ids, \
    superclass_features

__all__ = ["StepBatch", "sample_generator", "prepare_batch", "compute_losses", "lambda_scale"]


def sample_generator(seed: int, step: int, key: str) -> torch.Generator:
    """CPU generator for one sample at one step (stable across processes: crc32, not hash())."""
    mixed = (seed * 1_000_003 + step) * 1_000_003 + zlib.crc32(key.encode())
    return torch.Generator().manual_seed(mixed & 0x7FFF_FFFF_FFFF_FFFF)


@dataclass
class StepBatch:
    """A micro batch ready for the model; every tensor on the training device."""

    keys: list[str]
    captions: list[str]
    x0: torch.Tensor             # (B, C, h, w) clean latents, fp32
    noise: torch.Tensor          # (B, C, h, w)
    timesteps: torch.Tensor      # (B,) long
    noisy: torch.Tensor          # (B, C, h, w) x_t
    text: torch.Tensor           # (B, L, cad) caption states after dropout
    text_empty: torch.Tensor     # (1, L, cad) states of "" (dropped caption)
    id_embeds: torch.Tensor      # (B, D) after dropout (dropped = zeros, as inference's negative)
    keep_both: torch.Tensor      # (B,) bool: kept identity and caption
    generators: list[torch.Generator]
    pooled: Optional[torch.Tensor] = None        # SDXL (B, P) after dropout
    pooled_empty: Optional[torch.Tensor] = None  # SDXL (1, P)
    time_ids: Optional[torch.Tensor] = None      # SDXL (B, 6)
    text_features: Optional[torch.Tensor] = None  # (B, P) CLIP joint-space features of the kept captions, fp32,
    #                                               from the conditioning forward (PDLoss f_g; None: second pass)
    clip: Optional[torch.Tensor] = None          # FaceID-Plus (B, n, L, H) CLIP face states after dropout
    clip_null: Optional[torch.Tensor] = None     # FaceID-Plus (1, 1, L, H): dropped identity = CLIP(zero pixels)
    id_kept: Optional[torch.Tensor] = None       # (B,) bool: identity not dropped
    landmarks: Optional[np.ndarray] = None       # (B, 5, 2) training-image landmarks (identity loss only)

    def identity(self, idx: Optional[torch.Tensor] = None) -> dict:
        """Extra identity inputs of the model call: {"clip_embeds": (m, n, L, H)} for FaceID-Plus, else {}."""
        if self.clip is None:
            return {}
        return {"clip_embeds": self.clip if idx is None else self.clip[idx]}

    def added(self, idx: Optional[torch.Tensor] = None, pooled: Optional[torch.Tensor] = None) -> Optional[dict]:
        if self.time_ids is None:
            return None
        idx = torch.arange(len(self.keys), device=self.time_ids.device) if idx is None else idx
        return {"text_embeds": self.pooled[idx] if pooled is None else pooled, "time_ids": self.time_ids[idx]}


@torch.no_grad()
def prepare_batch(batch: dict, parts: FrozenParts, cfg: TrainConfig, step: int, device: torch.device,
                  dtype: torch.dtype) -> StepBatch:
    """VAE latents, per-sample noise / t / dropout, text states; all under no_grad."""
    keys, captions = list(batch["__key__"]), list(batch["caption"])
    # uint8 from the loader (or float in [-1, 1]) -> [-1, 1] on the device, then the VAE's dtype
    pixels = pixels_to_unit_range(batch["pixel_values"].to(device)).to(parts.vae.dtype)  # (B, 3, R, R)
    if getattr(parts, "latent_cache", None) is not None:                             # data.latent_cache_mb > 0
        mean, std = parts.latent_cache.posterior(parts.vae, batch["pixel_values"], pixels)  # (B, C, h, w) each
    else:
        dist = parts.vae.encode(pixels).latent_dist
        mean, std = dist.mean, dist.std
    T = parts.scheduler.config.num_train_timesteps
    gens = [sample_generator(cfg.seed, step, k) for k in keys]
    # Sample the VAE posterior with the per-sample generators, not the global RNG (rank independence).
    z = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in gens]).to(device)
    x0 = (mean.float() + std.float() * z) * parts.vae.config.scaling_factor               # (B, C, h, w)
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(device)
    t = torch.stack([torch.randint(0, T, (), generator=g) for g in gens]).to(device)
    u = torch.stack([torch.rand((), generator=g) for g in gens]).to(device)
    d = cfg.dropout
    drop_id = (u < d.identity) | ((u >= d.identity + d.caption) & (u < d.identity + d.caption + d.both))
    drop_cap = (u >= d.identity) & (u < d.identity + d.caption + d.both)
    noisy = parts.scheduler.add_noise(x0, noise, t)

    kept_captions = ["" if dc else c for c, dc in zip(captions, drop_cap.tolist())]
    text, pooled, features = encode_text_with_features(parts, kept_captions + [""], device)
    text_empty, text = text[-1:], text[:-1]
    features = features[:-1] if features is not None else None
    pooled_empty = pooled[-1:] if pooled is not None else None
    pooled = pooled[:-1] if pooled is not None else None
    ids = batch["face_embedding"].to(device=device, dtype=torch.float32)             # (B, D)
    crops = batch.get("face_pixels")                                                  # (B, 3, S, S) uint8 | None
    if getattr(parts, "reference_bank", None) is not None:                            # identity of another photo
        ids, crops = parts.reference_bank.swap(keys, batch["meta"], ids.cpu(), crops, cfg.seed, step)
        ids = ids.to(device)
    if getattr(parts, "identity_bank", None) is not None:                             # Portrait: (B, n, D)
        ids = parts.identity_bank.draw(keys, batch["meta"], ids, cfg.seed, step).to(device)
    ids = torch.where(drop_id.view(-1, *[1] * (ids.ndim - 1)), torch.zeros_like(ids), ids)
    clip = clip_null = None
    if getattr(parts, "image_encoder", None) is not None:                             # FaceID-Plus
        crops = crops.to(device)                                                      # (B, [n,] 3, S, S) uint8
        states = parts.image_encoder(crops.reshape(-1, *crops.shape[-3:])).float()    # (B*n, L, H)
        clip = states.reshape(len(keys), -1, *states.shape[-2:])                      # (B, n, L, H)
        clip_null = parts.image_encoder.null_embeds().float()[None]                   # (1, 1, L, H)
        clip = torch.where(drop_id.view(-1, 1, 1, 1), clip_null, clip)                # dropped: CLIP(zero pixels)
    time_ids = sdxl_time_ids(len(keys), cfg.resolution, device) if parts.is_sdxl else None
    landmarks = None
    if getattr(parts, "identity_loss", None) is not None:
        from .identity_loss import training_landmarks
        landmarks = training_landmarks(batch["meta"], cfg.resolution)
    return StepBatch(keys=keys, captions=captions, x0=x0, noise=noise, timesteps=t, noisy=noisy, text=text,
                     text_empty=text_empty, id_embeds=ids, keep_both=~(drop_id | drop_cap), generators=gens,
                     pooled=pooled, pooled_empty=pooled_empty, time_ids=time_ids, text_features=features,
                     clip=clip, clip_null=clip_null, id_kept=~drop_id, landmarks=landmarks)


def lambda_scale(step: int, warmup_steps: int) -> float:
    """Linear lambda warm-up: 0 at step 0, 1 from ``warmup_steps`` on (step counts from 1)."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def _dd_subset(sb: StepBatch, fraction: float) -> torch.Tensor:
    """Indices of the samples that get DDLoss: the first ceil(fraction*B) of those that kept both conditions."""
    kept = torch.nonzero(sb.keep_both).flatten()
    n = min(len(kept), math.ceil(fraction * len(sb.keys)))
    return kept[:n]


def _dd_branches(sb: StepBatch, idx: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor, ref: Callable,
                 added_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONE batched no-grad forward of (identity only, caption only, neither) for the DD subset.

    The identity-free branches get the dropped identity of training: zero embedding and, for
    FaceID-Plus, the CLIP states of the zero pixel tensor (``sb.clip_null``).
    """
    m = len(idx)
    text = torch.cat([sb.text_empty.expand(m, -1, -1), sb.text[idx], sb.text_empty.expand(m, -1, -1)])
    ids = torch.cat([sb.id_embeds[idx], torch.zeros_like(sb.id_embeds[idx]), torch.zeros_like(sb.id_embeds[idx])])
    added = None
    if sb.time_ids is not None:
        pe = sb.pooled_empty.expand(m, -1)
        added = {"text_embeds": torch.cat([pe, sb.pooled[added_idx], pe]),
                 "time_ids": sb.time_ids[added_idx].repeat(3, 1)}
    with torch.no_grad():
        extra = {}
        if sb.clip is not None:
            null = sb.clip_null.expand(m, sb.clip.shape[1], -1, -1)
            extra = {"clip_embeds": torch.cat([sb.clip[idx], null, null])}              # (3m, n, L, H)
        pred, _ = ref(noisy.repeat(3, 1, 1, 1), t.repeat(3), text, ids, added, **extra)  # (3m, C, h, w)
    return pred.float().chunk(3)


def compute_losses(model: Callable, sb: StepBatch, parts: FrozenParts, cfg: TrainConfig, step: int,
                   f_s: Optional[torch.Tensor] = None, ref: Optional[Callable] = None) -> dict:
    """Named loss terms for one micro batch; ``out["loss"]`` is the total with gradient.

    model / ref: callables (noisy, t, text, id_embeds, added_cond_kwargs) -> (pred, tokens);
    ``ref`` (default ``model``) computes the three no-grad DDLoss branches.
    Returns tensors: loss, mse, dd, pd, id (0-d), and for logging delta (M,), dd_timesteps (M,), cos_gap (n,),
    lambda_dd, lambda_pd (effective, after warm-up).
    """
    L = cfg.losses
    ref = ref or model
    sched = parts.scheduler
    warm = lambda_scale(step, L.lambda_warmup_steps)
    lam_dd, lam_pd = L.lambda_dd * warm, L.lambda_pd * warm

    # DDLoss inputs and its three no-grad branches come first: they do not depend on the joint
    # forward, and run while no activations are stored, so they add no peak memory.
    idx = _dd_subset(sb, L.dd_batch_fraction)
    dd_inputs = None
    if L.lambda_dd > 0 and step % L.dd_every_n_steps == 0 and len(idx):
        if L.dd_timesteps == "shared":
            # The joint prediction is the main forward's own (DESIGN 3): no extra grad forward.
            src, noisy, t = idx, sb.noisy[idx], sb.timesteps[idx]
        else:
            k = L.dd_k if L.dd_timesteps == "k_per_sample" else 1
            src = idx.repeat_interleave(k)                                           # (M,) M = k*m
            T = sched.config.num_train_timesteps
            gens = [sb.generators[i] for i in src.tolist()]
            u = torch.stack([torch.rand((), generator=g) for g in gens])
            # Stratified: the j-th of M draws lands in [j*T/M, (j+1)*T/M).
            t = ((torch.arange(len(src)) + u) * T / len(src)).long().clamp(max=T - 1).to(sb.timesteps.device)
            eps = torch.stack([torch.randn(sb.x0.shape[1:], generator=g) for g in gens]).to(sb.x0.device)
            noisy = sched.add_noise(sb.x0[src], eps, t)
        dd_inputs = (src, noisy, t, _dd_branches(sb, src, noisy, t, ref, src))

    pred, tokens = model(sb.noisy, sb.timesteps, sb.text, sb.id_embeds, sb.added(),
                         **sb.identity())                                            # (B,C,h,w), (B,K,cad)
    target = losses.denoising_target(sched, sb.x0, sb.noise, sb.timesteps)
    mse = F.mse_loss(pred.float(), target.float())
    zero = mse.new_zeros(())
    out = {"mse": mse, "dd": zero, "pd": zero, "id": zero, "lambda_dd": torch.tensor(lam_dd), "lambda_pd": torch.tensor(lam_pd),
           "delta": zero.new_zeros(0), "dd_timesteps": sb.timesteps.new_zeros(0), "cos_gap": zero.new_zeros(0)}
    total = mse

    if dd_inputs is not None:
        src, noisy, t, (p, g, n) = dd_inputs
        if L.dd_timesteps == "shared":
            joint = pred[src]
        else:
            joint, _ = model(noisy, t, sb.text[src], sb.id_embeds[src], sb.added(src), **sb.identity(src))
        dd, delta = losses.denoising_decouple_loss(joint.float(), p, g, n, noisy, t, sched)
        out.update(dd=dd, delta=delta.detach(), dd_timesteps=t.detach())
        total = total + lam_dd * dd

    if L.lambda_pd > 0 and parts.clip is not None and sb.keep_both.any():
        keep = torch.nonzero(sb.keep_both).flatten()
        f_p = PD_MAPPINGS[L.pd_mapping](parts.clip, tokens[keep])                    # (n, P) with grad
        if f_s is None:
            f_s = superclass_features(parts, L.superclass_prompt, sb.x0.device)                 # (P,) cached
        if sb.text_features is not None:    # kept rows hold their own caption: no second CLIP pass
            f_g = sb.text_features[keep]                                                         # (n, P)
        else:
            f_g = clip_text_features(parts, [sb.captions[i] for i in keep.tolist()], sb.x0.device)
        pd = losses.prior_decouple_loss(f_p, f_s, f_g)
        out.update(pd=pd, cos_gap=losses.cosine_gap(f_p.detach(), f_s, f_g).flatten())
        total = total + lam_pd * pd

    if L.lambda_id > 0 and getattr(parts, "identity_loss", None) is not None:
        from .identity_loss import identity_term
        l_id, _ = identity_term(pred, sb, parts, L.id_timestep_fraction)
        out["id"] = l_id
        total = total + L.lambda_id * l_id

    out["loss"] = total
    return out
