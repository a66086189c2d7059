"""Run benchmarks in fresh directories, and describe the run for ``results.json``."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._core import BenchContext, Benchmark, Measurement
from ._table import status_of

__all__ = ["BenchmarkRun", "environment", "run_benchmark", "write_results"]


@dataclass(frozen=True, slots=True)
class BenchmarkRun:
    """One benchmark's rows and how long it took."""

    benchmark: Benchmark
    measurements: list[Measurement]
    seconds: float


def run_benchmark(bench: Benchmark, *, full: bool, tmp_base: Path | None) -> BenchmarkRun:
    """Run ``bench`` in a fresh temporary directory; an exception becomes a failed row."""
    workdir = Path(tempfile.mkdtemp(prefix="tenantflow-bench-", dir=tmp_base))
    started = time.perf_counter()
    try:
        measurements = bench(BenchContext(full=full, workdir=workdir))
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        measurements = [Measurement(bench.name, None, "", failed=reason)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return BenchmarkRun(bench, measurements, time.perf_counter() - started)


def filesystem_of(path: Path) -> str:
    """The type of the filesystem ``path`` is on (``ext4``, ``tmpfs``...), from /proc/mounts."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "unknown"
    resolved = str(path.resolve())
    best, kind = "", "unknown"
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1]
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, kind = point, fields[2]
    return kind


def _commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def environment(*, full: bool, tmp_base: Path | None) -> dict[str, Any]:
    """What the numbers depend on: versions, machine, mode, where the databases lived."""
    base = tmp_base or Path(tempfile.gettempdir())
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "mode": "full" if full else "quick",
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "executable": sys.executable,
        "temp_dir": str(base),
        "temp_filesystem": filesystem_of(base),
        "commit": _commit(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def _row(m: Measurement) -> dict[str, Any]:
    return {
        "name": m.name,
        "label": m.label,
        "value": m.value,
        "unit": m.unit,
        "target": m.target,
        "direction": None if m.direction is None else m.direction.value,
        "meets": m.meets,
        "status": status_of(m),
        "notes": m.notes,
        "params": dict(m.params),
        "skipped": m.skipped,
        "failed": m.failed,
    }


def write_results(
    path: Path, env: dict[str, Any], runs: Sequence[BenchmarkRun], total_seconds: float
) -> None:
    """Write the machine-readable results (atomically: a reader never sees half a file)."""
    document = {
        **env,
        "total_seconds": round(total_seconds, 3),
        "benchmarks": [{"name": r.benchmark.name, "seconds": round(r.seconds, 3)} for r in runs],
        "results": [_row(m) for r in runs for m in r.measurements],
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2, default=str) + "\n")
    tmp.replace(path)
