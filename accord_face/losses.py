"""ACCORD losses (Liu, Zheng, Yu, Li, arXiv 2503.01122) as pure functions.

This module imports nothing from the rest of the package: it takes tensors and
a diffusers-style noise scheduler (anything with ``alphas_cumprod`` and a
``config`` holding ``num_train_timesteps`` and ``prediction_type``).

Notation (README, "ACCORD, as implemented"): ``p`` = personalization target (identity
tokens), ``g`` = general text (caption), ``pg`` = both, ``0`` = neither.
``U(x_t, c, t)`` is the model's estimate of ``x_{t-1}``: the DDPM posterior
mean computed from the raw UNet output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "denoising_target",
    "alphas_cumprod_at",
    "betas_at",
    "posterior_mean",
    "posterior_variance",
    "predicted_original_sample",
    "denoising_decouple_weight",
    "denoising_decouple_delta",
    "denoising_decouple_loss",
    "prior_decouple_loss",
    "cosine_gap",
    "quartile_means",
]


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) broadcastable against ``like``."""
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


def _timestep_index(timesteps: torch.Tensor | int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(timesteps, device=device).long()
    return t.reshape(-1) if t.ndim == 0 else t


def denoising_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict, by the scheduler's ``prediction_type``.

    epsilon: noise;  v_prediction: v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0;  sample: x0.
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    if kind == "sample":
        return x0
    raise ValueError(f"unsupported scheduler prediction_type {kind!r} "
                     "(expected 'epsilon', 'v_prediction' or 'sample')")


def alphas_cumprod_at(scheduler, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (abar_t, abar_{t-1}) in float64, with abar_{-1} = 1.

    Taken from the scheduler's own ``alphas_cumprod`` so that any beta schedule
    (linear, scaled_linear, squaredcos, rescaled zero-SNR) is respected.
    """
    acp = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64)
    t = _timestep_index(timesteps, acp.device)
    if (t < 0).any() or (t >= acp.shape[0]).any():
        raise ValueError(f"timesteps must lie in [0, {acp.shape[0] - 1}], got {t.tolist()}")
    abar_t = acp[t]
    abar_prev = torch.where(t > 0, acp[(t - 1).clamp(min=0)], torch.ones_like(abar_t))
    return abar_t, abar_prev


def betas_at(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """beta_t in float64: the scheduler's own ``betas`` where it has them, else 1 - abar_t / abar_{t-1}.

    Deriving beta from a float32 ``alphas_cumprod`` loses about 3e-5 of it at
    small t (cancellation in 1 - abar_t / abar_{t-1}), so the stored array wins.
    """
    stored = getattr(scheduler, "betas", None)
    if stored is None:
        abar_t, abar_prev = alphas_cumprod_at(scheduler, timesteps)
        return 1.0 - abar_t / abar_prev
    betas = torch.as_tensor(stored, dtype=torch.float64)
    return betas[_timestep_index(timesteps, betas.device)]


def predicted_original_sample(scheduler, sample: torch.Tensor, model_output: torch.Tensor,
                              timesteps: torch.Tensor) -> torch.Tensor:
    """x0 estimate from the raw model output (no clipping, no thresholding).

    epsilon:      x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
    v_prediction: x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v
    sample:       x0 = model_output
    """
    kind = scheduler.config.prediction_type
    abar_t, _ = alphas_cumprod_at(scheduler, timesteps)
    a = _expand(abar_t.sqrt().to(sample.device, torch.float32), sample)        # (B,1,1,1)
    s = _expand((1 - abar_t).sqrt().to(sample.device, torch.float32), sample)  # (B,1,1,1)
    x_t, out = sample.float(), model_output.float()
    if kind == "epsilon":
        return (x_t - s * out) / a
    if kind == "v_prediction":
        return a * x_t - s * out
    if kind == "sample":
        return out
    raise ValueError(f"unsupported scheduler prediction_type {kind!r} "
                     "(expected 'epsilon', 'v_prediction' or 'sample')")


def posterior_mean(scheduler, sample: torch.Tensor, model_output: torch.Tensor,
                   timesteps: torch.Tensor) -> torch.Tensor:
    """DDPM posterior mean of x_{t-1} given x_t and the model's x0 estimate.

        mu_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t) * x0
             + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) * x_t

    (Ho et al. 2020, eq. 7; the mean ``DDPMScheduler.step`` computes with
    ``clip_sample=False`` and a step of one training timestep.)

    Shapes: sample, model_output (B, C, H, W); timesteps (B,). Returns float32.
    """
    abar_t, abar_prev = alphas_cumprod_at(scheduler, timesteps)
    beta_t = betas_at(scheduler, timesteps)
    coef_x0 = (abar_prev.sqrt() * beta_t / (1 - abar_t)).to(sample.device, torch.float32)
    coef_xt = ((1 - beta_t).sqrt() * (1 - abar_prev) / (1 - abar_t)).to(sample.device, torch.float32)
    x0 = predicted_original_sample(scheduler, sample, model_output, timesteps)
    return _expand(coef_x0, sample) * x0 + _expand(coef_xt, sample) * sample.float()


def posterior_variance(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """sigma_t^2 = beta_t (1 - abar_{t-1}) / (1 - abar_t), and beta_t at t = 0.

    At t = 0 the posterior variance is 0 (x_{-1} is x_0 itself); the paper's
    1/(2 sigma^2) would then be infinite, so we follow DDPM's "fixed_large"
    choice there and use beta_0. Returns float32, shape (B,).
    """
    abar_t, abar_prev = alphas_cumprod_at(scheduler, timesteps)
    beta_t = betas_at(scheduler, timesteps)
    t = _timestep_index(timesteps, beta_t.device)
    var = torch.where(t > 0, beta_t * (1 - abar_prev) / (1 - abar_t), beta_t)
    return var.float()


def denoising_decouple_weight(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """(t + 1) / T for diffusers' 0-indexed t: the paper's t/T with t in 1..T."""
    t = _timestep_index(timesteps, torch.device("cpu")).float()
    return (t + 1) / float(scheduler.config.num_train_timesteps)


def _sq_norm(x: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm summed over every element of each sample: (B, ...) -> (B,)."""
    return x.pow(2).flatten(1).sum(dim=1)


