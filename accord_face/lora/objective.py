"""The LoRA training objective: DreamBooth denoising loss + prior preservation + ACCORD.

    loss = mse(instance) + w_prior * mse(class) + lambda_dd(step) * L_DD + lambda_pd * L_PD

``loss_terms`` returns every term as a named tensor (guided-diffusion style) so
the trainer logs them separately; with lambda_dd = 0 and no learned token the
total is exactly the plain DreamBooth-LoRA loss (the DDLoss branches are not run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import losses
from .config import AccordConfig, LoraTrainConfig
from .models import LoraModels, adapters_disabled, encode_prompts, project_prompts
from .prompts import PromptSet


@dataclass
class Batch:
    """One micro-batch in latent space. Class fields are None without prior preservation."""

    latents: torch.Tensor           # (B, 4, h, w) instance x0 latents
    prompts: list[PromptSet]        # B prompt sets
    noise: torch.Tensor             # (B, 4, h, w)
    timesteps: torch.Tensor         # (B,)
    class_latents: torch.Tensor | None = None   # (Bc, 4, h, w)
    class_prompts: list[str] | None = None
    class_noise: torch.Tensor | None = None
    class_timesteps: torch.Tensor | None = None


def dd_lambda(cfg: AccordConfig, step: int) -> float:
    """lambda_dd with the linear warm-up; 0 on steps DDLoss skips (``every``)."""
    if cfg.lambda_dd == 0 or step % cfg.every:
        return 0.0
    ramp = 1.0 if cfg.warmup_steps <= 0 else min(1.0, (step + 1) / cfg.warmup_steps)
    return cfg.lambda_dd * ramp


def stratified_timesteps(n: int, num_train_timesteps: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """t_i = floor((i + u_i) T / n), u_i ~ U[0, 1): one t per stratum of [0, T), shuffled. (n,) long."""
    u = torch.rand(n, generator=generator)
    t = ((torch.arange(n) + u) * num_train_timesteps / n).long().clamp_(0, num_train_timesteps - 1)
    return t[torch.randperm(n, generator=generator)]


def _unet(models: LoraModels, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, train: bool) -> torch.Tensor:
    unet = models.unet_train if train else models.unet
    return unet(x_t.to(models.unet.dtype), t, encoder_hidden_states=cond.to(models.unet.dtype)).sample


def reference_predictions(models: LoraModels, x_t: torch.Tensor, t: torch.Tensor, prompts: list[PromptSet],
                          frozen: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Target-only, context-only and empty branches as ONE batched no-grad forward. Each (n, 4, h, w)."""
    n = x_t.shape[0]
    texts = [p.target for p in prompts] + [p.context for p in prompts] + [p.empty for p in prompts]
    with torch.no_grad(), adapters_disabled(models, frozen):
        cond = encode_prompts(models, texts)                                    # (3n, L, D)
        out = _unet(models, x_t.repeat(3, 1, 1, 1), t.repeat(3), cond, train=False)  # (3n, 4, h, w)
    return out[:n], out[n:2 * n], out[2 * n:]


def loss_terms(models: LoraModels, batch: Batch, cfg: LoraTrainConfig, step: int,
               generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """All loss terms of one micro-batch, and float statistics for the log.

    Terms: ``loss`` (total), ``mse`` (instance), ``prior`` (class half, if any),
    ``dd`` and ``pd`` (when active). Stats: ``lambda_dd``, ``dd_ratio``
    (lambda_dd * L_DD / mse) and ``delta_q{0..3}`` (mean Delta_t per t quartile).
    """
    sched, device = models.scheduler, models.device
    n_inst = batch.latents.shape[0]
    latents, noise, t = batch.latents, batch.noise, batch.timesteps
    texts = [p.joint for p in batch.prompts]
    if batch.class_latents is not None:
        # Instance and class halves share one forward (DreamBooth's layout); each gets its own loss term.
        latents = torch.cat([latents, batch.class_latents])
        noise = torch.cat([noise, batch.class_noise])
        t = torch.cat([t, batch.class_timesteps])
        texts = texts + list(batch.class_prompts)
    latents, noise, t = latents.to(device), noise.to(device), t.to(device)
    x_t = sched.add_noise(latents, noise, t)                                    # (B', 4, h, w)
    cond = encode_prompts(models, texts)                                        # (B', L, D)
    pred = _unet(models, x_t, t, cond, train=True).float()                     # (B', 4, h, w)
    target = losses.denoising_target(sched, latents, noise, t).float()

    terms: dict[str, torch.Tensor] = {"mse": F.mse_loss(pred[:n_inst], target[:n_inst])}
    total = terms["mse"]
    if batch.class_latents is not None:
        terms["prior"] = F.mse_loss(pred[n_inst:], target[n_inst:])
        total = total + cfg.prior.loss_weight * terms["prior"]
    stats: dict[str, float] = {}

    lam = dd_lambda(cfg.accord, step)
    if lam > 0:
        n = max(1, math.ceil(cfg.accord.fraction * n_inst))
        dd_prompts = batch.prompts[:n]
        if cfg.accord.timesteps == "shared":  # reuse the base loss's joint forward: no extra gradient pass
            dd_x, dd_t, joint = x_t[:n], t[:n], pred[:n]
        else:  # own t, stratified over n * t_per_sample copies of the first n samples
            idx = torch.arange(n, device=device).repeat(cfg.accord.t_per_sample)          # (n*k,)
            dd_t = stratified_timesteps(len(idx), sched.config.num_train_timesteps, generator).to(device)
            dd_x = sched.add_noise(latents[idx], noise[idx], dd_t)                         # (n*k, 4, h, w)
            joint = _unet(models, dd_x, dd_t, cond[idx], train=True).float()
            dd_prompts = [batch.prompts[i] for i in idx.tolist()]
        p, g, null = reference_predictions(models, dd_x, dd_t, dd_prompts, cfg.accord.reference == "frozen")
        terms["dd"], delta = losses.denoising_decouple_loss(joint, p.float(), g.float(), null.float(), dd_x, dd_t, sched)
        total = total + lam * terms["dd"]
        stats["lambda_dd"] = lam
        stats["dd_ratio"] = float(lam * terms["dd"].detach() / terms["mse"].detach().clamp_min(1e-12))
        for q, v in losses.quartile_means(delta, dd_t, sched.config.num_train_timesteps).items():
            stats[f"delta_q{q}"] = v

    if models.projection is not None and cfg.accord.lambda_pd > 0:
        f_p = project_prompts(models, [p.target for p in batch.prompts])        # (B, P), grad via the token row
        with torch.no_grad():
            f_s = project_prompts(models, [cfg.accord.superclass_prompt])[0]     # (P,)
            f_g = project_prompts(models, [p.context for p in batch.prompts])    # (B, P)
        terms["pd"] = losses.prior_decouple_loss(f_p, f_s, f_g)
        stats["cos_gap"] = float(losses.cosine_gap(f_p.detach(), f_s, f_g).mean())
        total = total + cfg.accord.lambda_pd * terms["pd"]
    terms["loss"] = total
    return terms, stats
