"""Schema migrations: a database written by an older tenantflow is brought up to date.

Version 2 added the lease columns (``owner``, ``lease_expires_at``) to ``instances``.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from runtime._models import InstanceStatus
from runtime._storage import Store


def _old_instance_survives(store: Store, location: Any) -> None:
    [outcome] = store.write([lambda t: t.get_instance("acme", "old")])
    record = outcome.value
    assert record is not None and record.status is InstanceStatus.QUEUED
    [outcome] = store.write([lambda t: t.claim_queued(record.key, 5.0, "sup", 30.0)])
    assert outcome.error is None and outcome.value.status is InstanceStatus.RUNNING
    rows = location.sql(f"SELECT owner, lease_expires_at FROM instances WHERE key = {record.key}")
    assert rows[0][0] == "sup" and rows[0][1] is not None
    assert location.sql("SELECT value FROM tenantflow_meta WHERE key = 'schema'") == [("2",)]


def test_a_version_1_database_is_migrated(store_location: Any) -> None:
    if store_location.backend == "sqlite":
        from runtime._storage_sqlite import _SCHEMA

        conn = sqlite3.connect(store_location.path)
        conn.executescript(_SCHEMA)  # the version 1 tables (columns are added after)
        conn.execute("INSERT INTO tenantflow_meta VALUES ('schema', '1')")
        conn.execute(
            "INSERT INTO instances (tenant_id, instance_id, workflow_name, code_version, status,"
            " created_at, updated_at, ready_at) VALUES ('acme', 'old', 'Wf', 'v1', 'queued',"
            " 1, 1, 1)"
        )
        conn.commit()
        conn.close()
    else:
        from runtime._storage_postgres import MIGRATIONS

        store_location.sql(f'CREATE SCHEMA "{store_location.schema}"')
        store_location.sql(MIGRATIONS[0][1])
        store_location.sql("CREATE TABLE tenantflow_meta (key TEXT PRIMARY KEY, value TEXT)")
        store_location.sql("INSERT INTO tenantflow_meta VALUES ('schema', '1')")
        store_location.sql(
            "INSERT INTO instances (tenant_id, instance_id, workflow_name, code_version, status,"
            " created_at, updated_at, ready_at) VALUES ('acme', 'old', 'Wf', 'v1', 'queued',"
            " 1, 1, 1)"
        )
    store = store_location.open()
    try:
        _old_instance_survives(store, store_location)
    finally:
        store.close()
    store = store_location.open()  # opening an up-to-date database changes nothing
    try:
        assert store.read(lambda t: t.count_by_status(None)) == {"running": 1}
    finally:
        store.close()
