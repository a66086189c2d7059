"""The runner interface: how the engine runs workflow code, wherever it lives.

The engine opens an *activation* of an instance on a runner and converses with it
through an ``ActivationChannel``: it receives the workflow's commands and sends
replies (see ``sandbox.protocol``). The in-process runner (tests, debugging) and the
subprocess sandbox runner implement the same two ABCs, so the engine never knows
which one it drives — the seam Temporal draws with ``WorkflowRunner``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from sandbox.protocol import Activate, Command, ErrorInfo, Reply

__all__ = ["ActivationChannel", "RunTarget", "Runner", "RunnerError"]


class RunnerError(Exception):
    """The activation's runner died or broke the protocol (a sandbox crash, a bad frame).

    The engine treats it like a crash of the process running the workflow: the step in
    flight fails as an attempt (named by ``error`` when the runner knows why, e.g. a
    ``SandboxLimitError``) and the instance resumes from its journal. A ``permanent``
    error (the pinned code version cannot load) fails the instance instead.
    """

    def __init__(
        self, message: str, *, error: ErrorInfo | None = None, permanent: bool = False
    ) -> None:
        super().__init__(message)
        self.error = error
        self.permanent = permanent


@dataclass(frozen=True, slots=True)
class RunTarget:
    """Which code runs an instance: the tenant and the code version it is pinned to."""

    tenant_id: str
    code_version: str
    workflow_name: str


class ActivationChannel(ABC):
    """The engine's end of one running activation."""

    @abstractmethod
    async def receive(self) -> Command:
        """The next command; raises RunnerError if the workflow side died."""

    @abstractmethod
    async def reply(self, reply: Reply) -> None:
        """Answer a command that waits."""

    @abstractmethod
    async def abort(self, reason: str, *, force: bool = False) -> None:
        """Stop the activation now (terminate, step timeout); never raises.

        ``force`` kills whatever runs it even between steps (it stopped answering).
        """


class Runner(ABC):
    """Runs activations of workflow code."""

    @abstractmethod
    def open_activation(
        self, target: RunTarget, activation: Activate
    ) -> AbstractAsyncContextManager[ActivationChannel]:
        """Start ``run()`` for ``activation``; closing the context ends it."""

    def warm_tenants(self) -> Collection[str]:
        """Tenants whose code is loaded and ready to run now (a warm sandbox): the
        dispatcher lets a tenant it just started there run a few more before the next
        one (see ``FairDispatcher``). A runner with nothing to warm says none."""
        return ()

    async def aclose(self) -> None:  # noqa: B027 - optional hook with a sensible default
        """Release every resource (processes, threads)."""
