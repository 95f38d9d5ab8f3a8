"""The LoRA training loop (single process or ``accelerate launch``).

    refs  = prompts + images (metadata / captions / templates; or a synthetic set)
    step  : instance (+ class) micro-batches -> loss_terms -> backward -> all-reduce -> AdamW
    every : log terms (metrics.jsonl, TensorBoard logs/), checkpoint (accelerate save_state) + export (lora/),
            grid (samples/)
    SIGTERM / SIGINT: checkpoint at the end of the current step, export, leave; the rerun resumes there.

Gradients are averaged across processes by hand (``accelerator.reduce``)
instead of wrapping the UNet in DDP: only the LoRA weights train, DDLoss may
skip steps (unused parameters), and the reference branches must call the
unwrapped peft model anyway.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import save_config
from ..sections import lr_factor
from .config import LoraTrainConfig
from .data import ReferenceSet, class_image_batch, make_synthetic_references
from .checkpoints import find_resume, load_checkpoint, prune_checkpoints, register_hooks, save_checkpoint
from .export import export_lora
from .models import LoraModels, load_models, restore_frozen_embeddings, trainable_parameters
from .objective import Batch, loss_terms
from .prompts import build_references, describe_sources
from .sampling import ensure_class_images, generate, save_grid


def vae_scale(models: LoraModels) -> int:
    return 2 ** (len(models.vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_images(models: LoraModels, pixels: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> scaled VAE latents (B, 4, H/f, W/f), fp32; ``eps`` draws the posterior sample."""
    dist = models.vae.encode(pixels.to(models.device, models.vae.dtype)).latent_dist
    return ((dist.mean + dist.std * eps.to(dist.mean)) * models.vae.config.scaling_factor).float()


def _draws(cfg: LoraTrainConfig, first: int, count: int, shape: tuple, T: int, salt: int):
    """Per-sample randomness (VAE posterior eps, noise, t) seeded by the global sample index.

    Seeding per sample, not per micro-batch, makes N processes x batch B draw exactly
    what one process with batch N*B draws, so a multi-process step equals the single-process one.
    """
    eps, noise, t = [], [], []
    for k in range(first, first + count):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_033 + salt + 2 * k)
        eps.append(torch.randn(shape, generator=gen))
        noise.append(torch.randn(shape, generator=gen))
        t.append(torch.randint(0, T, (1,), generator=gen))
    return torch.stack(eps), torch.stack(noise), torch.cat(t)


