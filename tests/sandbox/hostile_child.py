"""A sandbox child whose tenant got past RestrictedPython: the OS layers are all that is left.

Run by ``test_hostile_tenants.py`` as ``python hostile_child.py TENANT JSON``. This process
plays the zygote: it pre-imports what the zygote pre-imports, forks, and the child becomes
a sandbox through the zygote's own ``_become_sandbox`` (the same layers, uid, limits and
order as a real sandbox of ``TENANT``). Only the last call differs: instead of serving the
RPC protocol with RestrictedPython code, the child runs unrestricted hostile code and
reports, for each attempt, ``"allowed"`` or the errno that refused it.

The parent makes the same attempts without isolation first (the control), then prints
``{"control": ..., "sandboxed": ..., "missing": ..., "exit": ...}`` as one JSON line.

JSON keys: ``files`` (paths to read), ``dirs`` (directories to list), ``pids`` (processes
to signal with signal 0).
"""

from __future__ import annotations

import errno
import json
import os
import select
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from sandbox import _child, _zygote

DEADLINE_SECONDS = 20.0


def _outcome(action: Callable[[], object]) -> str:
    try:
        action()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    except Exception as exc:  # anything else that stopped the attempt
        return type(exc).__name__
    return "allowed"


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(64)


def attempts(targets: dict[str, Any]) -> dict[str, str]:
    """Every attempt's outcome, keyed by what it tried."""
    results: dict[str, str] = {}
    for path in targets.get("files", []):
        results[f"read {path}"] = _outcome(lambda path=path: _read(path))
    for path in targets.get("dirs", []):
        results[f"list {path}"] = _outcome(lambda path=path: os.listdir(path))
    for pid in targets.get("pids", []):
        results[f"signal {pid}"] = _outcome(lambda pid=pid: os.kill(pid, 0))
    return results


def main(tenant_id: str, targets: dict[str, Any]) -> None:
    seccomp = _zygote._preimport()
    control = attempts(targets)
    read_end, write_end = os.pipe()
    me = os.getpid()
    pid = os.fork()
    if pid == 0:  # the sandbox
        try:
            os.close(read_end)

            def hostile(rpc_fd: int, limits: object, missing: dict[str, str]) -> None:
                report = {"sandboxed": attempts(targets), "missing": missing}
                os.write(rpc_fd, json.dumps(report).encode())
                os._exit(0)

            _child.serve = hostile  # type: ignore[assignment]
            request = {"tenant_id": tenant_id, "memory_mb": 256, "cpu_seconds": 10}
            request["open_files"] = 64
            _zygote._become_sandbox(request, write_end, seccomp, me)
        finally:
            os._exit(3)
    os.close(write_end)
    data = b""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while (remaining := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([read_end], [], [], remaining)
        if not ready:
            break
        chunk = os.read(read_end, 65536)
        if not chunk:
            break
        data += chunk
    os.close(read_end)
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass
    _, status = os.waitpid(pid, 0)
    report = json.loads(data) if data else {"sandboxed": None, "missing": None}
    report.update(control=control, exit=status)
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
