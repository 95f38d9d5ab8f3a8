"""Where the encoder trainer's scalars go besides ``OUTPUT/metrics.jsonl``: ``report_to``.

- ``tensorboard``: events in ``OUTPUT/logs`` (``purge_step`` on a resume, so replayed steps replace
  the killed run's points instead of doubling them);
- ``wandb``: one Weights & Biases run per output folder, its id kept in ``OUTPUT/logs/wandb_run_id``
  so a resumed training continues the same run (``resume="allow"``); files under ``OUTPUT/logs``.
  wandb is not a dependency: without it installed the run stops before any model loads (the config
  check) or here, with one line saying to install it or pick another tracker;
- ``none``: metrics.jsonl only.

Only rank 0 opens trackers; scalars are logged as ``train/<name>``.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Optional

from ..config import ConfigError

__all__ = ["Trackers", "REPORT_TO", "WANDB_MISSING"]

REPORT_TO = ("tensorboard", "wandb", "none")
WANDB_MISSING = ("logging.report_to=wandb: wandb is not installed (pip install wandb); or use "
                 "logging.report_to=tensorboard / none")


class Trackers:
    """The tracker of ``report_to`` for one run in ``out``, continuing after ``step`` (0 = a fresh run)."""

    def __init__(self, report_to: str, out: str | os.PathLike, step: int = 0, config: Optional[dict] = None,
                 project: str = "accord-face"):
        if report_to not in REPORT_TO:
            raise ConfigError(f"logging.report_to={report_to!r}: choose one of {' | '.join(REPORT_TO)}")
        self.report_to, self.logs = report_to, Path(out) / "logs"
        self._tb = self._wandb = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.logs), purge_step=step + 1 if step else None)
        elif report_to == "wandb":
            try:
                import wandb
            except ImportError:
                raise ConfigError(WANDB_MISSING) from None
            self.logs.mkdir(parents=True, exist_ok=True)
            id_file = self.logs / "wandb_run_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:16]
            id_file.write_text(run_id + "\n")
            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", project), name=Path(out).name,
                                     id=run_id, resume="allow", dir=str(self.logs), config=config or {})

    def log(self, stats: dict[str, Any], step: int) -> None:
        scalars = {f"train/{k}": float(v) for k, v in stats.items() if isinstance(v, (int, float))}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._tb = self._wandb = None
