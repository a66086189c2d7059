"""Who waits for an instance to change, and what they learn without reading.

A commit that changes an instance is followed, in trio's thread, by ``changed(key,
status)``: ``status`` is the instance's status as of that commit when the committer
knew it (a finish, a park, a claim, a step record, which reads the status it runs
next to), None when it did not (a timer round, another supervisor's notice, an
activation that was stopped). A ``wait_for_status`` caller whose wanted status arrives
that way needs no read; an unknown one makes it read.

Each watched instance has one ``Change``: its ``event`` is set (and replaced) at every
change, ``version`` counts them and ``status`` keeps the latest one's. While waiters
hold it, it stays registered, so none of them can miss a change that lands between two
of their waits; with no waiter, a change drops it (followers of the SSE log stream take
its event afresh each time).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection

import trio

from ._models import InstanceStatus

__all__ = ["Change", "Watches"]


class Change:
    """A watch on one instance's changes (see the module)."""

    __slots__ = ("event", "status", "version", "waiters")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.status: InstanceStatus | None = None
        self.version = 0
        self.waiters = 0


class Watches:
    """The engine's watches on instances' statuses and logs."""

    def __init__(self) -> None:
        self._changed: dict[int, Change] = {}
        self._logged: dict[int, trio.Event] = {}
        #: Changes so far, any instance: a read can tell whether it raced one.
        self.changes = 0

    def changed(self, key: int, status: InstanceStatus | None = None) -> None:
        """An instance's status or journal changed; ``status`` as of that commit, if known."""
        self.changes += 1
        watch = self._changed.get(key)
        if watch is None:
            return
        watch.version += 1
        watch.status = status
        event, watch.event = watch.event, trio.Event()
        if not watch.waiters:
            del self._changed[key]
        event.set()

    def logged(self, key: int) -> None:
        """An instance's log grew."""
        event = self._logged.pop(key, None)
        if event is not None:
            event.set()

    def watch(self, key: int) -> Change:
        """The instance's watch (take it, or its event, before reading)."""
        watch = self._changed.get(key)
        if watch is None:
            watch = self._changed[key] = Change()
        return watch

    def log_event(self, key: int) -> trio.Event:
        """An event set when this instance's log next grows."""
        return self._logged.setdefault(key, trio.Event())

    async def wait_for(
        self,
        key: int,
        wanted: Collection[InstanceStatus],
        read_status: Callable[[], Awaitable[InstanceStatus | None]],
        *,
        seen: int,
        reread: bool,
    ) -> InstanceStatus | None:
        """Wait until ``key`` is in a ``wanted`` status; None if it no longer exists.

        ``seen``: the watch's version the caller's knowledge covers; ``reread``: read
        first (something may have changed since the caller looked).
        """
        watch = self.watch(key)
        watch.waiters += 1
        try:
            while True:
                if reread:
                    seen = watch.version  # what the read sees includes every change so far
                    status = await read_status()
                    if status is None or status in wanted:
                        return status
                if watch.version == seen:
                    await watch.event.wait()
                seen = watch.version
                # The latest change's status, if its committer knew it: no read needed.
                if watch.status in wanted:
                    return watch.status
                reread = watch.status is None
        finally:
            watch.waiters -= 1
            if not watch.waiters and self._changed.get(key) is watch:
                del self._changed[key]
