"""Every example in README.md runs: the tenant code and the tenant.toml."""

from __future__ import annotations

import re
from pathlib import Path

import trio

from loader._registry import TenantLimits, parse_limits

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _block(language: str, marker: str) -> str:
    for block in re.findall(rf"```{language}\n(.*?)```", README, re.DOTALL):
        if marker in block:
            return str(block)
    raise AssertionError(f"README has no {language} block with {marker!r}")


async def test_the_readme_tenant_runs_in_a_sandbox(manual_sandbox_env):
    env = manual_sandbox_env
    env.deploy("acme", _block("python", "class TenantWorkflow"))
    approved, _ = await env.engine.create("acme", params={"name": "Ada"}, code_version="v1")
    refused, _ = await env.engine.create("acme", params={"name": "Bo"}, code_version="v1")
    with trio.fail_after(30):
        for iid in (approved, refused):
            await env.engine.wait_for_status("acme", iid, ["waiting"])
        env.clock.advance(3)  # the two-second cool-off
        for iid, ok in ((approved, True), (refused, False)):
            while len((await env.engine.get("acme", iid)).steps) < 3:
                await trio.sleep(0.01)
            await env.engine.send_event("acme", iid, "approval", {"ok": ok})
            await env.engine.wait_for_status("acme", iid, ["complete", "errored"])
    done = (await env.engine.get("acme", approved)).record
    assert done.output == {
        "greeting": "Hello, Ada!",
        "receipt": {"charged": "Ada", "attempt": 1},
    }
    failed = (await env.engine.get("acme", refused)).record
    assert failed.status.value == "errored"
    assert failed.error is not None
    assert (failed.error.name, failed.error.message) == ("NonRetryableError", "not approved")


def test_the_readme_tenant_toml_parses_to_the_defaults():
    limits = parse_limits({"tenant.toml": _block("toml", "[limits]")})
    assert limits == TenantLimits()
