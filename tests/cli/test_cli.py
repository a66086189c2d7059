"""``tenantflow``'s command line: argument parsing and ``check`` in process (click's
CliRunner), then every client command against a real ``tenantflow serve`` subprocess,
and the graceful stop (SIGTERM mid-sleep, restart on the same database, completion).
"""

from __future__ import annotations

import io
import json
import re
import signal
from pathlib import Path

import pytest
from click.testing import CliRunner

from runtime._client import ApiError, Client, ClientError, parse_sse
from runtime._render import Checklist, step_line, tenants_table
from runtime.cli import cli, client_url, is_loopback

GOOD = """\
from tenantflow import WorkflowEntrypoint
import helpers


class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
        return step.do("one", lambda: helpers.double(21))
"""
HELPERS = "def double(x):\n    return x * 2\n"


def make_tenant(root: Path, name: str, **files: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    for filename, text in files.items():
        (folder / filename.replace("_py", ".py").replace("_toml", ".toml")).write_text(text)
    return folder


def invoke(*args: str, **env: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), env=env or None)
    return result.exit_code, result.output


# ------------------------------------------------------------------ parsing, in process


def test_help_lists_every_command() -> None:
    code, out = invoke("--help")
    assert code == 0
    for command in ("serve", "check", "trigger", "instances", "send-event", "tenants"):
        assert command in out
    code, out = invoke("instances", "--help")
    assert code == 0
    for command in ("list", "describe", "pause", "resume", "terminate", "restart"):
        assert command in out


def test_check_good_tenant(tmp_path: Path) -> None:
    make_tenant(tmp_path, "good", main_py=GOOD, helpers_py=HELPERS)
    make_tenant(tmp_path, "limited", main_py=GOOD, helpers_py=HELPERS, tenant_toml="[limits]\n")
    code, out = invoke("check", str(tmp_path))
    assert code == 0, out
    assert re.search(r"^ok good [0-9a-f]{12}$", out, re.MULTILINE)
    assert re.search(r"^ok limited [0-9a-f]{12}$", out, re.MULTILINE)


def test_check_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    make_tenant(tmp_path, "good", main_py=GOOD, helpers_py=HELPERS)
    make_tenant(tmp_path, "broken", main_py="x = 1\n\ndef oops(:\n    pass\n")
    code, out = invoke("check", str(tmp_path))
    assert code == 1
    assert re.search(r"^ok good ", out, re.MULTILINE)
    assert re.search(r"^error broken: main\.py:3: ", out, re.MULTILINE), out


def test_check_restricted_construct_in_a_sibling_module(tmp_path: Path) -> None:
    make_tenant(tmp_path, "sneaky", main_py=GOOD, helpers_py="x = 1\ny = x.__class__\n")
    code, out = invoke("check", str(tmp_path))
    assert code == 1
    assert re.search(r"^error sneaky: helpers\.py:2: ", out, re.MULTILINE), out


def test_check_refuses_imports_the_sandbox_would_refuse(tmp_path: Path) -> None:
    make_tenant(tmp_path, "clock", main_py="import math\nimport time\n" + GOOD)
    make_tenant(tmp_path, "relative", main_py="from . import helpers\n", helpers_py=HELPERS)
    make_tenant(
        tmp_path, "stdlib", main_py="from json import dumps\nimport re\n" + GOOD, helpers_py=HELPERS
    )
    code, out = invoke("check", str(tmp_path))
    assert code == 1
    assert "error clock: main.py:2: ImportError: module 'time' is not allowed" in out
    assert "error relative: main.py:1: ImportError: relative imports are not allowed" in out
    assert re.search(r"^ok stdlib [0-9a-f]{12}$", out, re.MULTILINE), out


@pytest.mark.parametrize(
    "toml",
    ["[limits]\nmemory_mb = -1\n", "[limits]\nwings = 2\n", "[limits\n"],
    ids=["negative", "unknown-key", "not-toml"],
)
def test_check_bad_tenant_toml(tmp_path: Path, toml: str) -> None:
    make_tenant(tmp_path, "acme", main_py=GOOD, helpers_py=HELPERS, tenant_toml=toml)
    code, out = invoke("check", str(tmp_path))
    assert code == 1
    assert re.search(r"^error acme: tenant\.toml: ", out, re.MULTILINE), out


