"""Train (or load from cache) the base text-to-image model of the testbed.

Resumable: a checkpoint (weights, EMA, optimizer, step, RNG) is written
atomically every ``checkpoint_every`` steps; a rerun continues from it. The
finished EMA model is stored as safetensors (``base_model.safetensors``) with
the config it was trained with beside it (``base_model.json``): a cache holding a
base model of another config is refused with one line, never silently reused.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from accord_face.config import ConfigError, to_dict
from accord_face.testbed.config import BaseModelConfig
from accord_face.testbed.model import T2I, build_scheduler, training_target
from accord_face.testbed.world import CaptionStyle, partial_caption, random_scene, render_batch

log = logging.getLogger(__name__)


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_weights(path: Path):
    """``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts, never code.

    A file that needs anything else raises ValueError naming it (delete it to rebuild it).
    """
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"{path}: refused, not a weights-only file ({' '.join(str(err).split())[:160]}); delete "
                         "it to rebuild it") from None


def save_state(state: dict[str, torch.Tensor], path: Path) -> None:
    """Atomic safetensors write of a state dict (tensors only: nothing to unpickle on load)."""
    from safetensors.torch import save_file
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """safetensors -> state dict; a file that is not one raises ValueError naming it (delete it to rebuild it)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: not a safetensors file ({' '.join(str(err).split())[:120]}); delete it to "
                         "rebuild it") from None


def base_batch(rng: np.random.Generator, n: int, dropout: float,
               style: CaptionStyle = CaptionStyle()) -> tuple[torch.Tensor, list[str]]:
    """n random base-world scenes (0-2 base shapes incl. crosses, never orange, never the target) and
    their captions: some dropped (guidance), some partial (no background, one object, no colour)."""
    scenes = []
    for _ in range(n):
        k = int(rng.choice(3, p=[0.1, 0.45, 0.45]))
        scenes.append(random_scene(rng, min_objects=k, max_objects=k))
    caps = ["" if rng.random() < dropout else partial_caption(s, rng, style) for s in scenes]
    return torch.from_numpy(render_batch(scenes)), caps


RUN_ONLY = ("threads", "checkpoint_every")  # how a base is trained, not what it is


def base_record(cfg: BaseModelConfig) -> dict:
    """The fields that make a base model what it is (``base_model.json`` in the cache and the assets)."""
    return {k: v for k, v in to_dict(cfg).items() if k not in RUN_ONLY}


def check_cached_base(cache: Path, cfg: BaseModelConfig) -> None:
    """Raise ConfigError when ``cache`` records a base model trained with another config.

    A cache without a record (made before records existed) is accepted as it is."""
    rec = cache / "base_model.json"
    if not rec.exists():
        return
    have = {k: v for k, v in json.loads(rec.read_text()).get("config", {}).items() if k not in RUN_ONLY}
    want = base_record(cfg)
    diff = {k: (have.get(k), want[k]) for k in want if have.get(k) != want[k]}
    if diff:
        shown = ", ".join(f"base.{k} {a} (cached) vs {b}" for k, (a, b) in sorted(diff.items()))
        raise ConfigError(f"{cache}: holds a base model trained with another config ({shown}); set cache_dir to "
                          "another folder or delete base_model.* there to retrain")


def train_base(cfg: BaseModelConfig, cache: Path) -> T2I:
    """Return the EMA base model, training it (resumably) if ``cache/base_model.safetensors`` is missing."""
    cache.mkdir(parents=True, exist_ok=True)
    final, ckpt_path = cache / "base_model.safetensors", cache / "base_ckpt.pt"
    model = T2I(cfg.seed)
    check_cached_base(cache, cfg)
    if final.exists():
        model.load_state_dict(load_state(final))
        return model.eval()
    style = CaptionStyle(cfg.no_background, cfg.one_object, cfg.no_colour)
    torch.set_num_threads(cfg.threads)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = build_scheduler()
    rng, step = np.random.default_rng(cfg.seed), 0
    if ckpt_path.exists():
        ck = load_weights(ckpt_path)  # tensors and plain values only: a crafted pickle is refused, never run
        model.load_state_dict(ck["model"]), ema.load_state_dict(ck["ema"]), opt.load_state_dict(ck["opt"])
        step, rng.bit_generator.state = ck["step"], ck["rng"]
        torch.set_rng_state(ck["torch_rng"])
        log.info("base model: resuming at step %d from %s", step, ckpt_path)
    bar = tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, desc="base model", mininterval=30)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / 200)
        x0, caps = base_batch(rng, cfg.batch_size, cfg.caption_dropout, style)
        noise = torch.randn_like(x0)
        t = torch.randint(0, sched.config.num_train_timesteps, (x0.shape[0],))
        target = training_target(sched, x0, noise, t)
        loss = (model(sched.add_noise(x0, noise, t), t, model.encode(caps)) - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))  # warm-up as diffusers' EMAModel: no init bias
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if (step + 1) % 100 == 0:
            log.info("base step %d loss %.4f", step + 1, loss.item())
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            atomic_save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                         "step": step + 1, "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state()},
                        ckpt_path)
    save_state(ema.state_dict(), final)
    tmp = cache / f"base_model.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"config": to_dict(cfg)}, indent=1))
    os.replace(tmp, cache / "base_model.json")
    ckpt_path.unlink(missing_ok=True)
    return ema.eval()
