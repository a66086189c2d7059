"""A runner that executes trusted workflow classes on threads of the supervisor.

For unit tests and debugging only: no isolation at all. It runs the same executor as
the sandbox child (``sandbox._executor``), so replay, retries and suspension behave
exactly as they do across the process boundary; only the transport differs.
"""

from __future__ import annotations

import math
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import trio

from sandbox._executor import ActivationAborted, Executor
from sandbox.protocol import Activate, Command, Reply

from ._runner import ActivationChannel, Runner, RunnerError, RunTarget

__all__ = ["InProcessRunner"]

WorkflowFactory = Callable[[], Any]


class _ThreadPort:
    """The executor's end: commands go to trio, replies come back per ``seq``."""

    def __init__(self, token: trio.lowlevel.TrioToken, send: trio.MemorySendChannel[Command]):
        self._token = token
        self._send = send
        self._cond = threading.Condition()
        self._replies: dict[int, Reply] = {}
        self._aborted = False

    def notify(self, command: Command) -> None:
        if self._aborted:
            raise ActivationAborted()
        try:
            self._token.run_sync_soon(self._deliver, command)
        except trio.RunFinishedError:
            raise ActivationAborted() from None

    def _deliver(self, command: Command) -> None:
        try:
            self._send.send_nowait(command)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def request(self, command: Command) -> Reply:
        seq = getattr(command, "seq", -1)
        self.notify(command)
        with self._cond:
            while seq not in self._replies:
                if self._aborted:
                    raise ActivationAborted()
                self._cond.wait()
            return self._replies.pop(seq)

    def put_reply(self, reply: Reply) -> None:
        with self._cond:
            self._replies[reply.seq] = reply
            self._cond.notify_all()

    def abort(self) -> None:
        with self._cond:
            self._aborted = True
            self._cond.notify_all()


class _InProcessChannel(ActivationChannel):
    def __init__(self, port: _ThreadPort, receive: trio.MemoryReceiveChannel[Command]):
        self._port = port
        self._receive = receive

    async def receive(self) -> Command:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            raise RunnerError("the workflow thread ended without a final command") from None

    async def reply(self, reply: Reply) -> None:
        self._port.put_reply(reply)

    async def abort(self, reason: str) -> None:
        # A thread cannot be killed: it is abandoned, and its next call to the host
        # raises ActivationAborted. Anything it sends from now on is ignored.
        self._port.abort()


class InProcessRunner(Runner):
    """Runs ``workflows[tenant_id]()`` objects' ``run(event, step)`` on threads."""

    def __init__(self, workflows: Mapping[str, WorkflowFactory]) -> None:
        self._workflows = dict(workflows)

    def register(self, tenant_id: str, factory: WorkflowFactory) -> None:
        """Add or replace the workflow of a tenant."""
        self._workflows[tenant_id] = factory

    @asynccontextmanager
    async def open_activation(
        self, target: RunTarget, activation: Activate
    ) -> AsyncIterator[ActivationChannel]:
        factory = self._workflows.get(target.tenant_id)
        if factory is None:
            raise RunnerError(
                f"no workflow registered for tenant {target.tenant_id!r}", permanent=True
            )
        send, receive = trio.open_memory_channel[Command](math.inf)
        port = _ThreadPort(trio.lowlevel.current_trio_token(), send)
        executor = Executor(activation, port, factory)
        thread = threading.Thread(
            target=executor.run, name=f"activation-{activation.instance_id}", daemon=True
        )
        thread.start()
        try:
            yield _InProcessChannel(port, receive)
        finally:
            port.abort()
            receive.close()
