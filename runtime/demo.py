"""``make run``: the engine on ``tenants_example/`` with embedded SQLite, a workflow running.

Loads every tenant folder, stores each code version in the database, starts the
sandbox zygote and the engine, triggers the greeter, and prints each step as it
commits. Then it keeps running (timers fire, instances resume) until Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime as dt
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

import msgpack
import trio

from loader import scan_tenants
from sandbox._host import open_sandbox_runner

from ._engine import Engine
from ._models import FINISHED_STATUSES
from ._storage import open_store


def _stamp() -> str:
    return dt.datetime.now().strftime("%H:%M:%S.%f")[:-3]


async def _follow(engine: Engine, tenant: str, instance_id: str) -> None:
    """Print the instance's steps as they change, until it finishes."""
    shown: dict[tuple[str, int], str] = {}
    while True:
        view = await engine.get(tenant, instance_id)
        for step in view.steps:
            state = f"{step.status.value} (attempt {step.attempts})"
            if shown.get((step.name, step.count)) != state:
                shown[(step.name, step.count)] = state
                print(f"  {_stamp()}  [{step.kind.value:>12}] {step.name!r:<14} {state}")
        if view.record.status in FINISHED_STATUSES:
            outcome = view.record.output if view.record.error is None else view.record.error
            print(f"  {_stamp()}  instance {instance_id}: {view.record.status.value} -> {outcome}")
            return
        changed = engine.change_event(view.record.key)
        with trio.move_on_after(0.5):
            await changed.wait()


async def main(tenants_dir: Path, db_url: str) -> None:
    store = open_store(db_url)
    tenants = scan_tenants(tenants_dir)
    print(f"tenantflow: {len(tenants)} tenant(s) in {tenants_dir}: {', '.join(sorted(tenants))}")

    engine_box: list[Engine] = []

    async def code_source(tenant_id: str, version: str) -> Mapping[str, str]:
        blob = await engine_box[0].get_code_version(tenant_id, version)
        if blob is None:
            raise LookupError(f"no code version {version} for tenant {tenant_id}")
        files: dict[str, str] = msgpack.unpackb(blob, raw=False)
        return files

    try:
        async with open_sandbox_runner(code_source) as runner:
            engine = Engine(store, runner)
            engine_box.append(engine)
            async with trio.open_nursery() as nursery:
                await nursery.start(engine.run)
                if engine.recovered:
                    print(f"recovered {engine.recovered} instance(s) left running by a crash")
                for code in tenants.values():
                    blob = msgpack.packb(code.files, use_bin_type=True)
                    await engine.put_code_version(code.tenant_id, code.version, blob)
                    print(f"  {code.tenant_id}: code version {code.version[:12]}")
                if "greeter" in tenants:
                    version = tenants["greeter"].version
                    iid, status = await engine.create(
                        "greeter", params={"name": "Ada"}, code_version=version
                    )
                    print(f"\ntriggered greeter instance {iid} ({status.value}); its steps:")
                    await _follow(engine, "greeter", iid)
                print(
                    "\nThe engine keeps running (sleeps wake, instances resume). Ctrl-C stops it."
                )
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        print("stopping")
                        nursery.cancel_scope.cancel()
                        break
    finally:
        store.close()


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tenants", type=Path, default=Path("tenants_example"))
    parser.add_argument("--db", default="sqlite:///./tenantflow.db")
    args = parser.parse_args(argv)
    trio.run(main, args.tenants, args.db)


if __name__ == "__main__":
    cli(sys.argv[1:])
