"""The tenant folder rescan reads only what changed (real folders, real files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import loader._registry as registry_module
from loader import TenantCode, TenantRegistry

MAIN = "from tenantflow import WorkflowEntrypoint\n# {tag}\n"


def write(root: Path, tenant: str, tag: str) -> Path:
    folder = root / tenant
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "main.py"
    path.write_text(MAIN.format(tag=tag))
    return path


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    real = registry_module.read_tenant

    def counting(folder: Path) -> TenantCode:
        seen.append(folder.name)
        return real(folder)

    monkeypatch.setattr(registry_module, "read_tenant", counting)
    return seen


def registry(root: Path) -> TenantRegistry:
    async def persist(tenant_id: str, version: str, files: bytes) -> None:
        pass

    async def probe(code: TenantCode) -> str | None:
        return None

    return TenantRegistry(root, persist, probe)


async def test_an_unchanged_folder_is_not_read_again(tmp_path: Path, reads: list[str]) -> None:
    for i in range(50):
        write(tmp_path, f"t{i:02d}", "v1")
    reg = registry(tmp_path)
    assert len(await reg.refresh()) == 50
    assert len(reads) == 50
    reads.clear()
    assert await reg.refresh() == []
    assert reads == []  # a stat per file, no read


async def test_a_same_size_edit_in_the_same_instant_is_seen(tmp_path: Path, reads: list[str]):
    path = write(tmp_path, "acme", "v1")
    reg = registry(tmp_path)
    await reg.refresh()
    v1 = reg.current_version("acme")
    before = path.stat()
    with path.open("r+") as f:  # in place: the same inode and size
        f.write(MAIN.format(tag="v2"))
    # even with the old mtime put back, the ctime moves (nothing can set it back)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size
    assert await reg.refresh() == ["acme"]
    assert reg.current_version("acme") not in (None, v1)


async def test_a_replaced_file_and_a_new_module_are_seen(tmp_path: Path, reads: list[str]):
    path = write(tmp_path, "acme", "v1")
    reg = registry(tmp_path)
    await reg.refresh()
    v1 = reg.current_version("acme")
    replacement = tmp_path / "acme" / "main.py.tmp"
    replacement.write_text(MAIN.format(tag="v2"))
    replacement.replace(path)  # an editor's save: a new inode
    assert await reg.refresh() == ["acme"]
    v2 = reg.current_version("acme")
    assert v2 not in (None, v1)
    (tmp_path / "acme" / "helpers.py").write_text("X = 1\n")
    assert await reg.refresh() == ["acme"]
    assert reg.current_version("acme") not in (None, v1, v2)


async def test_a_broken_folder_is_reported_once_until_it_changes(tmp_path: Path, reads):
    folder = tmp_path / "acme"
    folder.mkdir()
    (folder / "main.py").write_bytes(b"\xff\xfe not utf-8")
    reg = registry(tmp_path)
    await reg.refresh()
    assert reg.tenants["acme"].load_error
    reads.clear()
    await reg.refresh()
    assert reads == []
    write(tmp_path, "acme", "fixed")
    assert await reg.refresh() == ["acme"]
    assert reg.tenants["acme"].load_error is None
    assert reg.current_version("acme") is not None
