"""Reference sets and the fine-tuning arms of the coupling experiment (the paper's Figure 1).

A reference set shows the target ("sks", an orange X) always together with one
context object (set 0: a white square, set 1: a cyan circle) on varied
backgrounds. Each arm fine-tunes the whole UNet of the base model on it with
equal steps, lr and seeds; they differ only in caption and regularizer:

    dreambooth   caption "a sks" (names only the target)
    baseline     caption "a sks and a white square on a green background"
    accord_rX    baseline + lambda_DD * L_DD, faithful to the paper: the joint branch is
                 the base loss's own forward (with gradient); target-only ("a sks"),
                 context-only (the caption minus the target) and null ("") run on the
                 live model under no_grad, same x_t and t. lambda is set so that
                 lambda * L_DD / L_base = X on the base model.
    frozen_ref   as accord, but the three no-grad branches come from a frozen copy of the base model
    multi_t      as accord, but L_DD on K extra stratified timesteps per sample (own forward)
    warmup       as accord, lambda ramped linearly from 0 over the first part of training
    null_bg      as accord, but every branch keeps the background words
                 (target-only "a sks on a green background", null "on a green background")

PDLoss is not used: the rare token's embedding is not learned here (DreamBooth
style), and the paper uses only DDLoss for methods that do not update it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from accord_face.losses import denoising_decouple_loss, quartile_means
from accord_face.testbed.config import FinetuneConfig
from accord_face.testbed.model import T2I, build_scheduler, training_target
from accord_face.testbed.world import BG_NAMES, TARGET_SHAPE, TARGET_TOKEN, caption, place, render_batch

CONTEXTS = {0: ("square", "white"), 1: ("circle", "cyan")}  # reference set -> context (shape, colour)


@dataclass(frozen=True)
class Arm:
    name: str
    caption: str = "joint"        # "joint" or "target_only" (dreambooth)
    ratio: float = 0.0            # lambda_DD * L_DD / L_base target; 0 = no DDLoss
    reference: str = "live"       # "live" or "frozen": who computes the three no-grad branches
    timesteps: str = "shared"     # "shared" with the base loss, or "stratified" (K extra per sample)
    warmup: bool = False
    keep_background: bool = False


def make_arms(cfg: FinetuneConfig) -> dict[str, Arm]:
    arms = [Arm("dreambooth", caption="target_only"), Arm("baseline")]
    arms += [Arm(f"accord_r{r:g}", ratio=r) for r in cfg.ratios]
    v = cfg.variant_ratio
    arms += [Arm("frozen_ref", ratio=v, reference="frozen"), Arm("multi_t", ratio=v, timesteps="stratified"),
             Arm("warmup", ratio=v, warmup=True), Arm("null_bg", ratio=v, keep_background=True)]
    return {a.name: a for a in arms}


@dataclass
class RefSet:
    images: torch.Tensor          # (R, 3, H, W) in [-1, 1]
    backgrounds: list[str]        # per image
    context: tuple[str, str]      # (shape, colour)

    def captions(self, idx: list[int], arm: Arm) -> dict[str, list[str]]:
        """Per-branch captions for the images ``idx``: joint (training caption), p, g, null."""
        shape, colour = self.context
        ctx = f"a {colour} {shape}"
        tgt = f"a {TARGET_TOKEN}"
        out: dict[str, list[str]] = {"joint": [], "p": [], "g": [], "null": []}
        for i in idx:
            bg = self.backgrounds[i]
            keep = bg if arm.keep_background else None
            out["joint"].append(tgt if arm.caption == "target_only" else caption([tgt, ctx], bg))
            out["p"].append(caption([tgt], keep))
            out["g"].append(caption([ctx], bg))
            out["null"].append(caption([], keep))
        return out


def reference_set(index: int, n: int) -> RefSet:
    """n renders of target + context object (positions, sizes, backgrounds vary), fixed by ``index``."""
    if index not in CONTEXTS:
        raise ValueError(f"reference set {index} is not defined; choose from {sorted(CONTEXTS)}")
    rng = np.random.default_rng(1000 + index)
    shape, colour = CONTEXTS[index]
    bgs = [BG_NAMES[(i + index) % len(BG_NAMES)] for i in range(n)]
    scenes = [place(rng, [(TARGET_SHAPE, "orange"), (shape, colour)], bg) for bg in bgs]
    return RefSet(torch.from_numpy(render_batch(scenes)), bgs, (shape, colour))


def _branches(model: T2I, x_t: torch.Tensor, t: torch.Tensor, caps: dict[str, list[str]]):
    """The three no-grad branches (p, g, null) as one batched forward: 3 x (B, 3, H, W)."""
    with torch.no_grad():
        cond = model.encode(caps["p"] + caps["g"] + caps["null"])           # (3B, L, D)
        eps = model(x_t.repeat(3, 1, 1, 1), t.repeat(3), cond)
    return eps.chunk(3)


def dd_term(model: T2I, ref_model: T2I, arm: Arm, x0: torch.Tensor, caps: dict[str, list[str]],
            shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor], sched, k: int,
            gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L_DD for one batch under ``arm``'s strategy -> (loss, delta (M,), t (M,)).

    ``shared`` = (x_t, t, pred_joint) of the base loss; the faithful form reuses it.
    """
    if arm.timesteps == "shared":
        x_t, t, pred_joint = shared
    else:  # K stratified timesteps per sample, own noise, own joint forward (with gradient)
        b, big_t = x0.shape[0], sched.config.num_train_timesteps
        strata = torch.arange(k).repeat_interleave(b)                                  # (K*B,)
        t = ((strata + torch.rand(k * b, generator=gen)) * big_t / k).long().clamp(max=big_t - 1)
        x0k = x0.repeat(k, 1, 1, 1)
        x_t = sched.add_noise(x0k, torch.randn(x0k.shape, generator=gen), t)
        caps = {key: v * k for key, v in caps.items()}
        pred_joint = model(x_t, t, model.encode(caps["joint"]))
    pred_p, pred_g, pred_null = _branches(ref_model, x_t, t, caps)
    loss, delta = denoising_decouple_loss(pred_joint, pred_p, pred_g, pred_null, x_t, t, sched)
    return loss, delta, t