def test_check_without_tenants_or_main(tmp_path: Path) -> None:
    assert invoke("check", str(tmp_path))[0] == 1
    make_tenant(tmp_path, "headless", helpers_py=HELPERS)
    code, out = invoke("check", str(tmp_path))
    assert code == 1
    assert "error headless:" in out and "main.py" in out


def test_serve_refuses_a_public_host_without_a_token() -> None:
    code, out = invoke("serve", "--host", "0.0.0.0")
    assert code == 2
    assert "refusing to listen on '0.0.0.0' without an admin token" in out
    assert "TENANTFLOW_ADMIN_TOKEN" in out


def test_serve_validates_options_before_starting() -> None:
    # A bad --loader is the last check before the server starts: reaching it shows that
    # everything before it (the host/token rule, fractional --idle-timeout) passed.
    for args, env in [
        (["--host", "0.0.0.0", "--admin-token", "s3cret"], {}),
        (["--host", "::"], {"TENANTFLOW_ADMIN_TOKEN": "s3cret"}),
        (["--idle-timeout", "0.25"], {}),
    ]:
        code, out = invoke("serve", *args, "--loader", "no_such_module_xyz:f", **env)
        assert code == 2, out
        assert "--loader" in out and "no_such_module_xyz" in out
    code, out = invoke("serve", "--idle-timeout", "0")
    assert code == 2 and "--idle-timeout" in out
    code, out = invoke("serve", "--loader", "json")
    assert code == 2 and "module:callable" in out


def test_serve_reports_a_bad_database_url_in_one_line(tmp_path: Path) -> None:
    code, out = invoke("serve", "--tenants", str(tmp_path), "--db", "mysql://db/x")
    assert code == 1
    assert out.strip() == (
        "error: cannot start: ValueError: unsupported database URL 'mysql://db/x': "
        "use sqlite:///PATH"
    )


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_client_url_for_wildcard_hosts() -> None:
    assert client_url("0.0.0.0", 80) == "http://127.0.0.1:80"
    assert client_url("::", 80) == "http://[::1]:80"
    assert client_url("10.1.1.1", 8) == "http://10.1.1.1:8"


def test_bad_json_arguments_are_usage_errors() -> None:
    code, out = invoke("trigger", "acme", "--params", "{nope")
    assert code == 2 and "not valid JSON" in out
    code, out = invoke("send-event", "acme", "i1", "--type", "t", "--payload", "[")
    assert code == 2 and "not valid JSON" in out
    code, out = invoke("send-event", "acme", "i1")
    assert code == 2 and "--type" in out
    code, out = invoke("instances", "list", "acme", "--status", "sleeping")
    assert code == 2 and "--status" in out


def test_connection_refused_names_the_url(refused_url: str) -> None:
    code, out = invoke("tenants", TENANTFLOW_URL=refused_url)
    assert code == 1
    assert out.startswith("error: ") and refused_url in out and "connection refused" in out
    with pytest.raises(ClientError, match="connection refused"):
        Client(refused_url).call("GET", "/healthz")


def test_parse_sse_skips_heartbeats() -> None:
    stream = [
        ": heartbeat\n",
        "\n",
        "event: step\n",
        'data: {"name": "a",\n',
        'data: "count": 1}\n',
        "\n",
        "event: done\n",
        'data: {"status": "complete"}\n',
        "\n",
    ]
    events = list(parse_sse(stream))
    assert [e.event for e in events] == ["step", "done"]
    assert events[0].json() == {"name": "a", "count": 1}
    assert events[1].json() == {"status": "complete"}


