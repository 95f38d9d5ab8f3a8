"""``stop_at=HH:MM``: the deadline of a long resumable experiment (UTC, today), shared by its configs."""

from __future__ import annotations

import datetime as dt
import re

__all__ = ["validate", "deadline"]


def validate(value: str) -> None:
    """ValueError naming the field and the fix unless ``value`` is '' or 'HH:MM'."""
    if value and not re.fullmatch(r"\d\d:\d\d", value):
        raise ValueError(f"stop_at is {value!r}; use 'HH:MM' (UTC) or ''")


def deadline(value: str) -> float | None:
    """'HH:MM' (UTC, today) -> epoch seconds; '' -> None."""
    if not value:
        return None
    h, m = (int(x) for x in value.split(":"))
    now = dt.datetime.now(dt.timezone.utc)
    return now.replace(hour=h, minute=m, second=0, microsecond=0).timestamp()
