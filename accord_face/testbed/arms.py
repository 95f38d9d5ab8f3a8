"""Reference sets and the fine-tuning arms of the coupling experiment (protocol v2).

A reference set shows the target ("a sks cross", an orange X) always together
with one context object (set 0: a white square, set 1: a cyan circle, ...; see
CONTEXTS) on varied backgrounds. Each arm fine-tunes the base model on it with
equal steps, lr, trainable parameters (full UNet or LoRA) and seeds; they differ
only in caption, regularizer, prior preservation and references:

    baseline     caption "a sks cross and a white square on a green background"
    baseline_pp  baseline + DreamBooth prior preservation: class images of "a cross" generated
                 by the base model, their own loss, weight prior_weight
    accord_gX    baseline + lambda_DD * L_DD, faithful to the paper: the joint branch is the base
                 loss's own forward (with gradient); target-only ("a sks cross"), context-only (the
                 caption minus the target) and null ("") run on the live model under no_grad, same
                 x_t and t. lambda is set by the gradient-norm ratio on the trainable parameters of
                 the base model: lambda * |grad L_DD| = X * |grad L_base|.
    accord_pp    accord (dose variant_ratio) + prior preservation
    varied_refs  positive control: the references show the target with a different context object
                 each (never the set's own context), captioned with it; coupling to the set's context
                 can only come from the prior
    dreambooth   caption "a sks cross" (names only the target)
    frozen_ref / multi_t / null_bg / warmup   v1's variants of accord (dose variant_ratio)

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
from accord_face.testbed.world import (BG_NAMES, CLASS_PHRASE, CLASS_SHAPE, CONTEXT_SHAPES, OBJECT_COLOURS,
                                       TARGET_COLOUR_NAME, TARGET_PHRASE, caption, place, render_batch)

# reference set -> context (shape, colour): 8 sets, every context shape with several colours
CONTEXTS = {0: ("square", "white"), 1: ("circle", "cyan"), 2: ("triangle", "yellow"), 3: ("square", "red"),
            4: ("circle", "yellow"), 5: ("triangle", "white"), 6: ("square", "cyan"), 7: ("circle", "red")}
DEFAULT_ARMS = ("baseline", "accord_g0.3", "accord_g1", "varied_refs", "baseline_pp", "accord_pp")


@dataclass(frozen=True)
class Arm:
    name: str
    caption: str = "joint"        # "joint" or "target_only" (dreambooth)
    ratio: float = 0.0            # lambda_DD |grad L_DD| / |grad L_base| target; 0 = no DDLoss
    reference: str = "live"       # "live" or "frozen": who computes the three no-grad branches
    timesteps: str = "shared"     # "shared" with the base loss, or "stratified" (K extra per sample)
    warmup: bool = False
    keep_background: bool = False
    prior: bool = False           # DreamBooth prior preservation
    refs: str = "fixed"           # "fixed" (the set's context in every image) or "varied" (positive control)


def make_arms(cfg: FinetuneConfig) -> dict[str, Arm]:
    v = cfg.variant_ratio
    arms = [Arm("baseline"), Arm("baseline_pp", prior=True), Arm("dreambooth", caption="target_only"),
            Arm("varied_refs", refs="varied")]
    arms += [Arm(f"accord_g{r:g}", ratio=r) for r in cfg.ratios]
    # with prior preservation in every arm (the DreamBooth recipe; ``accord_pp`` is the dose variant_ratio)
    arms += [Arm(f"accord_pp_g{r:g}", ratio=r, prior=True) for r in cfg.ratios if r != v]
    arms += [Arm("varied_refs_pp", refs="varied", prior=True)]
    arms += [Arm("accord_pp", ratio=v, prior=True), Arm("frozen_ref", ratio=v, reference="frozen"),
             Arm("multi_t", ratio=v, timesteps="stratified"), Arm("warmup", ratio=v, warmup=True),
             Arm("null_bg", ratio=v, keep_background=True)]
    return {a.name: a for a in arms}


@dataclass
class RefSet:
    images: torch.Tensor                  # (R, 3, H, W) in [-1, 1]
    backgrounds: list[str]                # per image
    context: tuple[str, str]              # (shape, colour): the context the set is evaluated for
    image_contexts: list[tuple[str, str]]  # per image: the context object it shows (== context unless varied)

    def captions(self, idx: list[int], arm: Arm) -> dict[str, list[str]]:
        """Per-branch captions for the images ``idx``: joint (training caption), p, g, null."""
        out: dict[str, list[str]] = {"joint": [], "p": [], "g": [], "null": []}
        for i in idx:
            bg = self.backgrounds[i]
            shape, colour = self.image_contexts[i]
            ctx = f"a {colour} {shape}"
            keep = bg if arm.keep_background else None
            out["joint"].append(TARGET_PHRASE if arm.caption == "target_only" else caption([TARGET_PHRASE, ctx], bg))
            out["p"].append(caption([TARGET_PHRASE], keep))
            out["g"].append(caption([ctx], bg))
            out["null"].append(caption([], keep))
        return out


def varied_contexts(context: tuple[str, str], n: int) -> list[tuple[str, str]]:
    """n context objects for the positive control: every (shape, colour) but the set's own, cycled."""
    pool = [(s, c) for s in CONTEXT_SHAPES for c in OBJECT_COLOURS if (s, c) != context and s != context[0]]
    return [pool[(i * 5) % len(pool)] for i in range(n)]


