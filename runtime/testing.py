"""Helpers for testing code built on the engine (public, like trio.testing).

``autojump(engine, clock)`` is time-skipping in the manner of Temporal's test server:
whenever the engine has nothing to do but wait for a timer, it moves the mock clock
straight to that timer. Work in progress (a running step, a commit) is never skipped
over, so step timeouts only fire when a test moves the clock itself.
"""

from __future__ import annotations

from collections.abc import Callable

import trio
import trio.testing

from ._clock import MockClock
from ._engine import Engine

__all__ = ["autojump"]


async def autojump(
    engine: Engine,
    clock: MockClock,
    *,
    poll: float = 0.001,
    enabled: Callable[[], bool] = lambda: True,
) -> None:
    """Run forever (in a nursery): jump ``clock`` to the next timer whenever ``engine`` idles.

    ``enabled`` lets a test hold time still, e.g. while a "human" has yet to send the
    event a workflow waits for (else its timeout would be skipped to at once).
    """
    while True:
        await trio.testing.wait_all_tasks_blocked(cushion=poll)
        if enabled() and engine.is_idle():
            deadline = clock.next_deadline()
            if deadline is not None:
                clock.set_time(deadline)
                continue
        await trio.sleep(poll)
