"""One progress bar for a whole preparation job: images done, kept, skipped by reason, images/s.

The local driver updates it per result; the Ray driver from a counter actor that every partition
task reports to, so the bar covers the whole cluster.
"""

from __future__ import annotations

import collections
from typing import Mapping

from tqdm import tqdm


def format_counts(kept: int, skipped: Mapping[str, int]) -> str:
    """``kept=12 skipped=4 (no_face=3 corrupt_image=1)``: the bar's postfix, reasons most frequent first."""
    total = sum(skipped.values())
    reasons = " ".join(f"{k}={v}" for k, v in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])) if v)
    return f"kept={kept} skipped={total}" + (f" ({reasons})" if reasons else "")


class JobProgress:
    """tqdm bar (unit img, so its rate is images/s) whose postfix is ``format_counts``."""

    def __init__(self, enabled: bool, desc: str = "prepare-shards", file=None):
        self.kept = 0
        self.skipped: collections.Counter = collections.Counter()
        self._bar = tqdm(desc=desc, unit="img", disable=not enabled, dynamic_ncols=file is None, file=file)

    @property
    def done(self) -> int:
        return self.kept + sum(self.skipped.values())

    def add(self, kept: int = 0, skipped: Mapping[str, int] | None = None) -> None:
        """Count ``kept`` more samples and ``skipped`` more rejected inputs (reason -> count)."""
        self.kept += kept
        self.skipped.update(skipped or {})
        self._bar.update(kept + sum((skipped or {}).values()))
        self._bar.set_postfix_str(format_counts(self.kept, self.skipped), refresh=False)

    def set_totals(self, kept: int, skipped: Mapping[str, int]) -> None:
        """Move to absolute totals (a snapshot of the cluster-wide counter)."""
        delta = collections.Counter(skipped)
        delta.subtract(self.skipped)
        self.add(kept - self.kept, {k: v for k, v in delta.items() if v > 0})

    def close(self) -> None:
        self._bar.close()