def test_step_lines_and_checklist_without_a_tty() -> None:
    base = {"name": "charge", "count": 1, "type": "do", "attempts": 1}
    assert step_line({**base, "status": "running"}).startswith("[~] charge")
    assert step_line({**base, "status": "complete", "output": {"ok": True}}).endswith(
        '-> {"ok": true}'
    )
    retry = step_line(
        {**base, "status": "retrying", "error": {"name": "Boom", "message": "x"}, "attempts": 2}
    )
    assert retry.startswith("[!] charge") and "2 attempts" in retry and "Boom: x" in retry
    assert step_line({**base, "status": "errored", "error": None}).startswith("[E] charge")
    assert step_line({**base, "status": "waiting", "type": "sleep", "count": 2}).startswith(
        "[ ] charge #2"
    )
    out = io.StringIO()
    checklist = Checklist(out, redraw=False)
    checklist.update({**base, "status": "running"})
    checklist.update({**base, "status": "running"})  # no change: no line
    checklist.log("log info: hi")
    checklist.update({"name": "charge", "count": 1, "status": "complete", "output": 3})
    assert out.getvalue().splitlines() == [
        step_line({**base, "status": "running"}),
        "log info: hi",
        step_line({**base, "status": "complete", "output": 3}),
    ]


def test_checklist_redraws_on_a_terminal() -> None:
    out = io.StringIO()
    checklist = Checklist(out, redraw=True)
    checklist.update({"name": "a", "count": 1, "type": "do", "status": "running"})
    checklist.update({"name": "a", "count": 1, "type": "do", "status": "complete"})
    assert "\x1b[1F\x1b[J" in out.getvalue()  # back over the one-line checklist


def test_tenants_table() -> None:
    text = tenants_table(
        [
            {"tenant": "a", "code_version": "f" * 64, "sandbox": "warm", "instances": {"x": 2}},
            {"tenant": "b", "code_version": None, "sandbox": "cold", "instances": {}},
        ]
    )
    assert text.splitlines()[1].split() == ["a", "f" * 12, "warm", "x=2"]
    assert text.splitlines()[2].split() == ["b", "-", "cold", "-"]


# ------------------------------------------------------------------ against a real server


def test_trigger_list_and_describe(cli) -> None:
    created = cli.json("trigger", "waiter", "--id", "w-list", "--params", '{"name": "Ada"}')
    assert created == {"id": "w-list", "status": "queued"}
    result = cli("trigger", "waiter", "--params", "{}")
    assert result.returncode == 0, result.stderr
    new_id = re.search(r"created waiter instance (\S+) \(queued\)", result.stdout)
    assert new_id is not None, result.stdout

    view = cli.wait_for(
        lambda v: any(s["name"] == "approval" for s in v["steps"]),
        *("instances", "describe", "waiter", "w-list"),
    )
    assert set(view) >= {"id", "status", "params", "output", "error", "code_version", "steps"}
    assert view["params"] == {"name": "Ada"} and view["status"] == "waiting"
    assert view["steps"][0]["name"] == "load user" and view["steps"][0]["output"] == {"name": "Ada"}

    listing = cli("instances", "list", "waiter")
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.splitlines()[0].split() == ["ID", "STATUS", "CREATED", "UPDATED"]
    assert re.search(r"^w-list\s+waiting\s", listing.stdout, re.MULTILINE)
    assert new_id[1] in listing.stdout
    page = cli.json("instances", "list", "waiter", "--status", "waiting", "--limit", "1")
    assert len(page["instances"]) == 1 and page["next_cursor"]

    text = cli("instances", "describe", "waiter", "w-list")
    assert text.returncode == 0
    assert re.search(r"^status\s+waiting$", text.stdout, re.MULTILINE)
    assert re.search(r"^\s+\[x\] load user\s+do\s+1 attempt\s+-> ", text.stdout, re.MULTILINE)
    assert re.search(r"^\s+\[ \] approval\s+waitForEvent\s", text.stdout, re.MULTILINE)