def calibrate_lambda(base: T2I, arm: Arm, refs: RefSet, cfg: FinetuneConfig, batches: int = 4,
                     seed: int = 12345) -> dict[str, float]:
    """lambda = ratio * mean L_base / mean L_DD, measured on the base model (before any fine-tuning)."""
    sched, gen = build_scheduler(), torch.Generator().manual_seed(seed)
    l_base, l_dd = [], []
    for _ in range(batches):
        idx = torch.randint(0, refs.images.shape[0], (cfg.batch_size,), generator=gen).tolist()
        x0, caps = refs.images[idx], refs.captions(idx, arm)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (x0.shape[0],), generator=gen)
        x_t = sched.add_noise(x0, noise, t)
        with torch.no_grad():
            pred = base(x_t, t, base.encode(caps["joint"]))
            l_base.append(float((pred - training_target(sched, x0, noise, t)).pow(2).mean()))
            l_dd.append(float(dd_term(base, base, arm, x0, caps, (x_t, t, pred), sched,
                                      cfg.dd_samples_per_image, gen)[0]))
    lb, ld = float(np.mean(l_base)), float(np.mean(l_dd))
    return {"lambda": arm.ratio * lb / ld, "L_base": lb, "L_DD": ld}


def finetune(base: T2I, arm: Arm, refs: RefSet, cfg: FinetuneConfig, seed: int,
             lam: float) -> tuple[T2I, dict]:
    """Fine-tune a copy of ``base`` under ``arm``; returns the model and training logs.

    Same seed -> same image indices, noise and t in every arm (the DD-only draws
    use a separate generator so they do not shift the shared stream).
    """
    model = copy.deepcopy(base).train()
    model.text.requires_grad_(False)               # the text encoder (and "sks") stays as in the base model
    frozen = copy.deepcopy(base).eval().requires_grad_(False) if arm.reference == "frozen" else model
    sched = build_scheduler()
    opt = torch.optim.AdamW(model.unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen, gen_dd = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 7919)
    logs = {"L_base": [], "L_DD": [], "ratio": [], "delta_by_quartile": {q: [] for q in range(4)}}
    for step in range(cfg.steps):
        idx = torch.randint(0, refs.images.shape[0], (cfg.batch_size,), generator=gen).tolist()
        x0, caps = refs.images[idx], refs.captions(idx, arm)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (x0.shape[0],), generator=gen)
        x_t = sched.add_noise(x0, noise, t)
        pred = model(x_t, t, model.encode(caps["joint"]))
        loss_base = (pred - training_target(sched, x0, noise, t)).pow(2).mean()
        loss = loss_base
        if arm.ratio > 0:
            scale = min(1.0, step / (cfg.warmup_frac * cfg.steps)) if arm.warmup else 1.0
            l_dd, delta, t_dd = dd_term(model, frozen, arm, x0, caps, (x_t, t, pred), sched,
                                        cfg.dd_samples_per_image, gen_dd)
            loss = loss + scale * lam * l_dd
            logs["L_DD"].append(float(l_dd.detach()))
            logs["ratio"].append(float(lam * l_dd.detach() / loss_base.detach()))
            for q, v in quartile_means(delta, t_dd, sched.config.num_train_timesteps).items():
                logs["delta_by_quartile"][q].append(v)
        logs["L_base"].append(float(loss_base.detach()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.unet.parameters(), 1.0)
        opt.step()
    return model.eval(), logs