def reference_set(index: int, n: int, varied: bool = False) -> RefSet:
    """n renders of target + context object (positions, sizes, backgrounds vary), fixed by ``index``.

    ``varied``: the positive control's references (same target, backgrounds and seed; a different
    context object in each image, never the set's own context shape).
    """
    if index not in CONTEXTS:
        raise ValueError(f"reference set {index} is not defined; choose from {sorted(CONTEXTS)}")
    rng = np.random.default_rng(1000 + index)
    context = CONTEXTS[index]
    per_image = varied_contexts(context, n) if varied else [context] * n
    bgs = [BG_NAMES[(i + index) % len(BG_NAMES)] for i in range(n)]
    scenes = [place(rng, [(CLASS_SHAPE, TARGET_COLOUR_NAME), ctx], bg) for ctx, bg in zip(per_image, bgs)]
    return RefSet(torch.from_numpy(render_batch(scenes)), bgs, context, per_image)


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


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2"]


def trainable_copy(base: T2I, cfg: FinetuneConfig) -> tuple[T2I, list[torch.nn.Parameter]]:
    """A copy of ``base`` ready to fine-tune and its trainable parameters.

    full: every UNet weight. lora: a peft LoRA (rank r, alpha r, B = 0 so the copy starts equal to
    the base model) on the UNet's attention projections and resnet convolutions; the rest frozen.
    The text encoder (and the "sks" embedding) always stays as in the base model.
    """
    model = copy.deepcopy(base).train()
    model.requires_grad_(False)
    if cfg.mode == "lora":
        from peft import LoraConfig
        with torch.random.fork_rng(devices=[]):  # A's init fixed: calibration and every arm start from the same adapter
            torch.manual_seed(2024)
            model.unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, target_modules=LORA_TARGETS,
                                              init_lora_weights=True))
        params = [p for n, p in model.unet.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
    else:
        model.unet.requires_grad_(True)
        params = list(model.unet.parameters())
    return model, params


def _grad_norm(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> float:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)))


