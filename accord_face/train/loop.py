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
from ..config import ConfigError, save_config
from ..data import build_dataset, collate
from ..tiny import resolve_pretrained
from . import checkpoint as ckpt
from .config import ShardInfo, TrainConfig, preflight
from .models import build_model, clip_text_features, compute_dtype, load_frozen_parts, reference_fn
from .step import compute_losses, prepare_batch
from .validation import sample_images, save_grid
from ..family.trainer import adapter_config_fields, attach_family_parts, face_crop_size, validation_clip

log = logging.getLogger("accord_face.train")

__all__ = ["train", "deepspeed_config", "DataStream"]


def _init_distributed(backend: str) -> None:
    import deepspeed

    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29500"}.items():
        os.environ.setdefault(key, value)  # a single process without a launcher (else DeepSpeed tries MPI)
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)


def deepspeed_config(cfg: TrainConfig, dtype: torch.dtype) -> dict:
    """The JSON's ZeRO settings + batch, optimizer, scheduler and precision from ``cfg`` (one source of truth)."""
    ds = json.loads(Path(cfg.deepspeed.config).read_text())
    o = cfg.optim
    ds.update({
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": o.gradient_accumulation_steps,
        "gradient_clipping": o.grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas), "eps": 1e-8,
                                                  "weight_decay": o.weight_decay, "torch_adam": True}},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 10 ** 9,
    })
    ds.pop("train_batch_size", None)
    if o.warmup_steps > 0:
        ds["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": o.lr,
                                                           "warmup_num_steps": o.warmup_steps,
                                                           "warmup_type": "linear"}}
    return ds


class DataStream:
    """Endless micro batches for this rank with a resumable position (epoch, samples consumed in it)."""

    def __init__(self, cfg: TrainConfig, info: ShardInfo, epoch: int = 0, consumed: int = 0):
        self.cfg, self.info, self.epoch, self.consumed = cfg, info, epoch, consumed
        self._it = self._open()

    def _open(self):
        from torch.utils.data import DataLoader

        c = self.cfg
        ds = build_dataset(self.info.urls, resolution=c.resolution, embedding_key=self.info.embedding_key,
                           shuffle_buffer=c.data.shuffle_buffer, seed=c.seed, epoch=self.epoch,
                           resampled=c.data.resampled, random_flip=c.data.random_flip, skip=self.consumed,
                           skip_batch_size=c.data.micro_batch_size,
                                 face_crop_size=self.info.face_crop_size)
        loader = DataLoader(ds, batch_size=c.data.micro_batch_size, collate_fn=collate,
                            num_workers=c.data.num_workers, drop_last=True)
        return iter(loader)

    def next(self) -> dict:
        for attempt in range(2):
            try:
                batch = next(self._it)
                self.consumed += len(batch["__key__"])
                return batch
            except StopIteration:
                if attempt and self.consumed == 0:
                    break
                self.epoch, self.consumed = self.epoch + 1, 0
                self._it = self._open()
        raise RuntimeError(f"rank {dist.get_rank()} got no complete batch of {self.cfg.data.micro_batch_size} from "
                           f"{len(self.info.urls)} shard(s) ({self.cfg.shards}): shards are split by rank and "
                           "worker, so write at least ranks x workers shards, or lower data.micro_batch_size")

    def position(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _gather(obj: Any) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


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
                   "pd_mapping": L.pd_mapping, "lambda_warmup_steps": L.lambda_warmup_steps},
        "train_steps": step,
        **adapter_config_fields(cfg, parts),
    }


def _export(engine, cfg, parts, info, out: Path, step: int) -> None:
    """Export the adapter on rank 0 (ZeRO-3: every rank gathers the partitioned weights first)."""
    import deepspeed

    model = engine.module
    with deepspeed.zero.GatheredParameters(model.trainable_parameters(), modifier_rank=None):
        if dist.get_rank() == 0:
            adapter.export_adapter(out / "adapter", model.encoder, model.unet,
                                   _adapter_info(cfg, parts, info, model, step))
            export_formats.after_adapter_export(out / "adapter", cfg.export_format, log.info)


