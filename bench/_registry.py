"""Every benchmark, in the order ``python -m bench`` runs them.

To add one: write ``@benchmark("area.what", "summary") def fn(ctx) -> list[Measurement]``
in a module of this package and append it here.
"""

from __future__ import annotations

from typing import Final

from . import (
    dbos_bench,
    dbos_postgres_bench,
    engine_bench,
    postgres_bench,
    sandbox_bench,
    scale_bench,
)
from ._core import Benchmark

__all__ = ["BENCHMARKS"]

BENCHMARKS: Final[tuple[Benchmark, ...]] = (
    engine_bench.sequential_step_overhead,
    engine_bench.concurrent_steps_per_second,
    engine_bench.creations_per_second_inprocess,
    dbos_bench.three_step_workflows,
    postgres_bench.concurrent_steps_per_second,
    postgres_bench.creations_per_second,
    dbos_postgres_bench.three_step_workflows,
    dbos_postgres_bench.concurrent_three_step_workflows,
    postgres_bench.cross_supervisor,
    sandbox_bench.cold_start,
    sandbox_bench.memory_per_warm_sandbox,
    sandbox_bench.rpc_round_trip,
    sandbox_bench.processes_after_idle,
    sandbox_bench.sequential_step_overhead,
    sandbox_bench.concurrent_steps_per_second,
    scale_bench.http_creations_per_second,
    scale_bench.binding_creations_per_second,
    scale_bench.ingress_latency,
    scale_bench.many_tenants,
    scale_bench.fair_queue_drain,
)
