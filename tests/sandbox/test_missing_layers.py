"""A layer the host refuses is reported once in the supervisor's log, never silently."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys

import trio

from sandbox import _host
from sandbox._framing import SyncFrames
from sandbox._host import Sandbox, _Spawned
from sandbox.protocol import HOST_FRAME_LIMIT, LoadCode, Ready, decode, encode


async def _load_with_fake_child(missing: dict[str, str]) -> None:
    ours, theirs = socket.socketpair()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # noqa: ASYNC220
    spawned = _Spawned(sleeper.pid, os.pidfd_open(sleeper.pid))
    try:
        sandbox = Sandbox(("t", "v"), spawned, ours, None)  # type: ignore[arg-type]
        peer = SyncFrames(theirs, HOST_FRAME_LIMIT)

        def fake_child() -> None:
            assert isinstance(decode(peer.receive()), LoadCode)
            peer.send(encode(Ready(None, missing)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, fake_child)
            with trio.fail_after(10):
                await sandbox.load("t", "v", {"main.py": ""})
        sandbox.kill("test over")
        with trio.fail_after(10):
            await sandbox.watch()  # what the runner does: wait for the exit, close the channel
    finally:
        theirs.close()
        sleeper.kill()
        sleeper.wait()


async def test_each_missing_layer_is_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(_host, "_REPORTED_LAYERS", set())
    caplog.set_level(logging.WARNING, logger="tenantflow.sandbox")
    await _load_with_fake_child({"netns": "unshare(CLONE_NEWNET): EPERM"})
    await _load_with_fake_child({"netns": "unshare(CLONE_NEWNET): EPERM", "uid": "not root"})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "'netns'" in warnings[0] and "EPERM" in warnings[0]
    assert "'uid'" in warnings[1] and "not root" in warnings[1]
