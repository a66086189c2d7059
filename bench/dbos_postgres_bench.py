"""Three-step workflows on PostgreSQL: tenantflow and DBOS in the same run, and the ratio.

The workload is ``dbos_bench``'s (``x -> x + 1 -> * 2 -> - 3``, one step each), after
``WARMUP`` untimed workflows. In each round tenantflow runs it first (one engine,
in-process runner, a fresh schema: ``postgres_bench.running_pg_engine``), then DBOS
(``dbos_bench.run_dbos``: a subprocess whose system database is a fresh PostgreSQL
database, with DBOS's own defaults). Rows are median rounds; the ratio is the median of
the rounds' ratios.

Two shapes, the same on both sides:

* **sequential**: one caller, each workflow started after the previous one's durable
  result (latency-bound: one commit after another);
* **concurrent**: ``CALLERS`` callers, each running its share one after another —
  tenantflow's are trio tasks on one engine, DBOS's threads calling the workflow
  function. ``CALLERS`` is DBOS's default system-database pool size, so neither side
  waits for connections it was not given.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any, Final

from ._core import BenchContext, Direction, Measurement, benchmark
from .dbos_bench import DbosRun, DbosUnavailable, run_dbos
from .engine_bench import EngineOpener, ThreeStepRun, three_step_concurrent, three_step_sequential
from .postgres_bench import (
    PostgresUnavailable,
    check_server,
    fresh_database,
    fresh_schema,
    listing,
    pg_opener,
    postgres_url,
    rounds_for,
)

__all__ = ["concurrent_three_step_workflows", "three_step_workflows"]

WARMUP: Final = 10
RATIO_TARGET: Final = 5.0
#: Concurrent callers on each side: DBOS's default system-database pool size (20).
CALLERS: Final = 20

Ours = Callable[[EngineOpener, int], ThreeStepRun]


@benchmark(
    "dbos.postgres_three_step_workflows",
    "sequential three-step workflows on PostgreSQL: tenantflow vs DBOS, and the ratio",
)
def three_step_workflows(ctx: BenchContext) -> list[Measurement]:
    """One caller on each side; DBOS's ms per step is the marginal cost
    (3-step - 0-step workflow time) / 3."""
    return _compare(
        ctx,
        names=(
            "postgres.three_step_workflows",
            "dbos.postgres_three_step_workflows",
            "ratio.tenantflow_vs_dbos_postgres",
        ),
        count=ctx.size(100, 1_000),
        callers=1,
        ours=lambda opener, count: three_step_sequential(opener, count, WARMUP),
    )


@benchmark(
    "dbos.postgres_concurrent_three_step_workflows",
    f"three-step workflows on PostgreSQL from {CALLERS} concurrent callers: tenantflow vs DBOS",
)
def concurrent_three_step_workflows(ctx: BenchContext) -> list[Measurement]:
    """``CALLERS`` callers on each side, each running its share one after another."""
    return _compare(
        ctx,
        names=(
            "postgres.concurrent_three_step_workflows",
            "dbos.postgres_concurrent_three_step_workflows",
            "ratio.tenantflow_vs_dbos_postgres_concurrent",
        ),
        count=ctx.size(400, 2_000),
        callers=CALLERS,
        ours=lambda opener, count: three_step_concurrent(opener, count, WARMUP, CALLERS),
    )


def _compare(
    ctx: BenchContext, *, names: tuple[str, str, str], count: int, callers: int, ours: Ours
) -> list[Measurement]:
    our_row, dbos_row, ratio_row = names
    rounds = rounds_for(ctx)
    url = postgres_url()
    params: dict[str, Any] = {
        "workflows": count, "warmup": WARMUP, "steps_per_workflow": 3, "rounds": rounds,
        "callers": callers,
    }  # fmt: skip
    try:
        server = check_server(url)
    except PostgresUnavailable as exc:
        return _skipped(names, str(exc), params, include_ours=True)
    timeout = 600.0 if ctx.full else 120.0
    our_rates: list[float] = []
    theirs: list[DbosRun] = []
    skipped: str | None = None
    for _ in range(rounds):
        with fresh_schema(url) as schema:
            our_rates.append(ours(pg_opener(url, schema), count).per_second)
        if skipped is None:
            try:
                with fresh_database(url) as dbos_url:
                    run = run_dbos(
                        ctx.workdir, count, WARMUP, timeout, database_url=dbos_url, callers=callers
                    )
                theirs.append(run)
            except DbosUnavailable as exc:
                skipped = str(exc)
    shape = "one caller" if callers == 1 else f"{callers} concurrent callers"
    rows = [
        Measurement(
            our_row, statistics.median(our_rates), "wf/s",
            notes=f"{count} workflows, {shape}; rounds {listing(sorted(our_rates), 1)} wf/s; "
            f"one engine, in-process runner; {server}",
            params={**params, "rounds_wf_per_second": sorted(our_rates)},
        )
    ]  # fmt: skip
    if skipped is not None:
        return [*rows, *_skipped(names, skipped, params, include_ours=False)]
    dbos_rates = sorted(r.per_second for r in theirs)
    ratios = sorted(o / t.per_second for o, t in zip(our_rates, theirs, strict=True))
    dbos_params = {**params, "dbos_version": theirs[0].version}
    rows.append(
        Measurement(
            dbos_row, statistics.median(dbos_rates), "wf/s",
            notes=(
                f"dbos {theirs[0].version}, system database on PostgreSQL (fresh database, "
                f"DBOS's defaults); {count} workflows, {shape}; rounds "
                f"{listing(dbos_rates, 1)} wf/s"
            ),
            params={**dbos_params, "rounds_wf_per_second": dbos_rates},
        )
    )  # fmt: skip
    if callers == 1:
        rows.append(
            Measurement(
                dbos_row, statistics.median(r.ms_per_step for r in theirs),
                "ms", label="per step",
                notes="marginal: (3-step - 0-step workflow time) / 3, median round",
                params=dbos_params,
            )
        )  # fmt: skip
    rows.append(
        Measurement(
            ratio_row, statistics.median(ratios), "x", target=RATIO_TARGET,
            direction=Direction.AT_LEAST,
            notes=f"median of the rounds' ratios ({listing(ratios, 2)})",
            params={**dbos_params, "rounds_ratio": ratios},
        )
    )  # fmt: skip
    return rows


def _skipped(
    names: tuple[str, str, str], reason: str, params: dict[str, Any], *, include_ours: bool
) -> list[Measurement]:
    our_row, dbos_row, ratio_row = names
    rows = [Measurement.skip(our_row, reason, unit="wf/s", params=params)] if include_ours else []
    return [
        *rows,
        Measurement.skip(dbos_row, reason, unit="wf/s", params=params),
        Measurement.skip(
            ratio_row, reason, unit="x", target=RATIO_TARGET,
            direction=Direction.AT_LEAST, params=params,
        ),
    ]  # fmt: skip
