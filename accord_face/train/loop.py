"""The encoder training loop under DeepSpeed: init, data stream, steps, logging, checkpoints, export.

Runs under the ``deepspeed``/``torchrun`` launchers or as one plain process
(``train`` sets the RANK/WORLD_SIZE/... defaults a launcher would set).
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from .. import adapter, export_formats
from ..quiet import phase
from ..config import ConfigError, save_config, to_dict
from ..data import build_dataset
from ..sections import lr_factor
from ..fingerprint import base_fingerprint
from ..tiny import resolve_pretrained
from . import checkpoint as ckpt
from . import guard
from .config import ShardInfo, TrainConfig, preflight
from .resume import check_pretrained, check_resume, resolved_shards
from .models import build_model, clip_text_features, compute_dtype, load_frozen_parts, reference_fn
from .step import compute_losses, prepare_batch
from .stream import DataError, DataStream
from .trackers import Trackers
from .validation import sample_images, save_grid
from ..family.trainer import (adapter_config_fields, attach_family_parts, face_crop_size, identity_lora_writer,
                              validation_clip)

log = logging.getLogger("accord_face.train")

__all__ = ["train", "deepspeed_config", "DataStream"]


def _init_distributed(backend: str) -> None:
    """The process group: the launcher's rendezvous (env://), or for a lone process an in-process store.

    A single process without a launcher needs no port at all (``HashStore``), so two such runs on one
    machine never collide (and a MASTER_PORT left in the environment does not matter). Under a launcher,
    a rendezvous port already in use is one line naming the port and ``--master_port``.
    """
    import deepspeed

    lone = "RANK" not in os.environ and "WORLD_SIZE" not in os.environ
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29500"}.items():
        os.environ.setdefault(key, value)
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if lone and not dist.is_initialized():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if not dist.is_initialized():
        try:
            deepspeed.init_distributed(dist_backend=backend)
        except (RuntimeError, OSError) as err:
            if "EADDRINUSE" in str(err) or "address already in use" in str(err).lower():
                raise ConfigError(guard.port_in_use_line(os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])) \
                    from None
            raise
    else:
        deepspeed.init_distributed(dist_backend=backend)   # DeepSpeed's communication backend over this group


def deepspeed_config(cfg: TrainConfig, dtype: torch.dtype) -> dict:
    """The JSON's ZeRO settings + batch, optimizer, scheduler and precision from ``cfg`` (one source of truth)."""
    ds = json.loads(Path(cfg.deepspeed.config).read_text())
    o = cfg.optimizer
    ds.update({
        "train_micro_batch_size_per_gpu": cfg.train_batch_size,
        "gradient_accumulation_steps": o.gradient_accumulation_steps,
        "gradient_clipping": o.max_grad_norm,
        "optimizer": {"type": "AdamW", "params": {"lr": o.learning_rate, "betas": [o.adam_beta1, o.adam_beta2],
                                                  "eps": o.adam_epsilon, "weight_decay": o.adam_weight_decay,
                                                  "torch_adam": True}},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 10 ** 9,
    })
    ds.pop("train_batch_size", None)
    if o.lr_warmup_steps > 0 and o.lr_scheduler == "constant":      # DeepSpeed's own (checkpoints of earlier runs)
        ds["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": o.learning_rate,
                                                           "warmup_num_steps": o.lr_warmup_steps,
                                                           "warmup_type": "linear"}}
    return ds


def lr_scheduler(cfg: TrainConfig):
    """The decaying schedules (``optimizer.lr_scheduler`` linear / cosine) as a client scheduler for
    ``deepspeed.initialize``: a LambdaLR over ``sections.lr_factor``, stepped by the engine once per optimizer
    step and saved in its checkpoints (``last_epoch``); None for constant (``deepspeed_config``'s WarmupLR)."""
    o = cfg.optimizer
    if o.lr_scheduler == "constant":
        return None

    def make(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, o.lr_warmup_steps, cfg.max_steps, o.lr_scheduler))

    return make


