"""A runner that executes trusted workflow classes on threads of the supervisor.

For unit tests and debugging only: no isolation at all. It runs the same executor as
the sandbox child (``sandbox._executor``), so replay, retries and suspension behave
exactly as they do across the process boundary; only the transport differs.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import trio

from sandbox._executor import ActivationAborted, Executor, ReplyMailbox
from sandbox.protocol import Activate, Command, Reply, Suspended, WorkflowFinished

from ._runner import ActivationChannel, Runner, RunnerError, RunTarget

__all__ = ["InProcessRunner"]

WorkflowFactory = Callable[[], Any]


#: How long a one-way command (a step started, a log line) may wait before the engine
#: sees it. Only commands that need an answer wake the trio thread at once: every wake-up
#: is a GIL hand-off between threads, the largest cost of an in-process step.
_POLL_SECONDS = 0.005


class _ThreadPort(ReplyMailbox):
    """The executor's end: commands go into an outbox, replies come back per ``seq``."""

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        super().__init__()
        self._token = token
        self.outbox: collections.deque[Command] = collections.deque()
        self.arrived = trio.Event()

    def notify(self, command: Command) -> None:
        self.check_open()
        self.outbox.append(command)
        if isinstance(command, WorkflowFinished | Suspended):
            self._wake()

    def request(self, command: Command) -> Reply:
        self.check_open()
        self.outbox.append(command)
        self._wake()
        return self.wait_reply(getattr(command, "seq", -1))

    def _wake(self) -> None:
        try:
            self._token.run_sync_soon(self._set_arrived)
        except trio.RunFinishedError:
            raise ActivationAborted() from None

    def _set_arrived(self) -> None:
        self.arrived.set()


class _InProcessChannel(ActivationChannel):
    def __init__(self, port: _ThreadPort, thread: threading.Thread) -> None:
        self._port = port
        self._thread = thread

    async def receive(self) -> Command:
        port = self._port
        while True:
            if port.outbox:
                return port.outbox.popleft()
            if not self._thread.is_alive() and not port.outbox:
                raise RunnerError("the workflow thread ended without a final command")
            port.arrived = trio.Event()
            if port.outbox:  # appended before the new event existed: no wake-up is lost
                continue
            with trio.move_on_after(_POLL_SECONDS):
                await port.arrived.wait()

    async def reply(self, reply: Reply) -> None:
        self._port.put_reply(reply)

    async def abort(self, reason: str, *, force: bool = False) -> None:
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
        port = _ThreadPort(trio.lowlevel.current_trio_token())
        executor = Executor(activation, port, factory)
        thread = threading.Thread(
            target=executor.run, name=f"activation-{activation.instance_id}", daemon=True
        )
        thread.start()
        try:
            yield _InProcessChannel(port, thread)
        finally:
            port.abort()
