"""The DDLoss no-grad branches run before the joint forward (no stored activations then), same values."""

from __future__ import annotations

import dataclasses

import torch

from accord_face import losses
from accord_face.train.config import TrainConfig
from accord_face.train.step import compute_losses

from benchmarks.bench_train_step import build, make_batch


def test_branches_run_first_under_no_grad_and_give_the_same_loss():
    torch.manual_seed(0)
    model, parts, cfg = build("tiny", torch.device("cpu"), torch.float32, 64)
    sb = make_batch(parts, 4, 64, torch.device("cpu"))
    cfg = dataclasses.replace(cfg, losses=dataclasses.replace(TrainConfig().losses, lambda_dd=0.2, lambda_pd=0.0,
                                                              dd_batch_fraction=0.5, lambda_warmup_steps=0))
    calls = []

    def recording(*args):
        calls.append((torch.is_grad_enabled(), args[0].shape[0]))
        return model(*args)

    out = compute_losses(recording, sb, parts, cfg, step=1)
    assert calls == [(False, 3 * 2), (True, 4)]     # (p, g, 0) for ceil(0.5 * 4) samples, then the joint batch
    with torch.no_grad():
        pred, _ = model(sb.noisy, sb.timesteps, sb.text, sb.id_embeds)
        x, t, ids = sb.noisy[:2], sb.timesteps[:2], sb.id_embeds[:2]
        empty = sb.text_empty.expand(2, -1, -1)
        p, _ = model(x, t, empty, ids)
        g, _ = model(x, t, sb.text[:2], torch.zeros_like(ids))
        n, _ = model(x, t, empty, torch.zeros_like(ids))
    dd, _ = losses.denoising_decouple_loss(pred[:2], p, g, n, x, t, parts.scheduler)
    torch.testing.assert_close(out["dd"].detach(), dd, rtol=1e-4, atol=1e-6)
    mse = torch.nn.functional.mse_loss(pred, sb.noise)
    torch.testing.assert_close(out["loss"].detach(), mse + 0.2 * dd, rtol=1e-5, atol=1e-6)
