"""Leases on a shared store (PostgreSQL): who should run each running instance.

Every running instance is held by one supervisor under a lease that ends
``lease_seconds`` after its last renewal, by the database's clock. The ``LeaseKeeper``
task of each supervisor, every ``lease_seconds / 3``:

* **renews** every lease it holds (one statement); an activation whose instance was
  not renewed *and* whose fencing token moved on was taken over by another supervisor
  (it stalled past its lease): it is aborted here — its writes would be refused anyway;
* **gives back** leases it holds with no activation behind them (a write whose COMMIT
  outcome was unknown, an activation that died on a storage error), fenced by the token
  it holds, instead of renewing them forever;
* **recovers** instances whose lease expired (their supervisor died or stalled): back
  to the queue, under a new token, each by exactly one supervisor (SKIP LOCKED).

Leases decide who *should* run an instance; the fencing token (``run_token``) is what
guarantees that nobody else *can* write it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from ._models import InstanceStatus
from ._storage import Notice, StoreTxn
from .errors import StorageError

if TYPE_CHECKING:
    from ._engine import Engine

__all__ = ["LeaseKeeper", "recover_expired_unit"]

log = logging.getLogger("tenantflow.engine")

Recovered = list[tuple[int, str]]


def recover_expired_unit(now: float) -> Callable[[StoreTxn], Recovered]:
    """A unit requeueing every instance whose lease expired; ``(key, tenant_id)`` of each."""

    def unit(txn: StoreTxn) -> Recovered:
        recovered = txn.recover_expired(now)
        for tenant_id in {tenant_id for _, tenant_id in recovered}:
            txn.announce(Notice.QUEUED, tenant_id)
        return recovered

    return unit


class LeaseKeeper:
    """Renews this supervisor's leases and recovers the expired ones of others."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        #: Activations aborted because another supervisor took their instance.
        self.lost = 0

    async def run(self) -> None:
        """Renew and recover every ``lease_seconds / 3`` until cancelled."""
        period = self._engine.lease_seconds / 3
        while True:
            await trio.sleep(period)
            try:
                await self.renew()
                await self.recover_expired()
            except StorageError as exc:
                # The database is unreachable: our writes fail too (and are fenced when it
                # comes back, if our leases expired meanwhile). Keep trying.
                log.warning("lease renewal failed: %s", exc)

    async def renew(self) -> list[int]:
        """Renew every lease we hold; abort the activations whose instance we lost.

        Returns the keys of the instances lost."""
        engine = self._engine
        before = engine.sessions()
        lease, owner = engine.lease_seconds, engine.owner
        held = dict(await engine.writer.submit(lambda txn: txn.renew_leases(owner, lease)))
        busy = engine.busy_keys()
        orphans = {key: token for key, token in held.items() if key not in busy}
        if orphans:
            await self._release_orphans(orphans)
        doubtful = [
            key
            for key, session in before.items()
            if held.get(key) != session.token and engine.session(key) is session
        ]
        if not doubtful:
            return []

        def tokens(txn: StoreTxn) -> dict[int, int | None]:
            records = {key: txn.get_instance_by_key(key) for key in doubtful}
            return {key: None if r is None else r.run_token for key, r in records.items()}

        # Not renewed: either it left running by its own writes (suspended, finished:
        # its token is unchanged) or another supervisor re-leased it (token bumped).
        current = await engine.read(tokens)
        lost = []
        for key in doubtful:
            session = engine.session(key)
            if session is None or session is not before[key] or current[key] == session.token:
                continue
            lost.append(key)
            self.lost += 1
            log.warning(
                "lost the lease of %s/%s: another supervisor holds it now; aborting",
                session.tenant_id,
                session.instance_id,
            )
            await engine.abort_activation(key, "lease lost")
        return lost

    async def _release_orphans(self, orphans: dict[int, int]) -> None:
        """Give back leases we hold with no activation behind them (see the module)."""
        engine = self._engine
        now = engine.clock.now()
        # A running one goes back to the queue (woken first); one a pause waited for is
        # paused now.
        given_back: dict[InstanceStatus, dict[str, Any]] = {
            InstanceStatus.RUNNING: {"status": InstanceStatus.QUEUED, "priority": 0},
            InstanceStatus.WAITING_FOR_PAUSE: {"status": InstanceStatus.PAUSED, "paused_at": now},
        }

        def unit(txn: StoreTxn) -> Recovered:
            released = []
            for key, token in orphans.items():
                record = txn.get_instance_by_key(key)
                if record is None or record.run_token != token:
                    continue
                changes = given_back.get(record.status)
                if changes is None:
                    continue
                txn.update_instance(key, now, token=token, new_token=True, **changes)
                released.append((key, record.tenant_id))
                txn.announce(Notice.QUEUED, record.tenant_id)
            return released

        for key, tenant_id in await engine.writer.submit(unit):
            log.warning("released the lease of instance %s: no activation held it", key)
            engine.notify_change(key)
            engine.kick_dispatch(tenant_id)

    async def recover_expired(self) -> Recovered:
        """Requeue instances whose lease expired, and tell the dispatcher."""
        engine = self._engine
        recovered = await engine.writer.submit(recover_expired_unit(engine.clock.now()))
        for key, tenant_id in recovered:
            engine.recovered += 1
            engine.notify_change(key)
            engine.kick_dispatch(tenant_id)
        return recovered
