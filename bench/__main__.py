"""``python -m bench [--full] [--only NAME]...``: run the benchmarks, print one table.

Quick sizes by default (the whole run takes well under three minutes); ``--full`` for
large sizes. ``--only`` takes a benchmark name or a glob (``'engine.*'``) and may be
repeated. The table goes to stdout, progress to stderr, and the machine-readable
results to ``bench/results.json`` (``--output`` to change it). The exit status is 1 if
a benchmark broke (a ``failed`` row); a missed target is a measurement, not a failure.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
import time
from pathlib import Path

from ._registry import BENCHMARKS
from ._results import BenchmarkRun, environment, run_benchmark, write_results
from ._table import render_table

DEFAULT_OUTPUT = Path(__file__).with_name("results.json")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--full", action="store_true", help="large sizes (takes longer)")
    parser.add_argument(
        "--only", action="append", metavar="NAME", help="run only this benchmark (name or glob)"
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the JSON results"
    )
    parser.add_argument(
        "--tmpdir", type=Path, default=None, help="where the fresh directories go (a real disk)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        for bench in BENCHMARKS:
            print(f"{bench.name:45} {bench.summary}")
        return 0
    selected = list(BENCHMARKS)
    if args.only:
        selected = [b for b in BENCHMARKS if any(fnmatch.fnmatchcase(b.name, p) for p in args.only)]
        if not selected:
            names = ", ".join(b.name for b in BENCHMARKS)
            print(
                f"no benchmark matches {' '.join(args.only)}; there are: {names}", file=sys.stderr
            )
            return 2

    env = environment(full=args.full, tmp_base=args.tmpdir)
    if env["temp_filesystem"] in {"tmpfs", "ramfs"}:
        print(
            f"warning: {env['temp_dir']} is {env['temp_filesystem']}: fsync costs nothing "
            "there, so durable numbers are flattered (use --tmpdir on a real disk)",
            file=sys.stderr,
        )
    cpus = env["cpus"] or 1
    if env["load_average"][0] > cpus / 2:
        print(
            f"warning: load average {env['load_average'][0]} on {cpus} CPUs: other processes "
            "compete with the benchmarks, expect variance",
            file=sys.stderr,
        )
    print(
        f"bench: {len(selected)} benchmark(s), {env['mode']} mode, Python {env['python']}, "
        f"SQLite {env['sqlite']}, temp on {env['temp_filesystem']}",
        file=sys.stderr,
    )
    started = time.perf_counter()
    runs: list[BenchmarkRun] = []
    for bench in selected:
        print(f"  {bench.name} ...", end="", file=sys.stderr, flush=True)
        run = run_benchmark(bench, full=args.full, tmp_base=args.tmpdir)
        runs.append(run)
        print(f" {run.seconds:.1f} s", file=sys.stderr, flush=True)
    total = time.perf_counter() - started

    print()
    print(render_table([m for r in runs for m in r.measurements]))
    load_after = [round(x, 2) for x in os.getloadavg()]
    env["load_average_after"] = load_after
    print(
        f"\n{env['mode']} run, {total:.1f} s; load average {env['load_average'][0]} before, "
        f"{load_after[0]} after, on {env['cpus']} CPUs; results in {args.output}"
    )
    write_results(args.output, env, runs, total)
    return 1 if any(m.failed for r in runs for m in r.measurements) else 0


if __name__ == "__main__":
    sys.exit(main())
