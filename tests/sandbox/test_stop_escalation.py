"""Stopping a sandbox escalates as trio's run_process does: EOF, SIGTERM, SIGKILL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest
import trio

from sandbox import _host
from sandbox._host import Sandbox, _Spawned

STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
DEAF = "import time; time.sleep(60)"  # ignores the closed channel, obeys SIGTERM


@pytest.mark.parametrize(
    ("code", "killed_by"), [(DEAF, signal.SIGTERM), (STUBBORN, signal.SIGKILL)]
)
async def test_stop_escalates_and_always_reaps(monkeypatch, code, killed_by):
    monkeypatch.setattr(_host, "_STOP_GRACE_SECONDS", 0.4)
    ours, theirs = socket.socketpair()
    child = subprocess.Popen([sys.executable, "-c", code])  # noqa: ASYNC220
    try:
        await trio.sleep(0.2)  # let it install its signal handler
        sandbox = Sandbox(("t", "v"), _Spawned(child.pid, os.pidfd_open(child.pid)), ours, None)  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sandbox.watch)
            with trio.fail_after(10):
                await sandbox.stop()
        assert child.wait(timeout=5) == -killed_by
    finally:
        theirs.close()
        if child.poll() is None:
            child.kill()
            child.wait()
