"""The live set of tenants: a folder watched for new tenants and changed code.

Each tenant's current code version (SHA-256 of its files) is stored in the database,
content-addressed, before anything runs on it, so an instance resumes on the version
it started with even after the folder changed or vanished, on any supervisor that
shares the database. A version whose code does not load is remembered with its error
(file, line, message) and the tenant's earlier version, if any, stays current.

A tenant may also have no folder at all: ``put_source`` adopts code sent as files (the
browser playground's), which then lives only in the database. Such a tenant is marked
``source="database"``; folder scans never hide it, and a folder of the same name is
ignored while it exists (the two would fight over the current version).
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgpack
import trio

from ._directory import Fingerprint, TenantCode, fingerprint, read_tenant, tenant_code

__all__ = ["TenantLimits", "TenantRegistry", "TenantState"]

log = logging.getLogger("tenantflow.loader")

_LIMIT_KEYS = {
    "memory_mb": 512,
    "cpu_seconds": 30,
    "open_files": 64,
    "max_concurrency": 100,
    "create_rate": 100,
    "create_burst": 100,
}


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """The ``[limits]`` table of ``tenant.toml``, with SPEC 7's defaults."""

    memory_mb: int = 512
    cpu_seconds: int = 30
    open_files: int = 64
    max_concurrency: int = 100
    create_rate: int = 100
    create_burst: int = 100


@dataclass
class TenantState:
    """What the registry knows of one tenant."""

    tenant_id: str
    version: str | None = None  #: the current (loadable) code version
    limits: TenantLimits = field(default_factory=TenantLimits)
    load_error: str | None = None  #: "main.py:3: invalid syntax" for the newest version
    failed_version: str | None = None
    present: bool = True  #: its folder exists (always True for a database tenant)
    source: Literal["folder", "database"] = "folder"  #: where its newest code comes from


def parse_limits(files: dict[str, str]) -> TenantLimits:
    """Read ``tenant.toml``'s ``[limits]``; unknown keys and bad values are errors."""
    text = files.get("tenant.toml")
    if text is None:
        return TenantLimits()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"tenant.toml: {exc}") from None
    limits = data.get("limits", {})
    if not isinstance(limits, dict):
        raise ValueError("tenant.toml: [limits] must be a table")
    values: dict[str, int] = {}
    for key, value in limits.items():
        if key not in _LIMIT_KEYS:
            raise ValueError(f"tenant.toml: unknown limit {key!r}")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"tenant.toml: limits.{key} must be a positive integer")
        values[key] = value
    return TenantLimits(**values)


#: Checks that a code version loads; returns None or the error ("main.py:3: ...").
Probe = Callable[[TenantCode], Awaitable[str | None]]
#: Stores a code version in the database.
Persist = Callable[[str, str, bytes], Awaitable[None]]


