"""Tenants from a folder: ``ROOT/<tenant_id>/main.py`` and its sibling modules.

A tenant's code version is the SHA-256 of its files (names and contents, in a fixed
order), so the same code always has the same version and any change makes a new one.
``tenant_code`` builds a version from files held in memory (source sent by the browser
playground, kept only in the database), with the same limits as a folder.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from sandbox.protocol import TENANT_ID_PATTERN

__all__ = [
    "Fingerprint",
    "TenantCode",
    "code_version",
    "fingerprint",
    "read_tenant",
    "scan_tenants",
    "tenant_code",
]

_MAX_FILE_BYTES: Final = 256 * 1024
_MAX_FILES: Final = 64
#: A tenant file: a module name (importable by its siblings) or ``tenant.toml``.
_FILE_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,99}\.py|tenant\.toml")


@dataclass(frozen=True, slots=True)
class TenantCode:
    """One code version of a tenant: its files and their SHA-256."""

    tenant_id: str
    version: str
    files: dict[str, str]


def code_version(files: dict[str, str]) -> str:
    """SHA-256 over the files' names and contents, independent of their order."""
    digest = hashlib.sha256()
    for name in sorted(files):
        data = files[name].encode()
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


#: What a rescan compares to know a tenant folder is unchanged without reading it.
Fingerprint = tuple[tuple[str, int, int, int, int], ...]


def fingerprint(folder: str | Path) -> Fingerprint:
    """Name, size, inode, mtime and ctime of each code file: one ``stat`` per file.

    Editors replace files (a new inode) or write them in place (a new mtime and
    ctime); either changes the fingerprint, so a rescan reads only changed folders.
    """
    entries = []
    with os.scandir(folder) as listing:
        for entry in listing:
            if entry.name.endswith((".py", ".toml")) and entry.is_file():
                st = entry.stat()
                entries.append((entry.name, st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(sorted(entries))


def read_tenant(folder: Path) -> TenantCode:
    """Read ``main.py``, its sibling ``*.py`` modules and ``tenant.toml`` of one tenant."""
    tenant_id = folder.name
    if not TENANT_ID_PATTERN.fullmatch(tenant_id):
        raise ValueError(f"{folder}: {tenant_id!r} is not a valid tenant id")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".py", ".toml"))
    if len(paths) > _MAX_FILES:
        raise ValueError(f"{folder}: more than {_MAX_FILES} files")
    files: dict[str, str] = {}
    for path in paths:
        data = path.read_bytes()
        if len(data) > _MAX_FILE_BYTES:
            raise ValueError(f"{path}: larger than {_MAX_FILE_BYTES} bytes")
        files[path.name] = data.decode("utf-8")
    if "main.py" not in files:
        raise ValueError(f"{folder}: no main.py")
    return TenantCode(tenant_id, code_version(files), files)


def tenant_code(tenant_id: str, files: dict[str, str]) -> TenantCode:
    """A code version given as files rather than read from a folder (the playground's).

    The same limits as a folder apply, and file names must be plain module names, so
    stored source can never name a path. Raises ValueError naming what is wrong.
    """
    if not TENANT_ID_PATTERN.fullmatch(tenant_id):
        raise ValueError(f"{tenant_id!r} is not a valid tenant id")
    if len(files) > _MAX_FILES:
        raise ValueError(f"more than {_MAX_FILES} files")
    for name, text in files.items():
        if not _FILE_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a tenant file name (module.py or tenant.toml)")
        if len(text.encode()) > _MAX_FILE_BYTES:
            raise ValueError(f"{name}: larger than {_MAX_FILE_BYTES} bytes")
    if "main.py" not in files:
        raise ValueError("no main.py")
    return TenantCode(tenant_id, code_version(files), dict(files))


def scan_tenants(root: Path) -> dict[str, TenantCode]:
    """Every tenant folder under ``root`` that has a ``main.py``."""
    tenants = {}
    for folder in sorted(root.iterdir()):
        if folder.is_dir() and (folder / "main.py").is_file():
            code = read_tenant(folder)
            tenants[code.tenant_id] = code
    return tenants