def _save(engine, cfg, parts, info, out: Path, step: int, stream: DataStream) -> None:
    root = out / "checkpoints"
    tag = ckpt.tag_for(step)
    client = {"step": step, "data": _gather(stream.position()), "rng": _gather(_rng_state()),
              "world_size": dist.get_world_size()}
    engine.save_checkpoint(str(root), tag=tag, client_state=client, exclude_frozen_parameters=True)
    _export(engine, cfg, parts, info, out, step)
    dist.barrier()  # every rank has written its shard of the checkpoint
    if dist.get_rank() == 0:
        ckpt.mark_complete(root / tag, {"step": step, "time": time.time(), "data": client["data"],
                                        "world_size": client["world_size"]})
        ckpt.prune(root, cfg.checkpoint.keep_last)
    dist.barrier()


def _validation_faces(cfg: TrainConfig, info: ShardInfo, parts=None) -> Optional[dict]:
    """The first ``num_faces`` embeddings of the (unsplit, unshuffled) shards: fixed across runs.

    {"ids": (N, D), "clip": (N, 1, L, H) CLIP face states for FaceID-Plus, else None}."""
    ds = build_dataset(info.urls, resolution=cfg.resolution, embedding_key=info.embedding_key, shuffle_buffer=0,
                       split_by_node=False, split_by_worker=False, face_crop_size=info.face_crop_size)
    samples = [s for s, _ in zip(ds, range(cfg.validation.num_faces))]
    if not samples:
        return None
    crops = torch.stack([s["face_pixels"] for s in samples]) if info.face_crop_size else None
    return {"ids": torch.stack([s["face_embedding"] for s in samples]), "clip": validation_clip(parts, crops)}


def _validate(engine, cfg, parts, faces, out: Path, step: int, device) -> Optional[Path]:
    v = cfg.validation
    if faces is None or not v.enabled:
        return None
    if engine.zero_optimization_stage() < 3 and dist.get_rank() != 0:
        return None  # full weights on every rank: rank 0 alone samples (ZeRO-3: all ranks take part)
    prompts = [p for _ in range(len(faces["ids"])) for p in v.prompts]
    ids = faces["ids"].repeat_interleave(len(v.prompts), dim=0)
    clip = faces["clip"].repeat_interleave(len(v.prompts), dim=0) if faces["clip"] is not None else None
    columns = [sample_images(engine.module, parts, prompts, ids, s, v.num_inference_steps, v.guidance_scale,
                             cfg.resolution, cfg.seed, device, clip=clip) for s in v.scales]
    adapter.set_ip_scale(engine.module.unet, cfg.encoder.ip_scale)
    if dist.get_rank() == 0:
        return save_grid(columns, out / "samples" / f"step-{step:08d}.png")
    return None


def _resolved(cfg: TrainConfig, parts, info: ShardInfo) -> TrainConfig:
    return replace(cfg, pretrained_model_path=parts.path, shards=",".join(os.path.abspath(u) for u in info.urls)
                   if "," in cfg.shards else os.path.abspath(cfg.shards), recognizer=info.recognizer.get("name") or "auto")