def calibrate_lambda(base: T2I, arm: Arm, refs: RefSet, cfg: FinetuneConfig, batches: int | None = None,
                     seed: int = 12345) -> dict:
    """Dose calibration on the trainable parameters theta of the base model (before any fine-tuning).

        grad_ratio = mean_b |d L_DD / d theta| / mean_b |d L_base / d theta|   -> lambda = X / grad_ratio
        loss_ratio = mean_b L_DD / mean_b L_base                                (reported)

    so that lambda_DD * |grad L_DD| = X * |grad L_base| at the start of fine-tuning. Returns the
    means, the per-batch norms and the split-half (even / odd batches) grad ratios.
    """
    batches = batches or cfg.calibration_batches
    model, params = trainable_copy(base, cfg)   # LoRA: B = 0, so only B has a gradient at the start
    sched, gen = build_scheduler(), torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batches):
        idx = torch.randint(0, refs.images.shape[0], (cfg.batch_size,), generator=gen).tolist()
        x0, caps = refs.images[idx], refs.captions(idx, arm)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (x0.shape[0],), generator=gen)
        x_t = sched.add_noise(x0, noise, t)
        pred = model(x_t, t, model.encode(caps["joint"]))
        l_base = (pred - training_target(sched, x0, noise, t)).pow(2).mean()
        l_dd = dd_term(model, model, arm, x0, caps, (x_t, t, pred), sched, cfg.dd_samples_per_image, gen)[0]
        rows.append({"L_base": float(l_base.detach()), "L_DD": float(l_dd.detach()), "g_base": _grad_norm(l_base, params),
                     "g_DD": _grad_norm(l_dd, params)})
    col = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    def ratio(sel) -> float:
        g_dd, g_base = col["g_DD"][sel], col["g_base"][sel]
        return float(g_dd.mean() / g_base.mean()) if len(g_dd) else float("nan")
    grad_ratio = ratio(slice(None))
    return {"grad_ratio": grad_ratio, "loss_ratio": float(col["L_DD"].mean() / col["L_base"].mean()),
            "lambda_per_unit": 1.0 / grad_ratio, "split_half": [ratio(slice(0, None, 2)), ratio(slice(1, None, 2))],
            "batches": batches, "samples": batches * cfg.batch_size,
            "per_batch": {k: [round(float(x), 6) for x in v] for k, v in col.items()}}


@torch.no_grad()
def class_images(base: T2I, n: int, seed: int = 4321, steps: int = 25, guidance: float = 3.0) -> torch.Tensor:
    """DreamBooth's prior-preservation data: n images of "a cross" from the base model itself."""
    from accord_face.testbed.model import sample
    return torch.cat([sample(base, [CLASS_PHRASE] * min(24, n - i), seed=seed + i, steps=steps, guidance=guidance)
                      for i in range(0, n, 24)])


def finetune(base: T2I, arm: Arm, refs: RefSet, cfg: FinetuneConfig, seed: int, lam: float,
             prior_images: torch.Tensor | None = None) -> tuple[T2I, dict]:
    """Fine-tune a copy of ``base`` under ``arm``; returns the model and training logs.

        L = L_base + lambda_DD L_DD [+ prior_weight L_prior]

    Same seed -> same image indices, noise and t in every arm (the DD-only and prior-only draws
    use separate generators so they do not shift the shared stream).
    """
    if arm.prior and prior_images is None:
        raise ValueError(f"arm {arm.name} uses prior preservation: pass prior_images (class_images(base, n))")
    model, params = trainable_copy(base, cfg)
    frozen = copy.deepcopy(base).eval().requires_grad_(False) if arm.reference == "frozen" else model
    sched = build_scheduler()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    gen, gen_dd = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 7919)
    gen_pp = torch.Generator().manual_seed(seed + 31337)
    logs = {"L_base": [], "L_DD": [], "L_prior": [], "ratio": [], "delta_by_quartile": {q: [] for q in range(4)}}
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
        if arm.prior:
            pidx = torch.randint(0, prior_images.shape[0], (cfg.batch_size,), generator=gen_pp)
            px0 = prior_images[pidx]
            pnoise = torch.randn(px0.shape, generator=gen_pp)
            pt = torch.randint(0, sched.config.num_train_timesteps, (px0.shape[0],), generator=gen_pp)
            ppred = model(sched.add_noise(px0, pnoise, pt), pt, model.encode([CLASS_PHRASE] * px0.shape[0]))
            l_prior = (ppred - training_target(sched, px0, pnoise, pt)).pow(2).mean()
            loss = loss + cfg.prior_weight * l_prior
            logs["L_prior"].append(float(l_prior.detach()))
        logs["L_base"].append(float(loss_base.detach()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return model.eval(), logs
