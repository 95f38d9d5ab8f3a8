"""Dose calibration for ACCORD's weights: loss ratio and gradient-norm ratio on the trainable parameters.

For a batch, with theta the trainable (adapter) parameters,

    loss ratio      r_L = lambda * L_DD / L_base
    gradient ratio  r_G = || d(lambda * L_DD)/d theta || / || d L_base / d theta ||
                        = lambda * ||g_DD|| / ||g_base||
    alignment       cos(g_DD, g_base)

Both ratios are linear in lambda, so the weight that gives a target gradient ratio r is

    lambda(r) = r * mean_b ||g_base|| / mean_b ||g_DD||

(means over batches; a loss ratio of 0.1 can be a gradient ratio far above 1, which is why
doses are chosen by r_G). The same for PDLoss with L_PD. Batches are prepared exactly as the
trainer does (``prepare_batch`` with the run's seed), at step ``step`` and with no dropout, so
every term is computed on the same noise, timesteps and identities.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

__all__ = ["gradient_ratios", "lambda_for_ratio"]


def lambda_for_ratio(ratio: float, base_grad_norm: float, term_grad_norm: float) -> float:
    """lambda with lambda * ||g_term|| / ||g_base|| = ratio."""
    if term_grad_norm <= 0:
        return math.inf
    return ratio * base_grad_norm / term_grad_norm


def _flat_grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def gradient_ratios(config: str, shards: str, adapter: str | None = None, batches: int = 8, batch_size: int = 16,
                    overrides: list[str] | None = None, step: int = 1000, progress: bool = True,
                    identity: bool = False) -> dict:
    """Per-batch ||g_base||, ||g_DD||, ||g_PD||, their cosines and L_base, L_DD, L_PD, at lambda = 1.

    ``adapter``: an exported adapter folder to calibrate at (None: the trainer's initial weights).
    ``identity``: also the identity loss's ||g_id||, cos(g_id, g_base) and L_id (lambda_id = 1,
    ``train/identity_loss.py``), with ``losses.id_recognizer`` / ``id_timestep_fraction`` as configured."""
    from tqdm.auto import tqdm

    from ..adapter import load_adapter_state_dict, load_into_training
    from ..config import load_config
    from ..data import build_dataset, collate
    from ..family.trainer import attach_family_parts, face_crop_size
    from .config import TrainConfig, preflight
    from .models import build_model, load_frozen_parts
    from .step import compute_losses, prepare_batch

    cfg = load_config(TrainConfig, config, [f"shards={shards}", *(overrides or [])])
    cfg = dataclasses.replace(
        cfg, dropout=dataclasses.replace(cfg.dropout, identity=0.0, caption=0.0, both=0.0),
        losses=dataclasses.replace(cfg.losses, lambda_dd=1.0, lambda_pd=1.0, lambda_warmup_steps=0,
                                   dd_batch_fraction=1.0, dd_every_n_steps=1,
                                   lambda_id=1.0 if identity else cfg.losses.lambda_id))
    device = torch.device("cpu")
    info = preflight(cfg)
    parts = load_frozen_parts(cfg, device, torch.float32, with_clip=True)
    attach_family_parts(cfg, parts, info, device, torch.float32)
    if identity:
        from .identity_loss import load_identity_loss
        parts.identity_loss = load_identity_loss(cfg.losses.id_recognizer, info.recognizer, device)
    model = build_model(cfg, parts)
    if adapter is not None:
        load_into_training(load_adapter_state_dict(adapter), model.encoder, model.unet)
    params = [p for p in model.trainable_parameters() if p.requires_grad]
    ds = build_dataset(shards, resolution=cfg.resolution, shuffle_buffer=0, split_by_node=False,
                       split_by_worker=False, embedding_key=info.embedding_key, face_crop_size=face_crop_size(parts))
    rows, buf = [], []
    with tqdm(total=batches, desc="lambda calibration", disable=not progress) as bar:
        for sample in ds:
            buf.append(sample)
            if len(buf) < batch_size:
                continue
            sb = prepare_batch(collate(buf), parts, cfg, step, device, torch.float32)
            buf = []
            terms = compute_losses(model, sb, parts, cfg, step)
            g_base = _flat_grad(terms["mse"], params)
            g_dd = _flat_grad(terms["dd"], params)
            g_pd = _flat_grad(terms["pd"], params) if terms["pd"].requires_grad else torch.zeros_like(g_base)

            def cos(a, b):
                return float(torch.nn.functional.cosine_similarity(a, b, dim=0)) if a.norm() > 0 and b.norm() > 0 \
                    else float("nan")

            rows.append({"loss_base": float(terms["mse"].detach()), "loss_dd": float(terms["dd"].detach()),
                         "loss_pd": float(terms["pd"].detach()),
                         "grad_base": float(g_base.norm()), "grad_dd": float(g_dd.norm()), "grad_pd": float(g_pd.norm()),
                         "cos_dd_base": cos(g_dd, g_base), "cos_pd_base": cos(g_pd, g_base)})
            if identity:
                g_id = _flat_grad(terms["id"], params) if terms["id"].requires_grad else torch.zeros_like(g_base)
                rows[-1].update(loss_id=float(terms["id"].detach()), grad_id=float(g_id.norm()),
                                cos_id_base=cos(g_id, g_base))
            bar.update(1)
            if len(rows) >= batches:
                break
    if not rows:
        raise ValueError(f"{shards}: fewer than {batch_size} samples")
    mean = {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]}
    return {"adapter": adapter, "step": step, "batches": len(rows), "batch_size": batch_size, "mean": mean,
            "per_batch": rows}


def main(argv: list[str] | None = None) -> int:
    """``python -m accord_face.train.calibrate --config C --shards S [--adapter A] [--identity] [--out F]
    [key=value ...]``: the ratios as JSON (stdout, or F written atomically), lambda for ratio 1 per term."""
    import argparse
    import json
    import os
    from pathlib import Path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--shards", required=True)
    ap.add_argument("--adapter", default=None, help="exported adapter folder (default: the initial weights)")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--identity", action="store_true", help="also the identity loss (losses.lambda_id)")
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    res = gradient_ratios(a.config, a.shards, a.adapter, a.batches, a.batch_size, overrides=a.overrides,
                          identity=a.identity)
    m = res["mean"]
    res["lambda_for_ratio_1"] = {t: lambda_for_ratio(1.0, m["grad_base"], m[f"grad_{t}"])
                                 for t in ("dd", "pd", "id") if f"grad_{t}" in m}
    text = json.dumps(res, indent=1)
    if a.out:
        tmp = Path(f"{a.out}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, a.out)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
