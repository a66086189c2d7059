"""Durations as tenants write them: seconds, a timedelta, or ``"<n> unit[s]"``."""

from __future__ import annotations

import datetime as _dt
import math
import re
from typing import Final

__all__ = ["MAX_SLEEP_SECONDS", "DurationError", "parse_duration", "to_epoch"]

MAX_SLEEP_SECONDS: Final = 365 * 24 * 3600.0

_UNITS: Final = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0, "week": 604800.0}
_PATTERN: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(second|minute|hour|day|week)s?\s*")


class DurationError(ValueError):
    """A duration or a point in time that tenantflow cannot accept."""

    code = "duration.invalid"


def parse_duration(value: object, *, what: str = "duration") -> float:
    """Return ``value`` in seconds; reject negatives, NaN, booleans and unknown units."""
    if isinstance(value, bool):
        raise DurationError(f"invalid {what}: {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, _dt.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, str):
        match = _PATTERN.fullmatch(value)
        if match is None:
            raise DurationError(
                f"invalid {what} {value!r}: use seconds, a timedelta, or '<n> second|minute|"
                "hour|day|week' (plural allowed)"
            )
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise DurationError(f"invalid {what}: {type(value).__name__} is not a duration")
    if not math.isfinite(seconds) or seconds < 0:
        raise DurationError(f"invalid {what}: {value!r} must be a finite, non-negative duration")
    return seconds


def to_epoch(when: object) -> float:
    """A ``sleep_until`` target as epoch seconds (naive datetimes are taken as UTC)."""
    if isinstance(when, bool):
        raise DurationError(f"invalid time: {when!r}")
    if isinstance(when, _dt.datetime):
        if when.tzinfo is None:
            when = when.replace(tzinfo=_dt.UTC)
        return when.timestamp()
    if isinstance(when, int | float) and math.isfinite(when):
        return float(when)
    raise DurationError(f"invalid time: {type(when).__name__} is not a datetime or epoch seconds")
