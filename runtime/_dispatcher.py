"""Concurrency slots: who runs next when a slot frees.

Only ``running`` instances hold a slot; ``waiting`` ones hold none. Slots are bounded
globally (``max_concurrency``) and per tenant (its ``max_concurrency``), and shared
**max-min fairly**: each free slot goes to the tenant with queued work that runs the
fewest instances now, ties going round-robin. So a tenant with 100,000 queued
instances cannot delay another tenant's single one by more than one slot's turn.
Within a tenant, instances woken from a sleep, an event or a retry go before new ones.

**Warm quanta.** When more tenants have queued work than sandboxes can stay warm, one
instance per turn would cost one cold start per instance: by the time the turn comes
back to a tenant, the pool has evicted its sandbox for the others (measured: 9,986
cold starts for 10,000 instances of 1,000 tenants). So a tenant keeps its place in the
round-robin for up to ``WARM_QUANTUM`` turns in a row while its sandbox is warm (the
runner says which are, ``Runner.warm_tenants``): a cold start then serves up to that
many instances. Running counts still come first, so this only orders tenants that run
equally many; a tenant waits at most ``WARM_QUANTUM`` turns of each tenant ahead of it.
With a runner that warms nothing (in-process) turns are plain round-robin.

The cost of a round does not grow with the backlog: only the heads of the few tenants
that can get a slot are read (one indexed query each), the way DBOS walks queue
partitions instead of scanning the queue.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

import trio

from ._storage import StoreTxn

if TYPE_CHECKING:
    from ._engine import Engine

__all__ = ["FairDispatcher"]

#: How often an idle dispatcher looks in the database for queued work it was not told
#: about (a safety net: every path that queues an instance also tells it).
_SAFETY_NET_SECONDS = 5.0
#: While writes lag (back-pressure), how often to look whether they caught up.
_CONGESTED_RETRY_SECONDS = 0.1
#: Turns in a row a tenant with a warm sandbox may take before going to the back.
WARM_QUANTUM = 8


class FairDispatcher:
    """Starts queued instances into free slots, fairly across tenants."""

    def __init__(self, engine: Engine, tenant_limit: Callable[[str], int]) -> None:
        self._engine = engine
        self._tenant_limit = tenant_limit
        self.running: Counter[str] = Counter()  #: slots held per tenant (claiming or running)
        self.queued_tenants: set[str] = set()  #: tenants that may have queued instances
        self._kicked: set[str] = set()  #: tenants queued to while a round was reading
        self._served = itertools.count()
        self._last_served: dict[str, int] = {}
        #: Per tenant in the middle of a quantum: (its place before the quantum, turns
        #: taken in it). Its place is kept while its sandbox stays warm.
        self._quantum: dict[str, tuple[int, int]] = {}
        self.wakeup = trio.Event()
        self.idle = False
        self._reread = True  #: read which tenants have queued instances from the database

    def kick(self, tenant_id: str | None) -> None:
        """An instance of ``tenant_id`` was queued (None: a slot freed)."""
        if tenant_id is not None:
            self.queued_tenants.add(tenant_id)
            self._kicked.add(tenant_id)
            self.wakeup.set()
        elif self.queued_tenants:
            self.wakeup.set()

    def take_slot(self, tenant_id: str) -> None:
        """Count a slot taken by ``tenant_id`` (here, or by a create that started its
        instance at once: it is served all the same, for the round-robin)."""
        self.running[tenant_id] += 1
        place, turns = self._quantum.get(tenant_id, (self._last_served.get(tenant_id, -1), 0))
        if turns + 1 < WARM_QUANTUM:
            self._quantum[tenant_id] = (place, turns + 1)
        else:
            self._quantum.pop(tenant_id, None)
        self._last_served[tenant_id] = next(self._served)

    def _turn(self, tenant_id: str, warm: Collection[str]) -> tuple[int, int, int, str]:
        """Who goes first among queued tenants: fewest running, then longest unserved,
        counting a warm tenant in the middle of its quantum from before the quantum (and
        ahead of the others served as long ago: its turn is not over); then by name, so
        that ties do not depend on a set's order."""
        quantum = self._quantum.get(tenant_id)
        if quantum is not None and tenant_id in warm:
            return self.running[tenant_id], quantum[0], 0, tenant_id
        return self.running[tenant_id], self._last_served.get(tenant_id, -1), 1, tenant_id

    def release(self, tenant_id: str) -> None:
        """A slot of ``tenant_id`` is free again."""
        self.running[tenant_id] -= 1
        if self.running[tenant_id] <= 0:
            del self.running[tenant_id]
        self.kick(None)

    def look_again(self) -> None:
        """Read the queued tenants from the database (we may have missed being told)."""
        self._reread = True
        self.wakeup.set()

    async def run(self) -> None:
        engine = self._engine
        while True:
            self.wakeup = trio.Event()
            if self._reread:
                self._reread = False
                queued = await engine.read(lambda txn: txn.queued_tenants(10_000))
                self.queued_tenants.update(queued)
            started = await self._round()
            if started == 0 and engine.write_congested():
                # Back-pressure: start nothing while the database lags; look again soon.
                await trio.sleep(_CONGESTED_RETRY_SECONDS)
                continue
            if started == 0:
                self.idle = True
                with trio.move_on_after(_SAFETY_NET_SECONDS):
                    await self.wakeup.wait()
                self.idle = False
                if not self.wakeup.is_set() and not engine.draining:
                    missed = await engine.read(lambda txn: txn.queued_tenants(100))
                    self.queued_tenants.update(missed)

    @property
    def knows_queue(self) -> bool:
        """The queued tenants were read since the last time we may have missed some."""
        return not self._reread

    def room(self, tenant_id: str) -> int:
        """Slots ``tenant_id`` may still take under its own limit."""
        return max(0, self._tenant_limit(tenant_id) - self.running[tenant_id])

    async def _round(self) -> int:
        engine = self._engine
        if engine.draining or engine.write_congested():
            return 0
        free = engine.max_concurrency - engine.running_count
        if free <= 0:
            return 0
        candidates = [t for t in self.queued_tenants if self.room(t) > 0]
        if not candidates:
            return 0
        # The tenants that can get a slot this round: fewest running first, then the one
        # served longest ago. At most `free` of them can win a slot: a partial selection,
        # O(T log free), not a sort of every queued tenant each round.
        warm = engine.runner.warm_tenants()

        def turn(tenant_id: str) -> tuple[int, int, int, str]:
            return self._turn(tenant_id, warm)

        chosen = heapq.nsmallest(free, candidates, key=turn)
        busy = engine.busy_keys()
        wanted = {t: min(free, self.room(t)) + len(busy) for t in chosen}
        self._kicked.clear()

        def read_heads(txn: StoreTxn) -> dict[str, list[tuple[int, int]]]:
            return {t: txn.queued_for_tenant(t, n) for t, n in wanted.items()}

        heads = await engine.read(read_heads)
        queues = {t: [key for key, _ in rows if key not in busy] for t, rows in heads.items()}
        started = 0
        heap = [turn(t) for t in queues if queues[t]]
        heapq.heapify(heap)
        while heap and started < free:
            tenant_id = heapq.heappop(heap)[-1]
            if self.room(tenant_id) <= 0:
                continue
            key = queues[tenant_id].pop(0)
            self.take_slot(tenant_id)
            engine.start_instance(key, tenant_id)
            started += 1
            if queues[tenant_id]:
                heapq.heappush(heap, turn(tenant_id))
        for tenant_id, rows in heads.items():
            saw_all = len(rows) < wanted[tenant_id]
            left = queues[tenant_id] or any(key in busy for key, _ in rows)
            if saw_all and not left and tenant_id not in self._kicked:
                self.queued_tenants.discard(tenant_id)  # nothing queued remains
                self._quantum.pop(tenant_id, None)  # a quantum ends with its queue
        if len(self._last_served) > 100_000:  # forget tenants long gone
            queued = self.queued_tenants
            self._last_served = {t: n for t, n in self._last_served.items() if t in queued}
            self._quantum = {t: q for t, q in self._quantum.items() if t in queued}
        return started