def denoising_decouple_delta(pred_joint: torch.Tensor, pred_p: torch.Tensor, pred_g: torch.Tensor,
                             pred_null: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor,
                             scheduler) -> torch.Tensor:
    """Per-sample one-step change of the log conditional-dependence coefficient.

        Delta_t = 1/(2 sigma_t^2) * ( ||U_pg - U_p||^2 + ||U_pg - U_g||^2 - ||U_pg - U_0||^2 )

    Norms are summed over all latent elements of a sample (not averaged), which
    makes Delta_t the exact change of the Gaussian log-density ratio (Theorem 2).
    Gradient flows through ``pred_joint`` only. Returns float32, shape (B,).
    """
    shapes = {p.shape for p in (pred_joint, pred_p, pred_g, pred_null, sample)}
    if len(shapes) != 1:
        raise ValueError(f"all predictions and the sample must share one shape, got {sorted(map(tuple, shapes))}")
    t = _timestep_index(timesteps, sample.device)
    if t.shape[0] != sample.shape[0]:
        raise ValueError(f"timesteps has {t.shape[0]} entries for a batch of {sample.shape[0]}")
    sample = sample.detach()
    u_pg = posterior_mean(scheduler, sample, pred_joint, t)
    u_p, u_g, u_0 = (posterior_mean(scheduler, sample, p.detach(), t) for p in (pred_p, pred_g, pred_null))
    sigma2 = posterior_variance(scheduler, t).to(sample.device)
    return (_sq_norm(u_pg - u_p) + _sq_norm(u_pg - u_g) - _sq_norm(u_pg - u_0)) / (2 * sigma2)


