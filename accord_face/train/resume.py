"""What a run checks before it touches an existing output folder, and before any model loads.

``check_resume`` picks the checkpoint to resume (``checkpoint.find_resume``) and refuses, with one
line naming the cause and the fix, a checkpoint that:

- fails its sha256 manifest (``checkpoint.verify``: changed, added or missing files);
- was written by another number of ranks (DeepSpeed would raise deep inside ``load_checkpoint``);
- is already past ``max_steps``;
- belongs to a run with another config (``OUTPUT/config.yaml`` compared key by key, except the keys in
  ``guard.RESUMABLE_CHANGES``); ``checkpointing.resume_from_checkpoint=force`` accepts the change.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Optional

from ..config import ConfigError, load_config, to_dict
from . import checkpoint as ckpt
from .config import ShardInfo, TrainConfig
from .guard import config_changes

__all__ = ["check_resume", "check_pretrained", "comparable", "resolved_shards"]


def check_pretrained(name: str, key: str = "pretrained_model") -> None:
    """Refuse, before anything loads, a base model that cannot load: an unknown ``embedded:`` size, a
    folder without ``model_index.json``, or a hub id while offline (``HF_HUB_OFFLINE=1``)."""
    from ..tiny import EMBEDDED_PREFIX, SIZES

    if name.startswith(EMBEDDED_PREFIX):
        size, _, seed = name[len(EMBEDDED_PREFIX):].partition(":")
        if size == "faces":  # the identity world: its trained weights must be there
            from ..world.assemble import WorldMissingError, read_record

            try:
                read_record()
            except WorldMissingError as err:
                raise ConfigError(f"'{key}': {err}") from None
            return
        if (size or "tiny") not in SIZES:
            raise ConfigError(f"'{key}': {name!r} names no embedded size; use embedded:<size> with size one of "
                              f"{sorted(SIZES)}, or embedded:faces")
        if seed and not seed.lstrip("-").isdigit():
            raise ConfigError(f"'{key}': {name!r}: the seed after the size must be an integer")
        return
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ConfigError(f"'{key}': {path} is not a diffusers pipeline folder (no model_index.json); "
                              "point it at a saved pipeline, a hub id, or embedded:tiny")
        return
    looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1
    if looks_local:
        raise ConfigError(f"'{key}': {name} does not exist; point it at a saved pipeline folder, a hub id "
                          "(org/name) or embedded:tiny")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        if try_to_load_from_cache(name, "model_index.json") is None:
            raise ConfigError(f"'{key}': {name} is a hub id, not in the local hub cache, and HF_HUB_OFFLINE=1 "
                              "forbids downloading it; download it once online or use a local folder")


def resolved_shards(cfg: TrainConfig, info: ShardInfo) -> str:
    return ",".join(os.path.abspath(u) for u in info.urls) if "," in cfg.shards else os.path.abspath(cfg.shards)


def _deepspeed_settings(path: str):
    """The ZeRO JSON's content (so a relative and an absolute path to the same file compare equal)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return path


def comparable(cfg: TrainConfig, info: Optional[ShardInfo] = None) -> dict:
    """The config as a dict with resolved shards, recognizer and DeepSpeed settings."""
    if info is not None:
        cfg = replace(cfg, shards=resolved_shards(cfg, info),
                      recognizer=info.recognizer.get("name") or cfg.recognizer)
    data = to_dict(cfg)
    data["deepspeed"]["config"] = _deepspeed_settings(cfg.deepspeed.config)
    return data


def check_resume(cfg: TrainConfig, info: ShardInfo, out: Path, world: int) -> Optional[Path]:
    """The checkpoint folder to resume from (None: start fresh); ConfigError / CheckpointError if refused."""
    try:
        folder = ckpt.find_resume(out / "checkpoints", cfg.checkpointing.resume_from_checkpoint)
    except FileNotFoundError as err:
        raise ConfigError(f"'checkpointing.resume_from_checkpoint': {err}") from None
    if folder is None:
        return None
    marker = ckpt.verify(folder)
    ckpt.scan(folder)                      # a crafted pickle is refused here, before any model loads
    ranks = marker.get("world_size")
    if ranks is not None and int(ranks) != world:
        raise ConfigError(f"{folder} was written by {ranks} rank(s), this run has {world}: resume with {ranks} "
                          "(ZeRO partitions the optimizer state by rank) or pick a new output_dir")
    step = int(marker.get("step", 0))
    if step > cfg.max_steps:
        raise ConfigError(f"'max_steps': {folder} is at step {step}, past max_steps={cfg.max_steps}; raise "
                          "max_steps to continue, resume=<an older checkpoint folder>, or pick a new output_dir")
    stored_path = out / "config.yaml"
    if cfg.checkpointing.resume_from_checkpoint != "force" and stored_path.is_file():
        try:
            stored = load_config(TrainConfig, stored_path, warn_renamed=False)  # an older release's names too
        except ConfigError as err:
            raise ConfigError(f"{stored_path} (the stored run config) does not load: {err}; "
                              "--resume_from_checkpoint force resumes anyway") from None
        changes = config_changes(comparable(stored), comparable(cfg, info))
        if changes:
            shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
            raise ConfigError(f"{out} holds a run with another config ({shown}): rerun with its settings "
                              f"({stored_path}), --resume_from_checkpoint force to continue it with these, or "
                              "pick a new output_dir")
    return folder