def test_describe_follow_while_an_event_is_sent(cli) -> None:
    assert (
        cli("trigger", "waiter", "--id", "w-follow", "--params", '{"name": "Bo"}').returncode == 0
    )
    follower = cli.spawn("instances", "describe", "waiter", "w-follow", "--follow")
    try:
        follower.wait_line(lambda line: line.startswith("[ ] approval"))
        sent = cli(
            "send-event", "waiter", "w-follow", "--type", "approval", "--payload", '{"by": "Cy"}'
        )
        assert sent.returncode == 0, sent.stderr
        assert "sent approval to waiter instance w-follow" in sent.stdout
        code, stderr = follower.finish()
    finally:
        follower.close()
    assert code == 0, stderr
    lines = follower.lines
    assert lines[0].startswith("instance w-follow (tenant waiter): ")
    assert any(
        re.match(r"\[x\] load user\s+do\s+1 attempt\s+-> \{\"name\": \"Bo\"\}", x) for x in lines
    )
    approved = next(i for i, x in enumerate(lines) if x.startswith("[x] approval"))
    assert approved > lines.index(next(x for x in lines if x.startswith("[ ] approval")))
    assert "log info: approved by Cy" in lines
    assert any(re.match(r"\[x\] greet\s+do\s+1 attempt\s+-> Hello, Bo!", x) for x in lines)
    assert lines[-1] == "complete -> Hello, Bo!"


def test_describe_follow_json_and_errored_exit_status(cli) -> None:
    assert cli("trigger", "failer", "--id", "f1").returncode == 0
    follower = cli.spawn("instances", "describe", "failer", "f1", "--follow")
    code, stderr = follower.finish()
    assert code == 1, stderr
    assert any(
        re.match(r"\[E\] doomed\s+do\s+1 attempt\s+! NonRetryableError: no way", x)
        for x in follower.lines
    )
    assert follower.lines[-1] == "errored: NonRetryableError: no way"

    # A finished instance: the history, then done, in JSON lines.
    result = cli("instances", "describe", "failer", "f1", "--follow", "--json")
    assert result.returncode == 1
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert {"step", "status", "done"} <= {e["event"] for e in events}
    assert events[-1]["event"] == "done" and events[-1]["data"]["status"] == "errored"


def test_pause_resume_terminate_restart(cli) -> None:
    assert cli("trigger", "waiter", "--id", "w-ctl").returncode == 0
    cli.wait_for(lambda v: v["status"] == "waiting", "instances", "describe", "waiter", "w-ctl")

    paused = cli("instances", "pause", "waiter", "w-ctl")
    assert paused.returncode == 0, paused.stderr
    assert paused.stdout.strip() == "pause: waiter instance w-ctl is paused"
    assert cli.json("instances", "describe", "waiter", "w-ctl")["status"] == "paused"

    resumed = cli.json("instances", "resume", "waiter", "w-ctl")
    assert resumed == {"id": "w-ctl", "status": resumed["status"]}
    assert resumed["status"] in ("waiting", "queued", "running")

    terminated = cli("instances", "terminate", "waiter", "w-ctl")
    assert terminated.returncode == 0, terminated.stderr
    assert "is terminated" in terminated.stdout
    again = cli("instances", "terminate", "waiter", "w-ctl")
    assert again.returncode == 1
    assert again.stderr.startswith("error: instance.cannot_terminate: ")

    restarted = cli.json("instances", "restart", "waiter", "w-ctl")
    assert restarted["id"] == "w-ctl" and restarted["status"] not in ("terminated", "complete")
    view = cli.wait_for(
        lambda v: v["status"] == "waiting" and len(v["steps"]) == 2,
        *("instances", "describe", "waiter", "w-ctl"),
    )
    assert [s["name"] for s in view["steps"]] == ["load user", "approval"]


def test_tenants(cli) -> None:
    assert cli("trigger", "sleeper", "--id", "s-count").returncode == 0
    listed = cli.json("tenants")
    by_name = {t["tenant"]: t for t in listed}
    assert set(by_name) == {"waiter", "sleeper", "failer"}
    assert by_name["sleeper"]["sandbox"] in ("warm", "cold")
    assert sum(by_name["sleeper"]["instances"].values()) >= 1
    text = cli("tenants")
    assert text.returncode == 0
    assert text.stdout.splitlines()[0].split() == ["TENANT", "VERSION", "SANDBOX", "INSTANCES"]
    row = next(line for line in text.stdout.splitlines() if line.startswith("sleeper "))
    version = by_name["sleeper"]["code_version"]
    assert row.split()[1] == version[:12] and len(row.split()[1]) == 12