def train(cfg: TrainConfig) -> dict:
    """Train the identity encoder; returns {"step", "output_dir", "adapter", "last": {term: value}}."""
    import deepspeed
    from tqdm import tqdm

    info = preflight(cfg)                              # fails on config/shard problems before any work
    _init_distributed(cfg.deepspeed.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = compute_dtype(cfg.deepspeed.precision, device)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if rank == 0:
        resolve_pretrained(cfg.pretrained_model)      # build an embedded pipeline once, not once per rank
    dist.barrier()
    parts = load_frozen_parts(cfg, device, dtype, with_clip=cfg.losses.lambda_pd > 0)
    attach_family_parts(cfg, parts, info, device, dtype, rank)          # CLIP tower / identity bank
    info.face_crop_size = face_crop_size(parts)
    model = build_model(cfg, parts)
    if parts.clip is not None and cfg.losses.pd_mapping == "text_projection_mean" and \
            parts.clip.text_projection.weight.shape[1] != model.unet.config.cross_attention_dim:
        raise ConfigError(f"'losses.pd_mapping': text_projection_mean needs the CLIP hidden size "
                          f"({parts.clip.text_projection.weight.shape[1]}) to equal the UNet cross-attention dim "
                          f"({model.unet.config.cross_attention_dim}); use text_projection_mean_tail (SDXL)")
    initial = model.trainable_state() if cfg.losses.dd_reference == "frozen_initial" else None
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.trainable_parameters(),
                                           config=deepspeed_config(cfg, dtype))
    if initial is not None:
        initial = {k: v.to(device=device, dtype=next(engine.module.parameters()).dtype) for k, v in initial.items()}
    ref = reference_fn(engine.module, initial) if initial is not None else engine

    step, position = 0, {"epoch": 0, "consumed": 0}
    resume_from = ckpt.find_resume(out / "checkpoints", cfg.resume)
    if resume_from is not None:
        _, client = engine.load_checkpoint(str(resume_from.parent), tag=resume_from.name, load_module_strict=False)
        if client["world_size"] != world:
            raise RuntimeError(f"{resume_from} was written by {client['world_size']} ranks; resume with the same "
                               f"number (now {world}) or start a new output_dir")
        step, position = client["step"], client["data"][rank]
        _set_rng_state(client["rng"][rank])
        log.info("resumed from %s at step %d (data epoch %d, %d samples in)", resume_from, step,
                 position["epoch"], position["consumed"])
    if rank == 0:
        save_config(_resolved(cfg, parts, info), out / "config.yaml")
    stream = DataStream(cfg, info, position["epoch"], position["consumed"])
    f_s = clip_text_features(parts, [cfg.losses.superclass_prompt], device)[0] if parts.clip is not None else None
    faces = _validation_faces(cfg, info, parts) if cfg.validation.enabled else None

    writer = None
    if rank == 0 and cfg.logging.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / "logs"))
    keys_log = open(out / f"samples-rank{rank}.jsonl", "a") if cfg.debug.log_sample_keys else None
    metrics_path = out / "metrics.jsonl"
    gas, global_batch = cfg.optim.gradient_accumulation_steps, cfg.data.micro_batch_size * \
        cfg.optim.gradient_accumulation_steps * world
    bar = tqdm(total=cfg.max_steps, initial=step, disable=rank != 0 or not cfg.logging.progress, unit="step",
               dynamic_ncols=True)
    last: dict[str, float] = {}
    engine.train()
    while step < cfg.max_steps:
        tic = time.perf_counter()
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
            engine.step()
            for k in ("loss", "mse", "dd", "pd"):
                sums[k] = sums.get(k, 0.0) + float(terms[k].detach()) / gas
            sums["cos_gap"] = sums.get("cos_gap", 0.0) + (float(terms["cos_gap"].mean()) if terms["cos_gap"].numel() else 0.0) / gas
            deltas.append(terms["delta"].cpu())
            dts.append(terms["dd_timesteps"].cpu())
        stats = _mean_over_ranks(sums)
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
                fh.write(json.dumps({"step": step, **stats}) + "\n")
            if writer and (step % cfg.logging.every_n_steps == 0 or step == cfg.max_steps):
                for k, v in stats.items():
                    writer.add_scalar(f"train/{k}", v, step)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", dd=f"{stats['dd']:.3g}", pd=f"{stats['pd']:.3g}",
                            sps=f"{stats['samples_per_s']:.1f}")
            bar.update(1)
        ck_every = cfg.checkpoint.every_n_steps  # 0 = only at the end
        if (ck_every and step % ck_every == 0) or step == cfg.max_steps:
            _save(engine, cfg, parts, info, out, step, stream)
        v_every = cfg.validation.every_n_steps
        if (v_every and step % v_every == 0) or step == cfg.max_steps:
            grid = _validate(engine, cfg, parts, faces, out, step, device)
            if grid:
                log.info("validation grid: %s", grid)
        if cfg.debug.kill_after_step is not None and step == cfg.debug.kill_after_step:
            os.kill(os.getpid(), signal.SIGKILL)       # test hook: a crash, no cleanup
    bar.close()
    if writer:
        writer.close()
    if keys_log:
        keys_log.close()
    dist.barrier()
    return {"step": step, "output_dir": str(out), "adapter": str(out / "adapter"), "last": last}