def _rng_state() -> dict:
    """The RNG states as a tensor and plain lists (a weights-only load reads them; numpy's own state
    object would need unpickling)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "python": [version, list(internal), gauss]}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _gather(obj: Any) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def _mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t.tolist())}


def _adapter_info(cfg: TrainConfig, parts, info: ShardInfo, model, step: int) -> dict:
    L = cfg.losses
    return {
        "base_model": cfg.pretrained_model, "base_model_path": parts.path, "is_sdxl": parts.is_sdxl,
        "cross_attention_dim": int(model.unet.config.cross_attention_dim), "num_tokens": cfg.encoder.num_tokens,
        "id_embed_dim": cfg.encoder.id_embed_dim, "encoder": cfg.encoder.kind, "recognizer": info.recognizer,
        "resolution": cfg.resolution,
        "losses": {"lambda_dd": L.lambda_dd, "lambda_pd": L.lambda_pd, "dd_batch_fraction": L.dd_batch_fraction,
                   "dd_every_n_steps": L.dd_every_n_steps, "dd_reference": L.dd_reference,
                   "dd_timesteps": L.dd_timesteps, "superclass_prompt": L.superclass_prompt,
                   "pd_mapping": L.pd_mapping, "lambda_warmup_steps": L.lambda_warmup_steps,
                   "lambda_id": L.lambda_id, "id_timestep_fraction": L.id_timestep_fraction},
        "train_steps": step,
        "base_fingerprint": getattr(parts, "base_fingerprint", None),   # checked by generate / evaluate
        **adapter_config_fields(cfg, parts),
    }


def _export(engine, cfg, parts, info, out: Path, step: int) -> None:
    """Export the adapter on rank 0 (ZeRO-3: every rank gathers the partitioned weights first)."""
    import deepspeed

    model = engine.module
    with deepspeed.zero.GatheredParameters(model.trainable_parameters(), modifier_rank=None):
        if dist.get_rank() == 0:
            adapter.export_adapter(out / "adapter", model.encoder, model.unet,
                                   _adapter_info(cfg, parts, info, model, step),
                                   before_swap=lambda: _maybe_kill(cfg, "export", step),
                                   extra=identity_lora_writer(model.unet, parts.is_sdxl))
            export_formats.after_adapter_export(out / "adapter", cfg.export_format, log.info)


def _save(engine, cfg, parts, info, out: Path, step: int, stream: DataStream) -> None:
    root = out / "checkpoints"
    tag = ckpt.tag_for(step)
    client = {"step": step, "data": _gather(stream.position()), "rng": _gather(_rng_state()),
              "world_size": dist.get_world_size()}
    keep = cfg.checkpointing.checkpoints_total_limit
    if dist.get_rank() == 0:  # room first: checkpoints_total_limit on disk at most, not one more
        ckpt.prune(root, keep - 1 if keep >= 2 else keep, current=tag)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state=client, save_latest=False,
                           exclude_frozen_parameters=True)
    _maybe_kill(cfg, "save", step)
    dist.barrier()  # every rank has written its shard of the checkpoint
    if dist.get_rank() == 0:
        ckpt.mark_complete(root / tag, {"step": step, "time": time.time(), "data": client["data"],
                                        "world_size": client["world_size"]})
    _export(engine, cfg, parts, info, out, step)
    if dist.get_rank() == 0:
        ckpt.prune(root, keep)
    dist.barrier()


def _validation_faces(cfg: TrainConfig, info: ShardInfo, parts=None) -> Optional[dict]:
    """The first ``num_faces`` embeddings of the (unsplit, unshuffled) shards: fixed across runs.

    {"ids": (N, D), "clip": (N, 1, L, H) CLIP face states for FaceID-Plus, else None}."""
    ds = build_dataset(info.urls, resolution=cfg.resolution, embedding_key=info.embedding_key, shuffle_buffer=0,
                       split_by_node=False, split_by_worker=False, embedding_dim=cfg.encoder.id_embed_dim,
                       face_crop_size=info.face_crop_size)
    samples = [s for s, _ in zip(ds, range(cfg.validation.num_faces))]
    if not samples:
        return None
    crops = torch.stack([s["face_pixels"] for s in samples]) if info.face_crop_size else None
    return {"ids": torch.stack([s["face_embedding"] for s in samples]), "clip": validation_clip(parts, crops)}


def _validate(engine, cfg, parts, faces, out: Path, step: int, device) -> Optional[Path]:
    from tqdm import tqdm

    v = cfg.validation
    if faces is None or not v.enabled:
        return None
    if engine.zero_optimization_stage() < 3 and dist.get_rank() != 0:
        return None  # full weights on every rank: rank 0 alone samples (ZeRO-3: all ranks take part)
    prompts = [p for _ in range(len(faces["ids"])) for p in v.validation_prompts]
    ids = faces["ids"].repeat_interleave(len(v.validation_prompts), dim=0)
    clip = faces["clip"].repeat_interleave(len(v.validation_prompts), dim=0) if faces["clip"] is not None else None
    columns = [sample_images(engine.module, parts, prompts, ids, s, v.num_inference_steps, v.guidance_scale,
                             cfg.resolution, cfg.seed, device, clip=clip)
               for s in tqdm(v.scales, desc="validation (scales)", disable=dist.get_rank() != 0, leave=False)]
    adapter.set_ip_scale(engine.module.unet, cfg.encoder.ip_scale)
    if dist.get_rank() == 0:
        return save_grid(columns, out / "samples" / f"step-{step:08d}.png")
    return None


def _resolved(cfg: TrainConfig, parts, info: ShardInfo) -> TrainConfig:
    return replace(cfg, pretrained_model_path=parts.path, shards=resolved_shards(cfg, info),
                   recognizer=info.recognizer.get("name") or "auto")


def _maybe_kill(cfg: TrainConfig, point: str, step: int) -> None:
    """Test hook ``debug.kill_at="<point>:<step>[:<rank>]"``: SIGKILL here (a crash, no cleanup)."""
    spec = cfg.debug.kill_at
    if spec and spec.split(":")[:2] == [point, str(step)] and \
            (len(spec.split(":")) < 3 or spec.split(":")[2] == str(dist.get_rank())):
        os.kill(os.getpid(), signal.SIGKILL)


def _prepare(cfg: TrainConfig) -> tuple[ShardInfo, Optional[Path], Optional[guard.OutputLock]]:
    """Everything that can refuse a run before any model loads or process group starts."""
    info = preflight(cfg)                              # config/shard problems
    check_pretrained(cfg.pretrained_model)             # unknown embedded size, missing folder, offline hub id
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(cfg.output_dir)
    lock = None
    if rank == 0:
        guard.check_output_dir(out)                   # parent is a file, unwritable: one line, nothing loaded
        lock = guard.OutputLock(out)                  # a second run in this folder stops here
    try:
        resume_from = check_resume(cfg, info, out, world) if (out / "checkpoints").is_dir() or \
            cfg.checkpointing.resume_from_checkpoint not in ("latest", "none", "force") else None
    except BaseException:
        if lock:
            lock.release()
        raise
    return info, resume_from, lock


def _finish(engine, cfg, parts, info, faces, out: Path, step: int, stream, device) -> None:
    """After the last step, or on a rerun of a finished run: what a kill after the final checkpoint lost
    (the adapter export, the validation grid, the prune)."""
    if dist.get_rank() == 0:
        ckpt.prune(out / "checkpoints", cfg.checkpointing.checkpoints_total_limit)
    done = out / "adapter" / adapter.CONFIG_NAME
    try:
        exported = json.loads(done.read_text()).get("train_steps") if done.is_file() else None
    except (OSError, ValueError):
        exported = None
    if _gather(exported)[0] != step:
        _export(engine, cfg, parts, info, out, step)
    grid = out / "samples" / f"step-{step:08d}.png"
    if cfg.validation.enabled and not _gather(grid.is_file())[0]:
        if dist.get_rank() == 0 and faces is not None:
            v = cfg.validation
            log.info("final validation grid: %d faces x %d prompts x %d scales, %d sampler steps each",
                     len(faces["ids"]), len(v.validation_prompts), len(v.scales), v.num_inference_steps)
        made = _validate(engine, cfg, parts, faces, out, step, device)
        if made:
            log.info("validation grid: %s", made)
    dist.barrier()


def train(cfg: TrainConfig) -> dict:
    """Train the identity encoder; returns {"step", "output_dir", "adapter", "last", "skipped", "stopped"}.

    ``stopped``: the signal name when SIGTERM/SIGINT ended the run early (after a checkpoint), else None.
    """
    import deepspeed
    from tqdm import tqdm

    info, resume_from, lock = _prepare(cfg)
    guard.watch_launcher()                             # an orphaned rank stops instead of training on
    _init_distributed(cfg.deepspeed.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = compute_dtype(cfg.precision.mixed_precision, device)
    out = Path(cfg.output_dir)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if rank == 0:
        resolve_pretrained(cfg.pretrained_model)      # build an embedded pipeline once, not once per rank
    dist.barrier()
    parts = load_frozen_parts(cfg, device, dtype, with_clip=cfg.losses.lambda_pd > 0)
    attach_family_parts(cfg, parts, info, device, dtype, rank)          # CLIP tower / identity bank
    if cfg.losses.lambda_id > 0:
        from .identity_loss import load_identity_loss
        try:
            parts.identity_loss = load_identity_loss(cfg.losses.id_recognizer, info.recognizer, device)
        except (ValueError, NotImplementedError) as err:
            raise ConfigError(str(err)) from None
    if cfg.data.latent_cache_mb > 0:
        from .latent_cache import LatentCache
        parts.latent_cache = LatentCache(cfg.data.latent_cache_mb)
    info.face_crop_size = face_crop_size(parts)
    model = build_model(cfg, parts)
    parts.base_fingerprint = base_fingerprint(cfg.pretrained_model, parts.path, model.unet)   # before ZeRO partitions
    if parts.clip is not None and cfg.losses.pd_mapping == "text_projection_mean" and \
            parts.clip.text_projection.weight.shape[1] != model.unet.config.cross_attention_dim:
        raise ConfigError(f"'losses.pd_mapping': text_projection_mean needs the CLIP hidden size "
                          f"({parts.clip.text_projection.weight.shape[1]}) to equal the UNet cross-attention dim "
                          f"({model.unet.config.cross_attention_dim}); use text_projection_mean_tail (SDXL)")
    initial = model.trainable_state() if cfg.losses.dd_reference == "frozen_initial" else None
    with phase("starting DeepSpeed (its first start on a machine compiles a C++ op: 1-3 minutes, cached after)",
               log.info, enabled=rank == 0):
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.trainable_parameters(),
                                               config=deepspeed_config(cfg, dtype), lr_scheduler=lr_scheduler(cfg))
    ckpt.make_loads_safe(engine)                       # checkpoint reads: weights-only, never unpickling
    if initial is not None:
        initial = {k: v.to(device=device, dtype=next(engine.module.parameters()).dtype) for k, v in initial.items()}
    ref = reference_fn(engine.module, initial) if initial is not None else engine

    step, position = 0, {"epoch": 0, "consumed": 0}
    if resume_from is not None:
        _, client = engine.load_checkpoint(str(resume_from.parent), tag=resume_from.name, load_module_strict=False)
        step, position = client["step"], client["data"][rank]
        _set_rng_state(client["rng"][rank])
        log.info("resumed from %s at step %d (data epoch %d, %d samples in)", resume_from, step,
                 position["epoch"], position["consumed"])
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        save_config(_resolved(cfg, parts, info), out / "config.yaml")
        dropped = guard.truncate_jsonl(metrics_path, step)  # the steps this run replays get new rows
        if dropped:
            log.info("metrics.jsonl: %d row(s) past step %d dropped (they are replayed)", dropped, step)
    if cfg.debug.log_sample_keys:
        guard.truncate_jsonl(out / f"samples-rank{rank}.jsonl", step)
    stream = DataStream(cfg, info, position["epoch"], position["consumed"], position.get("skipped"))
    f_s = clip_text_features(parts, [cfg.losses.superclass_prompt], device)[0] if parts.clip is not None else None
    faces = _validation_faces(cfg, info, parts) if cfg.validation.enabled else None

    trackers = Trackers(cfg.logging.report_to, out, step, config=to_dict(cfg)) if rank == 0 else None
    keys_log = open(out / f"samples-rank{rank}.jsonl", "a") if cfg.debug.log_sample_keys else None
    gas = cfg.optimizer.gradient_accumulation_steps
    global_batch = cfg.train_batch_size * gas * world
    bar = tqdm(total=cfg.max_steps, initial=step, disable=rank != 0 or not cfg.logging.progress, unit="step",
               dynamic_ncols=True)
    last: dict[str, float] = {}
    stop, stopped = guard.StopFlag(), None
    engine.train()
    while step < cfg.max_steps:
        tic, ctic = time.perf_counter(), time.process_time()
        step += 1
        sums: dict[str, float] = {}
        deltas, dts = [], []
        for _ in range(gas):
            batch = stream.next()
            if keys_log:
                keys_log.write(json.dumps({"step": step, "epoch": stream.epoch, "keys": batch["__key__"]}) + "\n")
            sb = prepare_batch(batch, parts, cfg, step, device, dtype)
            terms = compute_losses(engine, sb, parts, cfg, step, f_s=f_s, ref=ref)
            engine.backward(terms["loss"])
            _maybe_kill(cfg, "backward", step)
            engine.step()
            for k in ("loss", "mse", "dd", "pd", "id"):
                sums[k] = sums.get(k, 0.0) + float(terms[k].detach()) / gas
            sums["cos_gap"] = sums.get("cos_gap", 0.0) + (float(terms["cos_gap"].mean()) if terms["cos_gap"].numel() else 0.0) / gas
            deltas.append(terms["delta"].cpu())
            dts.append(terms["dd_timesteps"].cpu())
        sums["cpu_s"] = time.process_time() - ctic   # this rank's CPU seconds for the step (all its threads)
        stats = _mean_over_ranks(sums)
        totals = _sum_over_ranks({**{f"data_{k}s": float(v) for k, v in stream.skipped.items()},
                                  "stop": 1.0 if stop.requested else 0.0})
        stop_now = totals.pop("stop") > 0              # any rank got SIGTERM/SIGINT: all stop together
        stats.update({k: int(v) for k, v in totals.items()})
        stats["dd_ratio"] = float(terms["lambda_dd"]) * stats["dd"] / max(stats["mse"], 1e-12)
        stats["lambda_dd"], stats["lambda_pd"] = float(terms["lambda_dd"]), float(terms["lambda_pd"])
        stats["lr"] = float(engine.get_lr()[0])
        elapsed = time.perf_counter() - tic
        stats["samples_per_s"] = global_batch / elapsed
        delta, dt = torch.cat(deltas), torch.cat(dts)
        if len(delta):
            from ..losses import quartile_means
            for q, v in quartile_means(delta, dt, parts.scheduler.config.num_train_timesteps).items():
                stats[f"delta_q{q}"] = v
        if device.type == "cuda":
            stats["mem_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        else:
            import resource
            stats["mem_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # peak RSS (KiB -> GiB)
        last = stats
        if rank == 0:
            with open(metrics_path, "a") as fh:
                fh.write(guard.json_line({"step": step, **stats}))
            if trackers and (step % cfg.logging.logging_steps == 0 or step == cfg.max_steps):
                trackers.log(stats, step)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", dd=f"{stats['dd']:.3g}", pd=f"{stats['pd']:.3g}",
                            sps=f"{stats['samples_per_s']:.1f}")
            bar.update(1)
        ck_every = cfg.checkpointing.checkpointing_steps  # 0 = only at the end
        if (ck_every and step % ck_every == 0) or step == cfg.max_steps or stop_now:
            _save(engine, cfg, parts, info, out, step, stream)
        if stop_now:
            stopped = stop.requested or "signal"
            log.warning("stopped at step %d by %s: checkpoint %s saved; rerun the same command to resume", step,
                        stopped, out / "checkpoints" / ckpt.tag_for(step))
            break
        v_every = cfg.validation.validation_steps
        if v_every and step % v_every == 0 and step != cfg.max_steps:
            grid = _validate(engine, cfg, parts, faces, out, step, device)
            if grid:
                log.info("validation grid: %s", grid)
        if cfg.debug.kill_after_step is not None and step == cfg.debug.kill_after_step:
            os.kill(os.getpid(), signal.SIGKILL)       # test hook: a crash, no cleanup
    bar.close()
    stop.restore()
    if parts.latent_cache is not None:
        log.info(parts.latent_cache.summary())
    if stopped is None:
        _maybe_kill(cfg, "finish", step)
        _finish(engine, cfg, parts, info, faces, out, step, stream, device)
    if trackers:
        trackers.close()
    if keys_log:
        keys_log.close()
    dist.barrier()
    if lock:
        lock.release()
    return {"step": step, "output_dir": str(out), "adapter": str(out / "adapter"), "last": last,
            "skipped": dict(stream.skipped), "stopped": stopped}
