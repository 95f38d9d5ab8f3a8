"""What a run checks before it touches an existing output folder, and before any model loads.

``check_resume`` picks the checkpoint to resume (``checkpoint.find_resume``) and refuses, with one
line naming the cause and the fix, a checkpoint that:

- fails its sha256 manifest (``checkpoint.verify``: changed, added or missing files);
- was written by another number of ranks (DeepSpeed would raise deep inside ``load_checkpoint``);
- is already past ``max_steps``;
- belongs to a run with another config (``OUTPUT/config.yaml`` compared key by key, except the keys in
  ``guard.RESUMABLE_CHANGES``); ``resume=force`` accepts the change.
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

__all__ = ["check_resume", "comparable", "resolved_shards"]


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
        folder = ckpt.find_resume(out / "checkpoints", cfg.resume)
    except FileNotFoundError as err:
        raise ConfigError(f"'resume': {err}") from None
    if folder is None:
        return None
    marker = ckpt.verify(folder)
    ranks = marker.get("world_size")
    if ranks is not None and int(ranks) != world:
        raise ConfigError(f"{folder} was written by {ranks} rank(s), this run has {world}: resume with {ranks} "
                          "(ZeRO partitions the optimizer state by rank) or pick a new output_dir")
    step = int(marker.get("step", 0))
    if step > cfg.max_steps:
        raise ConfigError(f"'max_steps': {folder} is at step {step}, past max_steps={cfg.max_steps}; raise "
                          "max_steps to continue, resume=<an older checkpoint folder>, or pick a new output_dir")
    stored_path = out / "config.yaml"
    if cfg.resume != "force" and stored_path.is_file():
        try:
            stored = load_config(TrainConfig, stored_path)
        except ConfigError as err:
            raise ConfigError(f"{stored_path} (the stored run config) does not load: {err}; resume=force "
                              "resumes anyway") from None
        changes = config_changes(comparable(stored), comparable(cfg, info))
        if changes:
            shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
            raise ConfigError(f"{out} holds a run with another config ({shown}): rerun with its settings "
                              f"({stored_path}), resume=force (--resume force) to continue it with these, or "
                              "pick a new output_dir")
    return folder
