"""What this supervisor hears from the others sharing its PostgreSQL database.

The others ``announce`` in the transactions that change things (``StoreTxn.announce``);
PostgreSQL delivers the notices at COMMIT (LISTEN/NOTIFY) to a listener thread of the
store, which hands them here. They are coalesced and applied on the trio thread:

* ``QUEUED tenant``: the dispatcher looks at that tenant's queue now, not at its next
  safety-net poll (so a supervisor with free slots takes work another one queued);
* ``STOP key``: the instance was terminated or restarted through another supervisor:
  if it runs here, its activation is aborted now, not at the next lease renewal;
* ``CHANGED key``: its status changed: this supervisor's watchers (``wait_for_status``,
  an HTTP log stream) read it again now;
* ``MISSED``: the listener lost its connection, so notices may be gone: look at every
  queue again.

Nothing depends on a notice arriving: every fact is in the database, and polling finds
it within the dispatcher's safety net, a lease renewal or a timer round.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import trio

from ._storage import Notice

if TYPE_CHECKING:
    from ._engine import Engine

__all__ = ["NoticeBoard"]


class NoticeBoard:
    """Receives notices on any thread; applies them in trio, in batches."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._token = trio.lowlevel.current_trio_token()
        self._lock = threading.Lock()
        self._pending: list[tuple[Notice, str]] = []
        self.heard = 0  #: notices applied (for tests and metrics)

    def from_thread(self, notices: list[tuple[Notice, str]]) -> None:
        """The store's listener thread: queue ``notices`` and wake trio once for them."""
        with self._lock:
            first = not self._pending
            self._pending.extend(notices)
        if first:
            try:
                self._token.run_sync_soon(self._apply)
            except trio.RunFinishedError:
                pass

    def _apply(self) -> None:
        with self._lock:
            notices, self._pending = self._pending, []
        engine = self._engine
        for notice, subject in notices:
            self.heard += 1
            if notice is Notice.QUEUED:
                engine.kick_dispatch(subject)
            elif notice is Notice.CHANGED and subject.isdigit():
                engine.notify_change(int(subject))
            elif notice is Notice.STOP and subject.isdigit():
                engine.stop_activation(int(subject), "stopped through another supervisor")
            elif notice is Notice.MISSED:
                engine.dispatcher.look_again()
