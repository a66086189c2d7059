"""``make run``: the supervisor on ``tenants_example/`` with embedded SQLite, shown working.

Starts ``tenantflow serve`` in this process (real HTTP on 127.0.0.1:8787), then, as a
client over HTTP, triggers the greeter and the CI pipeline, prints each step as it
commits (from the live log stream), sends the deploy approval, and keeps serving until
Ctrl-C — printing the URL and how to use the CLI against it.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import urllib.request
from pathlib import Path
from typing import Any

import trio

from ._http import serve_http
from ._supervisor import SupervisorConfig, open_supervisor


def _request(url: str, method: str = "GET", body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read()
    return json.loads(text) if text else None


def _follow(base: str, tenant: str, instance_id: str, approve: dict[str, Any] | None) -> None:
    """Print the instance's steps as its SSE stream reports them (blocking; in a thread)."""
    url = f"{base}/v1/tenants/{tenant}/instances/{instance_id}/logs"
    shown: dict[tuple[str, int], str] = {}
    event = ""
    with urllib.request.urlopen(url, timeout=120) as stream:
        for raw in stream:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[len("event: ") :]
                continue
            if not line.startswith("data: "):
                continue
            data = json.loads(line[len("data: ") :])
            if event == "step":
                key = (data["name"], data["count"])
                state = f"{data['status']} (attempt {data['attempts']})"
                if shown.get(key) != state:
                    shown[key] = state
                    print(f"    [{data['type']:>12}] {data['name']!r:<18} {state}")
                if (
                    approve is not None
                    and data["type"] == "waitForEvent"
                    and data["status"] == "waiting"
                ):
                    print(f"    -> sending the {approve['type']!r} event")
                    _request(
                        f"{base}/v1/tenants/{tenant}/instances/{instance_id}/events",
                        "POST",
                        approve,
                    )
                    approve = None
            elif event == "log":
                print(f"    log: {data['message']}")
            elif event == "done":
                print(f"    {tenant} {instance_id}: {data.get('status')}")
                return


async def _show(base: str) -> None:
    print("\n1. greeter (the seed article's example), triggered through its own fetch():")
    created = await trio.to_thread.run_sync(
        lambda: _request(f"{base}/t/greeter/", "POST", {"name": "Ada"})
    )
    await trio.to_thread.run_sync(_follow, base, "greeter", created["id"], None)
    print("\n2. ci-pipeline: checkout, install, lint/test/build in parallel, PR comment,")
    print("   then a deploy that waits for an approval event:")
    created = await trio.to_thread.run_sync(
        lambda: _request(
            f"{base}/t/ci-pipeline/", "POST", {"repo": "acme/web", "sha": "4f2a9c1", "pr": 42}
        )
    )
    approval = {"type": "approve-deploy", "payload": {"by": "make run"}}
    await trio.to_thread.run_sync(_follow, base, "ci-pipeline", created["id"], approval)
    final = await trio.to_thread.run_sync(
        lambda: _request(f"{base}/v1/tenants/ci-pipeline/instances/{created['id']}")
    )
    print(f"    output: {json.dumps(final['output'])}")


async def main(tenants: Path, db: str, port: int) -> None:
    config = SupervisorConfig(tenants_dir=tenants, db_url=db)
    async with open_supervisor(config) as supervisor, trio.open_nursery() as nursery:
        actual = await nursery.start(
            lambda task_status: serve_http(
                supervisor, host="127.0.0.1", port=port, task_status=task_status
            )
        )
        base = f"http://127.0.0.1:{actual}"
        names = ", ".join(t["tenant"] for t in await supervisor.tenants())
        print(f"tenantflow is serving {tenants}/ ({names}) at {base}")
        try:
            await _show(base)
        except OSError as exc:
            print(f"the demo could not talk to the server: {exc}", file=sys.stderr)
        print(f"\nStill serving at {base} — try, in another terminal:")
        print(f"  .venv/bin/tenantflow tenants --url {base}")
        print(f'  .venv/bin/tenantflow trigger greeter --params \'{{"name": "Bo"}}\' --url {base}')
        print(f"  .venv/bin/tenantflow instances list greeter --url {base}")
        print(f'  curl -X POST {base}/t/greeter/ -d \'{{"name": "Cy"}}\'')
        print("Ctrl-C stops it (running steps get a grace period; nothing is lost).")
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                print("\nstopping: draining running instances")
                await supervisor.engine.drain(grace=10)
                nursery.cancel_scope.cancel()
                break


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tenants", type=Path, default=Path("tenants_example"))
    parser.add_argument("--db", default="sqlite:///./tenantflow.db")
    parser.add_argument("--port", type=int, default=8787)
    args = parser.parse_args(argv)
    trio.run(main, args.tenants, args.db, args.port)


if __name__ == "__main__":
    cli(sys.argv[1:])