class TenantRegistry:
    """Tenants under ``root``; ``refresh()`` picks up new folders and changed files."""

    def __init__(self, root: Path | None, persist: Persist, probe: Probe) -> None:
        self.root = root
        self._persist = persist
        self._probe = probe
        self.tenants: dict[str, TenantState] = {}
        self._seen: dict[str, str] = {}  # tenant -> newest version looked at
        self._prints: dict[str, Fingerprint] = {}  # tenant -> its files when last read
        self._shadowed: set[str] = set()  # database tenants whose name a folder also has

    def current_version(self, tenant_id: str) -> str | None:
        state = self.tenants.get(tenant_id)
        return state.version if state is not None and state.present else None

    def limits(self, tenant_id: str) -> TenantLimits:
        state = self.tenants.get(tenant_id)
        return state.limits if state is not None else TenantLimits()

    async def refresh(self) -> list[str]:
        """Rescan the folder; returns the tenants whose code changed.

        One worker-thread trip lists the folders and reads only those whose files
        changed since the last scan (by ``fingerprint``): a rescan of 10,000 unchanged
        tenants costs a ``stat`` per file, not a read and a hash.
        """
        if self.root is None or not self.root.is_dir():
            return []
        scanned = await trio.to_thread.run_sync(self._scan)
        for tenant_id in self._stored() & set(scanned):
            if tenant_id not in self._shadowed:
                log.warning(
                    "tenant %s: its code lives in the database; ignoring its folder",
                    tenant_id,
                )
                self._shadowed.add(tenant_id)
            del scanned[tenant_id]
        changed: list[str] = []
        for tenant_id in set(self.tenants) - set(scanned) - self._stored():
            self.tenants[tenant_id].present = False
        for tenant_id in set(self.tenants) & set(scanned):
            self.tenants[tenant_id].present = True
        for tenant_id, code in scanned.items():
            if code is None:
                continue  # unchanged since the last scan
            if isinstance(code, Exception):
                self._fail(tenant_id, None, str(code))
                continue
            if self._seen.get(tenant_id) == code.version:
                continue
            self._seen[tenant_id] = code.version
            changed.append(tenant_id)
            # A new tenant becomes visible only once its first version is checked.
            state = self.tenants.get(tenant_id) or TenantState(tenant_id)
            await self._adopt(state, code)
            state.present = True
            self.tenants.setdefault(tenant_id, state)
        return changed

    def _stored(self) -> set[str]:
        return {t for t, s in self.tenants.items() if s.source == "database"}

    async def put_source(self, tenant_id: str, files: dict[str, str]) -> tuple[str, str | None]:
        """Adopt code given as files, stored only in the database: ``(version, error)``.

        The version is stored even when it fails to load (the error names file and line,
        as for a folder); then the tenant's earlier version, if any, stays current.
        Raises ValueError for a tenant that has a folder, a bad tenant id or bad files.
        Sending the current or the last failed version again costs no new probe.
        """
        code = tenant_code(tenant_id, files)
        state = self.tenants.get(tenant_id)
        if state is None:
            # Registered before the probe, so a failing first version is still listed
            # with its error, as a folder tenant's would be.
            state = self.tenants[tenant_id] = TenantState(tenant_id, source="database")
        elif state.source != "database" and state.present:
            raise ValueError(f"tenant {tenant_id!r} has a folder: its code comes from there")
        state.source, state.present = "database", True
        if state.version == code.version:
            return code.version, None
        if state.failed_version == code.version and state.load_error is not None:
            return code.version, state.load_error
        await self._adopt(state, code)
        if state.version == code.version:
            return code.version, None
        return code.version, state.load_error or "the code failed to load"

    def _scan(self) -> dict[str, TenantCode | Exception | None]:
        """Tenant folders -> their code, the error reading it, or None if unchanged."""
        assert self.root is not None
        found: dict[str, TenantCode | Exception | None] = {}
        prints: dict[str, Fingerprint] = {}
        with os.scandir(self.root) as listing:  # DirEntry: no stat for the type
            folders = sorted((e.name, e.path) for e in listing if e.is_dir())
        for tenant_id, path in folders:
            try:
                files = fingerprint(path)
                if not any(name == "main.py" for name, *_ in files):
                    continue  # not a tenant (yet)
                prints[tenant_id] = files
                if self._prints.get(tenant_id) == files:
                    found[tenant_id] = None
                    continue
                found[tenant_id] = read_tenant(Path(path))
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                found[tenant_id] = exc  # reported once: read again when its files change
        self._prints = prints
        return found

    async def _adopt(self, state: TenantState, code: TenantCode) -> None:
        try:
            limits = parse_limits(code.files)
        except ValueError as exc:
            self._fail(state.tenant_id, code.version, str(exc))
            return
        await self._persist(code.tenant_id, code.version, msgpack.packb(code.files))
        error = await self._probe(code)
        if error is not None:
            self._fail(state.tenant_id, code.version, error)
            return
        state.version, state.limits = code.version, limits
        state.load_error = state.failed_version = None
        log.info("tenant %s: code version %s is live", code.tenant_id, code.version[:12])

    def _fail(self, tenant_id: str, version: str | None, error: str) -> None:
        state = self.tenants.setdefault(tenant_id, TenantState(tenant_id))
        state.load_error, state.failed_version = error, version
        log.warning("tenant.load_failed: tenant %s: %s", tenant_id, error)

    async def watch(self, interval: float = 1.0) -> None:
        """Rescan every ``interval`` seconds, forever (a task in the supervisor)."""
        while True:
            try:
                await self.refresh()
            except OSError as exc:
                log.warning("cannot scan %s: %s", self.root, exc)
            await trio.sleep(interval)

    def describe(self) -> list[dict[str, Any]]:
        return [
            {"tenant": s.tenant_id, "code_version": s.version, "load_error": s.load_error}
            for s in sorted(self.tenants.values(), key=lambda s: s.tenant_id)
            if s.present
        ]
