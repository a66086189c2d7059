"""The same three-step workload on DBOS and on tenantflow, and their ratio.

DBOS runs in a subprocess (``bench/_dbos_child.py``) on a SQLite system database in
this benchmark's directory, with DBOS's own defaults; tenantflow runs the same workflow
in this process (real engine, in-process runner). Both run the workflows one after
another, each waiting for the previous one's durable result, after the same warm-up.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ._core import BenchContext, Direction, Measurement, benchmark
from .engine_bench import ThreeStepRun, running_engine, three_step_sequential

__all__ = ["DbosRun", "DbosUnavailable", "run_dbos", "three_step_workflows"]

CHILD: Final = Path(__file__).with_name("_dbos_child.py")
RESULT_PREFIX: Final = "BENCH_RESULT "
WARMUP: Final = 10
RATIO_TARGET: Final = 10.0
ROUNDS: Final = 3


class DbosUnavailable(Exception):
    """DBOS could not be installed, launched or run: its rows are skipped, with this reason."""


@dataclass(frozen=True, slots=True)
class DbosRun:
    """What the child reported."""

    count: int
    three_step_seconds: float
    zero_step_seconds: float
    version: str
    journal_mode: str | None  #: None on a PostgreSQL system database
    synchronous: str | None

    @property
    def per_second(self) -> float:
        return self.count / self.three_step_seconds

    @property
    def ms_per_step(self) -> float:
        """Marginal cost of a step: (3-step workflow - 0-step workflow) / 3."""
        return (self.three_step_seconds - self.zero_step_seconds) / self.count / 3 * 1000


def run_dbos(
    workdir: Path,
    count: int,
    warmup: int,
    timeout: float,
    *,
    database_url: str | None = None,
    callers: int = 1,
) -> DbosRun:
    """Run the child and parse its result; raise DbosUnavailable on any failure.

    The system database is ``workdir/dbos.sqlite``, or ``database_url`` if given;
    ``callers`` threads share the ``count`` workflows (one after another in each).
    """
    if importlib.util.find_spec("dbos") is None:
        raise DbosUnavailable("dbos is not installed (pip install -e '.[bench]')")
    where = ["--url", database_url] if database_url else ["--db", str(workdir / "dbos.sqlite")]
    command = [
        sys.executable, str(CHILD), *where, "--count", str(count), "--warmup", str(warmup),
        "--callers", str(callers),
    ]  # fmt: skip
    try:
        done = subprocess.run(
            command, cwd=workdir, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise DbosUnavailable(f"the DBOS run took more than {timeout:.0f} s") from None
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise DbosUnavailable(f"DBOS failed: {tail[:160]}")
    data: dict[str, Any] = json.loads(lines[-1].removeprefix(RESULT_PREFIX))
    return DbosRun(
        count=int(data["count"]),
        three_step_seconds=float(data["three_step_seconds"]),
        zero_step_seconds=float(data["zero_step_seconds"]),
        version=str(data["dbos_version"]),
        journal_mode=data["journal_mode"],
        synchronous=data["synchronous"],
    )


@benchmark(
    "dbos.three_step_workflows",
    "sequential three-step workflows on DBOS (SQLite) and on tenantflow, and the ratio",
)
def three_step_workflows(ctx: BenchContext) -> list[Measurement]:
    """Three-step workflows per second, DBOS vs tenantflow, sequentially.

    Method: ``count`` workflows ``x -> x + 1 -> * 2 -> - 3`` (one trivial step each) run
    one after another, after ``WARMUP`` untimed ones; workflows/s = count / wall time.
    ``ROUNDS`` rounds, each running tenantflow then DBOS on fresh databases, so both
    sides of a round see the same machine load; each row is the median round, and the
    ratio is the median of the rounds' ratios (tenantflow wf/s / DBOS wf/s). DBOS's ms
    per step is the marginal cost, (time of the 3-step runs - time of as many 0-step
    runs) / count / 3, as PEERS-NOTES measured it.
    """
    count = ctx.size(300, 1_000)
    params: dict[str, Any] = {
        "workflows": count, "warmup": WARMUP, "steps_per_workflow": 3, "rounds": ROUNDS,
    }  # fmt: skip
    timeout = 600.0 if ctx.full else 120.0
    ours: list[ThreeStepRun] = []
    theirs: list[DbosRun] = []
    skipped: str | None = None
    for i in range(ROUNDS):
        tenantflow_dir = ctx.workdir / f"tenantflow{i}"
        opener = functools.partial(running_engine, tenantflow_dir)
        ours.append(three_step_sequential(opener, count, WARMUP))
        if skipped is None:
            dbos_dir = ctx.workdir / f"dbos{i}"
            dbos_dir.mkdir()
            try:
                theirs.append(run_dbos(dbos_dir, count, WARMUP, timeout))
            except DbosUnavailable as exc:
                skipped = str(exc)

    ours_rates = sorted(r.per_second for r in ours)
    rows = [
        Measurement(
            "engine.three_step_workflows",
            statistics.median(ours_rates),
            "wf/s",
            notes=(
                f"median of {ROUNDS} rounds ({_listing(ours_rates)} wf/s); WAL, "
                "synchronous=FULL, in-process runner"
            ),
            params={**params, "rounds_wf_per_second": ours_rates},
        )
    ]
    if skipped is not None:
        return [
            *rows,
            Measurement.skip("dbos.three_step_workflows", skipped, unit="wf/s", params=params),
            Measurement.skip(
                "ratio.tenantflow_vs_dbos", skipped, unit="x", target=RATIO_TARGET,
                direction=Direction.AT_LEAST, params=params,
            ),
        ]  # fmt: skip
    first = theirs[0]
    dbos_rates = sorted(r.per_second for r in theirs)
    ratios = sorted(o.per_second / t.per_second for o, t in zip(ours, theirs, strict=True))
    dbos_params = {
        **params,
        "dbos_version": first.version,
        "journal_mode": first.journal_mode,
        "synchronous": first.synchronous,
    }
    settings = (
        f"dbos {first.version}, journal_mode={first.journal_mode}, synchronous={first.synchronous}"
    )
    return [
        *rows,
        Measurement(
            "dbos.three_step_workflows",
            statistics.median(dbos_rates),
            "wf/s",
            notes=f"median of {ROUNDS} rounds ({_listing(dbos_rates)} wf/s); {settings}",
            params={**dbos_params, "rounds_wf_per_second": dbos_rates},
        ),
        Measurement(
            "dbos.three_step_workflows",
            statistics.median(r.ms_per_step for r in theirs),
            "ms",
            label="per step",
            notes="marginal: (3-step - 0-step workflow time) / 3, median round",
            params=dbos_params,
        ),
        Measurement(
            "ratio.tenantflow_vs_dbos",
            statistics.median(ratios),
            "x",
            target=RATIO_TARGET,
            direction=Direction.AT_LEAST,
            notes=f"median of the rounds' ratios ({_listing(ratios, 2)})",
            params={**dbos_params, "rounds_ratio": ratios},
        ),
    ]


def _listing(values: list[float], decimals: int = 1) -> str:
    return ", ".join(f"{v:.{decimals}f}" for v in values)
