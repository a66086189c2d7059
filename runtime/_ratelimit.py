"""Per-tenant creation rate limits: a token bucket each (SPEC 7: 100/s, burst 100).

Beyond the rate the API answers 429 with ``Retry-After``, and ``create`` in tenant
code raises ``RateLimitedError``. Buckets live in memory: a restart refills them, which
errs on the side of admitting work, never of losing it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ._clock import Clock
from .errors import RateLimited

__all__ = ["RateLimiter", "TokenBucket"]


@dataclass
class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    def take(self, now: float, count: int = 1) -> float:
        """Take ``count`` tokens if there are; else the seconds until there will be."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if count > self.burst:
            return math.inf
        if self.tokens >= count:
            self.tokens -= count
            return 0.0
        return (count - self.tokens) / self.rate


class RateLimiter:
    """One bucket per tenant, sized by ``limits(tenant_id) -> (rate, burst)``."""

    def __init__(self, clock: Clock, limits: Callable[[str], tuple[float, float]]) -> None:
        self._clock = clock
        self._limits = limits
        self._buckets: dict[str, TokenBucket] = {}

    def admit(self, tenant_id: str, count: int = 1) -> None:
        """Let ``count`` creations through, or raise RateLimited with the time to wait."""
        now = self._clock.now()
        rate, burst = self._limits(tenant_id)
        bucket = self._buckets.get(tenant_id)
        if bucket is None or (bucket.rate, bucket.burst) != (rate, burst):
            bucket = TokenBucket(rate, burst, burst, now)
            self._buckets[tenant_id] = bucket
        wait = bucket.take(now, count)
        if wait > 0:
            raise RateLimited(
                f"tenant {tenant_id!r} creates instances faster than {rate:g}/s "
                f"(burst {burst:g}); retry in {min(wait, 3600):.2f} s",
                retry_after=min(wait, 3600.0),
            )