def make_batch(models: LoraModels, refset: ReferenceSet, class_paths, cfg: LoraTrainConfig, index: int) -> Batch:
    """Micro-batch number ``index`` (samples index*B .. index*B+B-1): a pure function of (seed, index)."""
    B = cfg.train_batch_size
    pixels, prompts = refset.batch(index, B)
    T = models.scheduler.config.num_train_timesteps
    f = vae_scale(models)
    shape = (models.vae.config.latent_channels, pixels.shape[-2] // f, pixels.shape[-1] // f)
    eps, noise, t = _draws(cfg, index * B, B, shape, T, salt=0)
    batch = Batch(encode_images(models, pixels, eps), prompts, noise, t)
    if class_paths:
        cpix, cprompts = class_image_batch(class_paths, cfg.prior.class_prompt, index, B,
                                           refset.resolution, cfg.data, cfg.seed)
        eps, batch.class_noise, batch.class_timesteps = _draws(cfg, index * B, B, shape, T, salt=1)
        batch.class_latents = encode_images(models, cpix, eps)
        batch.class_prompts = cprompts
    return batch


def barrier(accelerator) -> None:
    """Wait for every process.

    ``accelerator.wait_for_everyone()`` alone is not enough: on CPU, accelerate reports
    DistributedType.NO for a gloo group and its barrier is then a no-op, which let rank 1 read
    the reference folder while rank 0 was still writing it.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    else:
        accelerator.wait_for_everyone()


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Mean of the gradients over all processes, as one flat all-reduce (no-op for a single process).

    torch.distributed directly: on CPU accelerate reports DistributedType.NO for a gloo group,
    and its ``reduce`` then divides by the world size without summing.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])  # (N,)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def prepare_references(cfg: LoraTrainConfig, out: Path, resolution: int, log) -> list:
    folder = cfg.data.reference_dir
    if folder is None:
        folder = out / "references"
        if not (folder / ".complete").is_file():
            make_synthetic_references(folder, cfg.data.synthetic, cfg.data.synthetic_count,
                                      size=max(96, resolution), seed=cfg.seed)
            (folder / ".complete").write_text("")
        log(f"[lora] synthetic '{cfg.data.synthetic}' reference set: {folder}")
    refs = build_references(folder, cfg.data)
    log(f"[lora] {describe_sources(refs)} ({folder})")
    if cfg.textual_inversion.enabled:
        ti = cfg.textual_inversion
        refs = [dataclasses.replace(r, prompts=r.prompts.replace_word(ti.replace, ti.token)) for r in refs]
    first = refs[0].prompts
    log(f"[lora] prompts of {refs[0].image.name}: joint={first.joint!r} target={first.target!r} "
        f"context={first.context!r} empty=''")
    return refs


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Learning-rate multiplier of optimizer step ``step`` (0-based): lr_t = lr * min(1, t / W).

    diffusers' ``constant_with_warmup`` schedule (``sections.lr_factor`` with ``constant``).
    """
    return lr_factor(step, warmup_steps, 0, "constant")


def run_config_changes(cfg: LoraTrainConfig, stored_path: Path) -> list[str]:
    """``key: old -> new`` between the run config stored in OUTPUT/config.yaml and ``cfg``.

    Keys a resume may change (``guard.RESUMABLE_CHANGES``: length, checkpointing, logging, validation,
    export) do not count; nor does ``resolution`` when ``cfg`` leaves it to the model (null).
    """
    from ..config import ConfigError, load_config, to_dict
    from ..train.guard import config_changes

    try:
        stored = to_dict(load_config(LoraTrainConfig, stored_path, warn_renamed=False))
    except ConfigError as err:
        return [f"the stored config does not load ({' '.join(str(err).split())})"]
    new = to_dict(cfg)
    if cfg.resolution is None:
        stored.pop("resolution", None)
        new.pop("resolution", None)
    return config_changes(stored, new)


def check_output_run(cfg: LoraTrainConfig) -> Path | None:
    """Refuse an output folder holding a LoRA run with another config (unless resume_from_checkpoint=force);
    return the checkpoint to resume from (None: start fresh). checks.UsageError, one line."""
    from .. import checks

    out = Path(cfg.output_dir)
    resume = cfg.checkpointing.resume_from_checkpoint
    stored = out / "config.yaml"
    if resume != "force" and stored.is_file():
        changes = run_config_changes(cfg, stored)
        if changes:
            shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
            raise checks.UsageError(f"output_dir {out} holds a LoRA run with another config ({shown}): rerun with "
                                    f"its settings ({stored}), --resume_from_checkpoint force to continue it with "
                                    "these, or pick a new output_dir")
    try:
        return find_resume(out / "checkpoints", resume)
    except FileNotFoundError as err:
        raise checks.UsageError(str(err)) from None


def preflight(cfg: LoraTrainConfig) -> None:
    """Paths and hub reachability, before accelerate starts or any model loads (checks.UsageError)."""
    from .. import checks

    if cfg.data.reference_dir is not None:
        folder = checks.check_folder(cfg.data.reference_dir, "data.reference_dir",
                                     "a folder of 3-20 reference images (+ metadata.jsonl or .txt captions)")
        from .prompts import IMAGE_SUFFIXES

        if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir()):
            raise checks.UsageError(f"data.reference_dir {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    checks.check_hub_reachable(cfg.pretrained_model, "pretrained_model")
    if cfg.accord.projection_model:
        checks.check_hub_reachable(cfg.accord.projection_model, "accord.projection_model", probe="config.json")


def train_lora(cfg: LoraTrainConfig, log=None) -> dict:
    """Train, checkpoint, export; returns paths, the last logged terms and the trained ``models``.

    ``log`` takes one line; the default writes above the progress bar (``tqdm.write``).
    """
    from accelerate import Accelerator, InitProcessGroupKwargs

    from ..sections import accelerate_precision
    from ..train.guard import OutputLock, StopFlag, check_output_dir, json_line, truncate_jsonl

    preflight(cfg)
    lock = None
    if int(os.environ.get("RANK", "0")) == 0:  # one run per output folder (a second one stops here, one line)
        check_output_dir(Path(cfg.output_dir))
        lock = OutputLock(Path(cfg.output_dir))
    try:
        resume_from = check_output_run(cfg)
    except BaseException:
        if lock:
            lock.release()
        raise
    cuda = torch.cuda.is_available()
    # Several CPU processes (accelerate launch on a laptop, tests) talk over gloo; a lone process needs no group.
    gloo = not cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1
    precision = accelerate_precision(cfg.precision.mixed_precision, cuda)
    report_to = cfg.logging.report_to
    accelerator = Accelerator(mixed_precision=precision, log_with="wandb" if report_to == "wandb" else None,
                              kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if gloo else [])
    main = accelerator.is_main_process
    log = (log or tqdm.write) if main else (lambda *a, **k: None)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Same seed on every rank: LoRA A matrices must start identical. Per-step randomness is seeded per sample.
    torch.manual_seed(cfg.seed)

    if main:  # build an embedded pipeline once, before the other ranks read it
        from ..tiny import resolve_pretrained

        resolve_pretrained(cfg.pretrained_model)
    barrier(accelerator)
    models = load_models(cfg, accelerator.device)
    resolution = cfg.resolution or models.unet.config.sample_size * vae_scale(models)
    cfg = dataclasses.replace(cfg, resolution=resolution)
    if main:
        save_config(cfg, out / "config.yaml")
    log(f"[lora] base model {cfg.pretrained_model} -> {models.pretrained}; resolution {resolution}; "
        f"{accelerator.num_processes} process(es) on {accelerator.device}")
    refs = prepare_references(cfg, out, resolution, log) if main else None
    barrier(accelerator)
    if not main:
        refs = prepare_references(cfg, out, resolution, log)
    refset = ReferenceSet(refs, resolution, cfg.data, cfg.seed)

    class_paths = []
    if cfg.prior.enabled:
        class_dir = Path(cfg.prior.class_dir or out / "class_images")
        if main:
            ensure_class_images(models, class_dir, cfg.prior.class_prompt, cfg.prior.num_images,
                                cfg.prior.inference_steps, cfg.seed, log)
        barrier(accelerator)
        class_paths = [class_dir / f"class-{i:04d}.png" for i in range(cfg.prior.num_images)]

    opt = cfg.optimizer
    groups = trainable_parameters(models, opt.learning_rate, cfg.textual_inversion.learning_rate,
                                  opt.adam_weight_decay)
    for g in groups:
        g["base_lr"] = g["lr"]
    params = [p for g in groups for p in g["params"]]
    # Prepared for fp16 loss scaling (unscale before clipping, skip steps with inf) and for save_state /
    # load_state; gradients are averaged by hand, see average_gradients.
    optimizer = accelerator.prepare_optimizer(torch.optim.AdamW(groups, betas=(opt.adam_beta1, opt.adam_beta2),
                                                                eps=opt.adam_epsilon))
    register_hooks(accelerator, models)
    log(f"[lora] trainable parameters: {sum(p.numel() for p in params):,}")

    start = 0
    ckpt_root = out / "checkpoints"
    if resume_from is not None:
        start = load_checkpoint(accelerator, resume_from, models, optimizer)["step"]
        log(f"[lora] resumed from {resume_from} (step {start})")

    models.unet.train()
    log_path = out / "metrics.jsonl"   # the encoder trainer's name (was logs.jsonl)
    if main:
        truncate_jsonl(log_path, start)   # rows of steps this run replays
    writer = None
    if main and report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "logs"), purge_step=start + 1 if start else None)
    elif report_to == "wandb":
        accelerator.init_trackers("accord-face-lora", config=json.loads(json.dumps(dataclasses.asdict(cfg))))
    last: dict = {}
    grid = None
    stop, stopped = StopFlag(), None
    gas = opt.gradient_accumulation_steps
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps,
               disable=not main or not cfg.logging.progress, desc="lora")
    for step in bar:
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(step, opt.lr_warmup_steps, cfg.max_steps, opt.lr_scheduler)
        for micro in range(gas):
            index = (step * gas + micro) * accelerator.num_processes + accelerator.process_index
            batch = make_batch(models, refset, class_paths, cfg, index)
            with accelerator.autocast():
                terms, stats = loss_terms(models, batch, cfg, step,
                                          torch.Generator().manual_seed(cfg.seed * 31 + index))
            accelerator.backward(terms["loss"] / gas)
            for k, v in list(terms.items()) + list(stats.items()):
                sums[k] = sums.get(k, 0.0) + float(torch.as_tensor(v).detach()) / gas
        average_gradients(params)
        if opt.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, opt.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        restore_frozen_embeddings(models)
        done = step + 1
        last = {"step": done, **sums, "lr": optimizer.param_groups[0]["lr"], "sec_per_step": time.perf_counter() - t0}
        bar.set_postfix(loss=f"{sums['loss']:.4f}", **({"dd": f"{sums['dd']:.3g}"} if "dd" in sums else {}))
        stop_now = any_rank(stop.requested is not None)   # all ranks stop at the same step
        if main and (done % cfg.logging.logging_steps == 0 or done == cfg.max_steps or done == start + 1
                     or stop_now):
            with log_path.open("a") as f:
                f.write(json_line(last))
            if writer:
                for k, v in last.items():
                    if k != "step" and isinstance(v, (int, float)):
                        writer.add_scalar(f"train/{k}", v, done)
            if report_to == "wandb":
                accelerator.log({k: v for k, v in last.items() if k != "step"}, step=done)
            log("[lora] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in last.items()))
        every = cfg.checkpointing.checkpointing_steps   # 0 = only at the end
        if main and ((every and done % every == 0) or done == cfg.max_steps or stop_now):
            save_checkpoint(accelerator, ckpt_root, done, {"loss": sums["loss"]},
                            cfg.checkpointing.checkpoints_total_limit)
            export(models, cfg, out / "lora", log, quiet=done != cfg.max_steps and not stop_now)
        if stop_now:
            stopped = stop.requested or "signal"
            log(f"[lora] stopped at step {done} by {stopped}: checkpoint {ckpt_root / f'step-{done:08d}'} saved; "
                "rerun the same command to resume")
            barrier(accelerator)
            break
        v_every = cfg.validation.validation_steps
        if main and ((v_every and done % v_every == 0) or done == cfg.max_steps):
            grid = validation_grid(models, cfg, out / "samples" / f"step-{done:08d}.png")
        barrier(accelerator)
    bar.close()
    stop.restore()

    if writer:
        writer.close()
    if report_to == "wandb":
        accelerator.end_training()
    if main and stopped is None:
        prune_checkpoints(ckpt_root, cfg.checkpointing.checkpoints_total_limit)
        if not (out / "lora").is_dir():  # resumed a finished run: export what the checkpoint holds
            export(models, cfg, out / "lora", log)
    barrier(accelerator)
    if stopped is None:
        log(f"[lora] LoRA weights: {out / 'lora'}" + (f"; validation grid: {grid}" if grid else ""))
    if lock:
        lock.release()
    return {"output_dir": str(out), "lora_dir": str(out / "lora"), "grid": str(grid) if grid else None,
            "last": last, "start_step": start, "step": int(last.get("step", start)), "stopped": stopped,
            "models": models}


def any_rank(flag: bool) -> bool:
    """True on every process when ``flag`` is true on any (a SIGTERM may reach one rank only)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value)
    return bool(value.item() > 0)


def export(models: LoraModels, cfg: LoraTrainConfig, folder: Path, log, quiet: bool = False) -> None:
    """The diffusers export, plus the kohya file when ``export_format`` asks for it (one line about both)."""
    from ..export_formats import export_lora_as

    export_lora(models, folder)
    extra = export_lora_as(folder, cfg.export_format)
    if not quiet:
        log(f"[lora] {folder / 'pytorch_lora_weights.safetensors'}: diffusers' layout (pipe.load_lora_weights)"
            + (f"; {extra}: kohya layout (ComfyUI, A1111)" if extra else
               "; export_format=kohya also writes the ComfyUI / A1111 layout"))


def validation_grid(models: LoraModels, cfg: LoraTrainConfig, path: Path) -> Path:
    """One row per validation prompt (learned token substituted), ``num_validation_images`` columns."""
    prompts = list(cfg.validation.validation_prompts)
    if cfg.textual_inversion.enabled:
        from .prompts import PromptSet

        ti = cfg.textual_inversion
        prompts = [PromptSet(p, "", "").replace_word(ti.replace, ti.token).joint for p in prompts]
    v = cfg.validation
    images = generate(models, prompts, v.num_validation_images, v.num_inference_steps, v.guidance_scale, cfg.seed)
    return save_grid(images, len(prompts), path)
