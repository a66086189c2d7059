"""Retry policies of ``step.do``: defaults, merging, validation and backoff delays.

Pure functions shared by the workflow side (which validates a tenant's config early and
shows it as ``ctx.config``) and the engine (which alone decides, durably, when the next
attempt runs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from ._durations import MAX_SLEEP_SECONDS, DurationError, parse_duration

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "RetryPolicy",
    "RetryPolicyError",
    "merge_retry_policy",
    "parse_timeout",
]

DEFAULT_TIMEOUT_SECONDS: Final = 600.0
_BACKOFFS: Final = ("constant", "linear", "exponential")
_MAX_LIMIT: Final = 10_000


class RetryPolicyError(ValueError):
    """A ``retries`` or ``timeout`` argument that cannot be used."""

    code = "step.invalid_config"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """A fully merged retry policy (SPEC 4 defaults: 5 retries, 10 s, exponential)."""

    limit: int = 5
    delay: float = 10.0
    backoff: str = "exponential"

    def delay_before(self, next_attempt: int) -> float:
        """Seconds to wait before attempt ``next_attempt`` (2 or more) after attempt n failed."""
        n = next_attempt - 1
        if self.backoff == "constant":
            delay = self.delay
        elif self.backoff == "linear":
            delay = self.delay * n
        else:
            # 2**(n-1) overflows a float past n = 1025; any delay that long is capped anyway
            delay = self.delay * float(2 ** min(n - 1, 64))
        return min(delay, MAX_SLEEP_SECONDS)

    def allows(self, next_attempt: int) -> bool:
        """Whether attempt ``next_attempt`` may run (``limit`` retries after the first)."""
        return next_attempt <= self.limit + 1

    def as_config(self) -> dict[str, Any]:
        return {"limit": self.limit, "delay": self.delay, "backoff": self.backoff}


_DEFAULT_POLICY: Final = RetryPolicy()


def merge_retry_policy(retries: object) -> RetryPolicy:
    """Merge a tenant's partial ``retries`` dict over the defaults, validating every field."""
    if retries is None:
        return _DEFAULT_POLICY
    if not isinstance(retries, dict):
        raise RetryPolicyError("retries must be a dict with limit, delay and backoff")
    unknown = set(retries) - {"limit", "delay", "backoff"}
    if unknown:
        raise RetryPolicyError(f"unknown retries field(s): {', '.join(sorted(map(str, unknown)))}")
    base = RetryPolicy()
    limit = retries.get("limit", base.limit)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= _MAX_LIMIT:
        raise RetryPolicyError(f"retries.limit must be an integer from 0 to {_MAX_LIMIT}")
    try:
        delay = parse_duration(retries.get("delay", base.delay), what="retries.delay")
    except DurationError as exc:
        raise RetryPolicyError(str(exc)) from None
    backoff = retries.get("backoff", base.backoff)
    if backoff not in _BACKOFFS:
        raise RetryPolicyError(f"retries.backoff must be one of {', '.join(_BACKOFFS)}")
    return RetryPolicy(limit=limit, delay=delay, backoff=str(backoff))


def parse_timeout(timeout: object) -> float:
    """A per-attempt timeout in seconds (default 10 minutes); zero is refused."""
    if timeout is None:
        return DEFAULT_TIMEOUT_SECONDS
    try:
        seconds = parse_duration(timeout, what="timeout")
    except DurationError as exc:
        raise RetryPolicyError(str(exc)) from None
    if seconds <= 0:
        raise RetryPolicyError("timeout must be greater than zero")
    return seconds