def denoising_decouple_loss(pred_joint: torch.Tensor, pred_p: torch.Tensor, pred_g: torch.Tensor,
                            pred_null: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor,
                            scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """Denoising Decouple Loss (DDLoss).

        L_DD = mean_i  (t_i + 1)/T * |Delta_{t_i}|

    Args:
        pred_joint: raw UNet output for identity + caption, (B, C, H, W); the only input with gradient.
        pred_p, pred_g, pred_null: outputs for identity only, caption only and neither, same shape.
        sample: the shared noisy latent x_t, (B, C, H, W).
        timesteps: the shared t per sample, (B,), 0-indexed as in diffusers.
        scheduler: the training noise scheduler.

    Returns:
        (loss, delta): scalar float32 loss and the per-sample Delta_t (B,) for logging.
    """
    delta = denoising_decouple_delta(pred_joint, pred_p, pred_g, pred_null, sample, timesteps, scheduler)
    weight = denoising_decouple_weight(scheduler, timesteps).to(delta.device)
    return (weight * delta.abs()).mean(), delta


def cosine_gap(f_p: torch.Tensor, f_s: torch.Tensor, f_g: torch.Tensor) -> torch.Tensor:
    """Signed gap cos(f_p, f_g) - cos(f_s, f_g), shape (B,) or (B, G).

    f_p (B, D); f_s (D,) or (B, D); f_g (B, D) or (B, G, D).
    """
    if f_p.ndim != 2:
        raise ValueError(f"f_p must be (B, D), got {tuple(f_p.shape)}")
    if f_s.ndim == 1:
        f_s = f_s.unsqueeze(0).expand_as(f_p)
    if f_s.shape != f_p.shape:
        raise ValueError(f"f_s must be (D,) or (B, D) matching f_p {tuple(f_p.shape)}, got {tuple(f_s.shape)}")
    if f_g.ndim == 2:
        f_g = f_g.unsqueeze(1)
    if f_g.ndim != 3 or f_g.shape[0] != f_p.shape[0] or f_g.shape[2] != f_p.shape[1]:
        raise ValueError(f"f_g must be (B, D) or (B, G, D) matching f_p {tuple(f_p.shape)}, got {tuple(f_g.shape)}")
    f_s, f_g = f_s.detach().float(), f_g.detach().float()
    cos_p = F.cosine_similarity(f_p.float().unsqueeze(1), f_g, dim=-1)  # (B, G)
    cos_s = F.cosine_similarity(f_s.unsqueeze(1), f_g, dim=-1)          # (B, G)
    return cos_p - cos_s


def prior_decouple_loss(f_p: torch.Tensor, f_s: torch.Tensor, f_g: torch.Tensor) -> torch.Tensor:
    """Prior Decouple Loss (PDLoss).

        L_PD = mean over c_g of | cos(f_p, f_g) - cos(f_s, f_g) |

    f_p: target features in CLIP's joint space (B, D), with gradient.
    f_s: superclass text features (D,) or (B, D); f_g: caption features
    (B, D) or (B, G, D). Gradient reaches f_p only. Invariant to the scale
    of each vector (cosines).
    """
    return cosine_gap(f_p, f_s, f_g).abs().mean()


def quartile_means(values: torch.Tensor, timesteps: torch.Tensor, num_train_timesteps: int) -> dict[int, float]:
    """Mean of ``values`` per timestep quartile {0: t < T/4, ..., 3: t >= 3T/4}; empty quartiles omitted.

    The logging helper for "Delta_t by timestep quartile" (guided-diffusion's
    ``log_loss_dict`` convention).
    """
    t = _timestep_index(timesteps, values.device)
    q = (4 * t // num_train_timesteps).clamp(0, 3)
    return {int(k): float(values[q == k].detach().float().mean()) for k in q.unique().tolist()}
