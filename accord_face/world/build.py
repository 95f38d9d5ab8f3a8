"""Build the identity world: ``python -m accord_face.world.build [--stage S] [key=value ...]``.

Stages (each cached in ``<cache>/<stage>/`` with a ``DONE.json`` recording its config,
reused while that config matches; an interrupted stage restarts or resumes):

    pool          rendered training photos (identities 0..1999)
    clip          world CLIP (text tower = base text encoder)          needs pool
    vae           AutoencoderKL                                         needs pool
    unet          base UNet on VAE latents + CLIP text states          needs clip, vae
    detector      5-landmark detector (ONNX)                           needs pool
    recognizer_a  conditioning recognizer (ONNX)                       needs detector
    recognizer_b  evaluation recognizer, other architecture (ONNX)     needs detector
    judge         context / attribute classifier                       needs pool
    assets        copy the trained weights (fp16 safetensors, ONNX) into accord_face/world/assets/

Seeding (``use_assets``, on by default): before any stage runs, every stage whose config (and those
it depends on) equals the committed assets' record is filled from the assets, so a build that changes
one stage retrains only that stage and those after it; ``use_assets=false`` builds from nothing. A
longer base UNet without retraining it: ``--stage unet --stage assets unet.continue_from=assets
unet.steps=N`` (the committed UNet's weights go on training from its recorded step count).

Without ``--stage`` every stage runs in order. Two stages without a dependency between
them can run as two processes at once (one per core): ``--stage clip`` and ``--stage vae``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from ..config import ConfigError, load_config
from .config import WorldConfig
from .render import HELD_OUT_START

log = logging.getLogger("accord_face.world")

STAGES = ("pool", "clip", "vae", "unet", "detector", "recognizer_a", "recognizer_b", "judge", "assets")
DEPENDS = {"clip": ("pool",), "vae": ("pool",), "unet": ("clip", "vae"), "detector": ("pool",),
           "recognizer_a": ("detector",), "recognizer_b": ("detector",), "judge": ("pool",)}


def cache_root(cfg: WorldConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    from ..tiny import cache_dir

    return cache_dir() / "world"


def stage_config(cfg: WorldConfig, stage: str) -> dict:
    """What decides a stage's output: its own section and those of the stages it depends on."""
    fields = cfg.model_fields()
    own = {"pool": fields["pool"]} if stage == "pool" else {stage: fields.get(stage)}
    for dep in DEPENDS.get(stage, ()):
        own.update(stage_config(cfg, dep))
    return own


def stage_done(cfg: WorldConfig, stage: str) -> bool:
    marker = cache_root(cfg) / stage / "DONE.json"
    return marker.is_file() and json.loads(marker.read_text()).get("config") == json.loads(
        json.dumps(stage_config(cfg, stage)))


def finish_stage(cfg: WorldConfig, stage: str, tmp: Path, metrics: dict) -> Path:
    """Mark ``tmp`` complete and rename it to ``<cache>/<stage>`` (atomic for readers)."""
    (tmp / "DONE.json").write_text(json.dumps({"config": stage_config(cfg, stage), "metrics": metrics,
                                               "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
    final = cache_root(cfg) / stage
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def stage_tmp(cfg: WorldConfig, stage: str) -> Path:
    root = cache_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{stage}.", dir=root))


def load_pool(cfg: WorldConfig):
    from .pool import load_or_render_pool

    return load_or_render_pool(cache_root(cfg) / "pool" / "pool.npz", range(HELD_OUT_START),
                               cfg.pool.photos_per_identity, cfg.pool.seed)


# ---------------------------------------------------------------- stages
def run_pool(cfg: WorldConfig) -> dict:
    from .pool import render_pool

    import numpy as np

    tmp = stage_tmp(cfg, "pool")
    pool = render_pool(range(HELD_OUT_START), cfg.pool.photos_per_identity, cfg.pool.seed)
    np.savez(tmp / "pool.npz", images=pool.images, identity=pool.identity, context=pool.context,
             landmarks=pool.landmarks)
    finish_stage(cfg, "pool", tmp, {"photos": len(pool)})
    return {"photos": len(pool)}


def run_clip(cfg: WorldConfig) -> dict:
    import numpy as np

    from .clip import image_processor, train_clip, zero_shot_accuracy

    pool = load_pool(cfg)
    model, tok = train_clip(cfg.clip, pool)
    held = np.random.default_rng(99).integers(0, len(pool), 300)
    metrics = {"zero_shot_accuracy_train_pool": zero_shot_accuracy(model, tok, pool, held)}
    tmp = stage_tmp(cfg, "clip")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    image_processor().save_pretrained(tmp)
    finish_stage(cfg, "clip", tmp, metrics)
    return metrics


def run_vae(cfg: WorldConfig) -> dict:
    import numpy as np

    from .vae import reconstruction_error, train_vae

    pool = load_pool(cfg)
    vae = train_vae(cfg.vae, pool)
    metrics = {"mae_255": reconstruction_error(vae, pool, np.random.default_rng(98).integers(0, len(pool), 256)),
               "scaling_factor": vae.config.scaling_factor}
    tmp = stage_tmp(cfg, "vae")
    vae.save_pretrained(tmp, safe_serialization=True)
    finish_stage(cfg, "vae", tmp, metrics)
    return metrics


def stage_functions() -> dict[str, Callable[[WorldConfig], dict]]:
    funcs: dict[str, Callable[[WorldConfig], dict]] = {"pool": run_pool, "clip": run_clip, "vae": run_vae}
    from .stages import STAGE_FUNCTIONS  # the model stages past the autoencoder

    funcs.update(STAGE_FUNCTIONS)
    return funcs


def run_stage(cfg: WorldConfig, stage: str, force: bool = False) -> dict:
    for dep in DEPENDS.get(stage, ()):
        if not stage_done(cfg, dep):
            raise ConfigError(f"world stage {stage!r} needs {dep!r} first: run --stage {dep} (or no --stage)")
    if not force and stage != "assets" and stage_done(cfg, stage):
        log.info("world stage %s: cached in %s", stage, cache_root(cfg) / stage)
        return json.loads((cache_root(cfg) / stage / "DONE.json").read_text())["metrics"]
    t0 = time.time()
    log.info("world stage %s: start", stage)
    metrics = stage_functions()[stage](cfg)
    log.info("world stage %s: done in %.0f s: %s", stage, time.time() - t0, json.dumps(metrics))
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m accord_face.world.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML with WorldConfig fields (default: the built-in one)")
    parser.add_argument("--stage", action="append", choices=STAGES, help="run only this stage (repeatable)")
    parser.add_argument("--force", action="store_true", help="retrain the stage even if cached")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. unet.steps=100")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(WorldConfig, args.config, args.overrides)
    except ConfigError as err:
        parser.exit(2, f"world build: error: {err}\n")
    torch.set_num_threads(cfg.threads)
    try:
        if cfg.use_assets:
            from .stages import seed_from_assets

            seed_from_assets(cfg)
        for stage in args.stage or STAGES:
            run_stage(cfg, stage, force=args.force)
    except ConfigError as err:
        parser.exit(2, f"world build: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
