"""This rank's endless stream of micro batches, resumable, with the counts of what the reader skipped."""

from __future__ import annotations

import os
import random
from typing import Optional

import torch.distributed as dist

from ..config import ConfigError
from ..data import SKIP_KINDS, build_dataset, collate
from .config import ShardInfo, TrainConfig

__all__ = ["DataStream", "DataError", "split_for_rank"]


class DataStream:
    """Endless micro batches for this rank with a resumable position (epoch, samples consumed in it)."""

    def __init__(self, cfg: TrainConfig, info: ShardInfo, epoch: int = 0, consumed: int = 0,
                 skipped: Optional[dict] = None):
        self.cfg, self.info, self.epoch, self.consumed = cfg, info, epoch, consumed
        self.skipped = dict(skipped or {})  # cumulative over epochs and resumes: bad_shard, empty_shard, bad_sample
        self._it = self._open()

    def _open(self):
        from torch.utils.data import DataLoader

        c = self.cfg
        self._ds = build_dataset(self.info.urls, resolution=c.resolution, embedding_key=self.info.embedding_key,
                                 shuffle_buffer=c.data.shuffle_buffer, seed=c.seed, epoch=self.epoch,
                                 resampled=c.data.resampled, random_flip=c.data.random_flip, skip=self.consumed,
                                 skip_batch_size=c.train_batch_size, embedding_dim=c.encoder.id_embed_dim,
                                 face_crop_size=self.info.face_crop_size,
                                 pixels_uint8=True)  # to [-1, 1] on the device (prepare_batch): 4x less IPC
        loader = DataLoader(self._ds, batch_size=c.train_batch_size, collate_fn=collate,
                            num_workers=c.data.num_workers, drop_last=True)
        return iter(loader)

    def _count(self, delta: dict) -> None:
        for k in SKIP_KINDS:
            self.skipped[k] = self.skipped.get(k, 0) + int(delta.get(k, 0))

    def next(self) -> dict:
        for attempt in range(2):
            try:
                batch = next(self._it)
                self.consumed += len(batch["__key__"])
                self._count(batch.get("__skipped__", {}))
                return batch
            except StopIteration:
                if self.cfg.data.num_workers == 0:
                    self._count(self._ds.stats.take_unreported())  # skips after the epoch's last sample
                if attempt and self.consumed == 0:
                    break
                self.epoch, self.consumed = self.epoch + 1, 0
                self._it = self._open()
        mine = split_for_rank(self.info.urls, self.cfg.seed, self.epoch)
        counts = ", ".join(f"{self.skipped.get(k, 0)} {k.replace('_', ' ')}(s)" for k in SKIP_KINDS)
        first = self._ds.stats.messages[0] if self._ds.stats.messages else "none logged in this process"
        raise DataError(f"rank {dist.get_rank()} of {dist.get_world_size()} got no complete batch of "
                        f"{self.cfg.train_batch_size} from its {len(mine)} of {len(self.info.urls)} shard(s) "
                        f"({', '.join(os.path.basename(u) for u in mine[:4]) or 'none'}; skipped: {counts}; first "
                        f"problem: {first}): write more good shards (at least ranks x workers) or lower "
                        "train_batch_size")

    def position(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "skipped": dict(self.skipped)}


class DataError(ConfigError):
    """The shards give a rank no usable batch (every shard bad or empty, or too few shards)."""


def split_for_rank(urls: list[str], seed: int, epoch: int) -> list[str]:
    """The shards this rank reads in ``epoch`` (build_dataset's order, then split_by_node)."""
    from ..data import _mix

    order = list(urls)
    random.Random(_mix(seed, epoch)).shuffle(order)
    return order[dist.get_rank()::dist.get_world_size()]