def test_errors_are_one_line_with_the_code(cli, server) -> None:
    result = cli("instances", "describe", "waiter", "no-such-instance")
    assert result.returncode == 1
    assert result.stderr.startswith("error: instance.not_found: ")
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    result = cli("send-event", "waiter", "no-such-instance", "--type", "approval")
    assert result.returncode == 1 and "instance.not_found" in result.stderr
    result = cli("instances", "describe", "waiter", "no-such-instance", "--follow")
    assert result.returncode == 1 and "instance.not_found" in result.stderr
    result = cli("trigger", "nobody")
    assert result.returncode == 1 and result.stderr.startswith("error: tenant.not_found: ")
    assert cli("trigger", "waiter", "--id", "dup").returncode == 0
    result = cli("trigger", "waiter", "--id", "dup")
    assert result.returncode == 1 and "instance.already_exists" in result.stderr
    with pytest.raises(ApiError) as caught:
        Client(server.url).call("GET", "/v1/tenants/waiter/instances/nope")
    assert caught.value.status == 404 and caught.value.code == "instance.not_found"


def test_serve_on_a_port_in_use_fails_in_one_line(cli, server, tmp_path: Path) -> None:
    port = server.url.rsplit(":", 1)[1]
    args = ("--tenants", str(server.tenants), "--db", f"sqlite:///{tmp_path}/other.db")
    result = cli("serve", *args, "--port", port)
    assert result.returncode == 1
    assert f"error: cannot serve on 127.0.0.1:{port}: " in result.stderr
    assert "Traceback" not in result.stderr


def test_graceful_stop_and_resume_on_the_same_database(
    start_server, cli_for, stop_tenants: Path, tmp_path: Path
) -> None:
    db = tmp_path / "graceful.db"
    first = start_server(stop_tenants, db, "--grace", "60")
    cli = cli_for(first.url)
    assert cli("trigger", "sleeper", "--id", "nap1").returncode == 0
    cli.wait_for(
        lambda v: any(s["name"] == "nap" and s["status"] == "waiting" for s in v["steps"]),
        *("instances", "describe", "sleeper", "nap1"),
    )
    assert cli("trigger", "spinner", "--id", "spin1").returncode == 0
    cli.wait_for(
        lambda v: any(s["name"] == "spin" and s["status"] == "running" for s in v["steps"]),
        *("instances", "describe", "spinner", "spin1"),
    )
    # SIGTERM mid-step: the spin step gets to finish (grace), then the server stops.
    assert first.stop(signal.SIGTERM, timeout=60) == 0, first.errors()[-3000:]
    output = first.output()
    assert "SIGTERM: stopping gracefully" in output
    assert "grace period over" not in output
    assert output.rstrip().endswith("stopped: sandboxes stopped, database closed")

    second = start_server(stop_tenants, db)
    again = cli_for(second.url)
    for tenant, iid, result in [("sleeper", "nap1", "rested"), ("spinner", "spin1", "true")]:
        follower = again.spawn("instances", "describe", tenant, iid, "--follow")
        code, stderr = follower.finish(timeout=60)
        assert code == 0, stderr
        assert follower.lines[-1] == f"complete -> {result}"
    # Nothing ran twice: the spin step finished before the stop, the nap was not redone.
    spun = again.json("instances", "describe", "spinner", "spin1")
    assert [(s["name"], s["status"], s["attempts"]) for s in spun["steps"]] == [
        ("spin", "complete", 1),
        ("after", "complete", 1),
    ]
    napped = again.json("instances", "describe", "sleeper", "nap1")
    assert [(s["name"], s["attempts"]) for s in napped["steps"] if s["type"] == "do"] == [
        ("before", 1),
        ("after", 1),
    ]
    assert second.stop(signal.SIGINT) == 0


def test_admin_token(start_server, cli_for, stop_tenants: Path, tmp_path: Path) -> None:
    secured = start_server(stop_tenants, tmp_path / "token.db", "--admin-token", "s3cret")
    cli = cli_for(secured.url)
    refused = cli("tenants")
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: unauthorized: ")
    assert cli("tenants", "--token", "wrong").returncode == 1
    allowed = cli("tenants", "--token", "s3cret", "--json")
    assert allowed.returncode == 0, allowed.stderr
    assert [t["tenant"] for t in json.loads(allowed.stdout)] == ["sleeper", "spinner"]
    assert "s3cret" not in secured.output() + secured.errors()
