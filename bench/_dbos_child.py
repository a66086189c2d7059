"""Run the three-step workload on DBOS; executed as a script in a subprocess.

DBOS keeps process-wide globals (its registry, its launched instance, threads), so the
parent never imports it: ``bench.dbos_bench`` runs this file with the same Python and
reads the one line it prints, ``BENCH_RESULT {json}``. It imports nothing from tenantflow.

    python bench/_dbos_child.py --db /tmp/x/dbos.sqlite --count 300 --warmup 10
    python bench/_dbos_child.py --url postgresql://u@host/db --count 300 --warmup 10
    python bench/_dbos_child.py --url postgresql://u@host/db --count 1000 --callers 20
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sqlite3
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from typing import Any

RESULT_PREFIX = "BENCH_RESULT "


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--db", help="path of the SQLite system database")
    where.add_argument("--url", help="URL of the system database (PostgreSQL)")
    parser.add_argument("--count", type=int, required=True, help="timed workflows of each kind")
    parser.add_argument("--warmup", type=int, default=10, help="untimed workflows first")
    parser.add_argument(
        "--callers", type=int, default=1, help="threads calling workflows concurrently"
    )
    args = parser.parse_args(argv)

    from dbos import DBOS, DBOSConfig

    config: DBOSConfig = {
        "name": "tenantflow-bench",
        "system_database_url": args.url or f"sqlite:///{args.db}",
        "log_level": "WARNING",
    }
    DBOS(config=config)

    @DBOS.step()
    def one(x: int) -> int:
        return x + 1

    @DBOS.step()
    def two(x: int) -> int:
        return x + x

    @DBOS.step()
    def three(x: int) -> int:
        return x - 3

    @DBOS.workflow()
    def three_steps(x: int) -> int:
        return three(two(one(x)))

    @DBOS.workflow()
    def no_steps(x: int) -> int:
        return x

    def three_share(caller: int) -> None:
        for x in range(caller, args.count, args.callers):
            if three_steps(x) != (x + 1) * 2 - 3:
                raise SystemExit(f"DBOS returned a wrong result for x={x}")

    def zero_share(caller: int) -> None:
        for x in range(caller, args.count, args.callers):
            no_steps(x)

    def timed(share: Callable[[int], None]) -> float:
        """Each of ``callers`` threads runs its share one workflow after another."""
        started = time.perf_counter()
        if args.callers == 1:
            share(0)
        else:
            with ThreadPoolExecutor(args.callers) as pool:
                list(pool.map(share, range(args.callers)))
        return time.perf_counter() - started

    started = time.perf_counter()
    DBOS.launch()
    launch_seconds = time.perf_counter() - started
    try:
        for x in range(args.warmup):
            three_steps(x)
            no_steps(x)
        three_seconds = timed(three_share)
        zero_seconds = timed(zero_share)
    finally:
        DBOS.destroy()

    journal_mode = synchronous = None  # SQLite settings; the caller describes a server
    if args.db is not None:
        with closing(sqlite3.connect(args.db)) as conn:
            journal_mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            # DBOS sets no synchronous pragma, so a fresh connection shows what it ran with.
            synchronous = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(
                conn.execute("PRAGMA synchronous").fetchone()[0], "?"
            )
    result: dict[str, Any] = {
        "dbos_version": importlib.metadata.version("dbos"),
        "count": args.count,
        "warmup": args.warmup,
        "callers": args.callers,
        "launch_seconds": launch_seconds,
        "three_step_seconds": three_seconds,
        "zero_step_seconds": zero_seconds,
        "journal_mode": journal_mode,
        "synchronous": synchronous,
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
