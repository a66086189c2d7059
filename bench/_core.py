"""The vocabulary every benchmark shares: results, targets, the context and the registration.

A benchmark is one function ``fn(ctx) -> list[Measurement]`` wrapped by ``@benchmark``.
It runs in a fresh, empty temporary directory (``ctx.workdir``) that the harness deletes
afterwards, picks its sizes with ``ctx.size(quick, full)``, and returns one
``Measurement`` per row of the table. Adding a benchmark is writing that function and
adding it to ``BENCHMARKS`` in ``bench/_registry.py``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BenchContext",
    "BenchFn",
    "Benchmark",
    "Direction",
    "Measurement",
    "benchmark",
    "percentile",
]


class Direction(enum.Enum):
    """How a value compares with its target."""

    AT_LEAST = ">="  #: higher is better (throughput)
    AT_MOST = "<="  #: lower is better (latency, memory)


@dataclass(frozen=True, slots=True)
class Measurement:
    """One row of the table: a value, its unit, and the target it is held to (if any).

    ``label`` names the statistic when one benchmark reports several of the same name
    (``p50``, ``p99``). ``skipped`` means the row could not be measured for a reason
    outside tenantflow (a peer that failed to install); ``failed`` means the benchmark
    itself broke. ``params`` are the sizes and settings that produced the value.
    """

    name: str
    value: float | None
    unit: str
    label: str = ""
    target: float | None = None
    direction: Direction | None = None
    notes: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)
    skipped: str | None = None
    failed: str | None = None

    @property
    def has_target(self) -> bool:
        return self.target is not None and self.direction is not None

    @property
    def meets(self) -> bool | None:
        """True or False against the target; None without a target or a value."""
        if self.value is None or self.target is None or self.direction is None:
            return None
        if self.direction is Direction.AT_LEAST:
            return self.value >= self.target
        return self.value <= self.target

    @property
    def miss_factor(self) -> float | None:
        """How many times worse than the target (1.0 = on it); None if it meets or has none."""
        if self.meets is not False:
            return None
        assert self.value is not None
        assert self.target is not None
        if self.direction is Direction.AT_LEAST:
            return math.inf if self.value <= 0 else self.target / self.value
        return math.inf if self.target <= 0 else self.value / self.target

    @classmethod
    def skip(
        cls,
        name: str,
        reason: str,
        *,
        unit: str = "",
        label: str = "",
        target: float | None = None,
        direction: Direction | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> Measurement:
        """A row that could not be measured, keeping the target it would be held to."""
        return cls(
            name, None, unit, label, target, direction, params=dict(params or {}), skipped=reason
        )


@dataclass(frozen=True, slots=True)
class BenchContext:
    """What the harness hands each benchmark."""

    full: bool  #: ``--full``: large sizes; otherwise quick sizes (whole run < 3 minutes)
    workdir: Path  #: fresh and empty, on a real disk; deleted after the benchmark

    def size(self, quick: int, full: int) -> int:
        """The quick or the full size, as the run was asked for."""
        return full if self.full else quick


BenchFn = Callable[[BenchContext], list[Measurement]]


@dataclass(frozen=True, slots=True)
class Benchmark:
    """A registered benchmark: its name (for ``--only``), a one-line summary, the function."""

    name: str
    summary: str
    fn: BenchFn

    def __call__(self, ctx: BenchContext) -> list[Measurement]:
        return self.fn(ctx)


def benchmark(name: str, summary: str) -> Callable[[BenchFn], Benchmark]:
    """Decorate ``fn(ctx) -> list[Measurement]`` as a benchmark named ``name``."""

    def wrap(fn: BenchFn) -> Benchmark:
        return Benchmark(name, summary, fn)

    return wrap


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation, as numpy's default."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
