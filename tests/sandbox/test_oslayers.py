"""Each OS layer of sandbox/_oslayers.py against an attack that only it stops.

Every attack runs in ``oslayers_attacks.py``: a fresh interpreter forks a child, the child
applies *only* the layer under test (``layers=``) and attacks, and reports over a pipe.
Where it is cheap and harmless the same attack also runs with no layer, to prove that
the layer -- not the host -- is what stops it. The pytest process itself never unshares,
drops privileges or loads a filter.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from sandbox._oslayers import IsolationConfig, Layer, prepare_seccomp, tenant_ids

HELPER = Path(__file__).with_name("oslayers_attacks.py")
# The order apply_isolation applies (and reports) the layers in.
APPLY_ORDER = [
    "close_fds",
    "scrub_env",
    "netns",
    "rlimits",
    "uid",
    "pdeathsig",
    "no_new_privs",
    "filesystem",
    "seccomp",
]

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux isolation layers")


@dataclass
class Attack:
    """What the helper saw: the isolation report, the attack's outcome, the exit."""

    result: dict[str, Any]

    @property
    def report(self) -> dict[str, Any]:
        lines: list[dict[str, Any]] = self.result["lines"]
        assert lines, self.result
        return lines[0]

    @property
    def outcome(self) -> dict[str, Any]:
        for line in self.result["lines"]:
            if "outcome" in line:
                outcome: dict[str, Any] = line["outcome"]
                return outcome
        raise AssertionError(f"the child reported no outcome: {self.result}")

    @property
    def killed_by(self) -> int | None:
        signal_number: int | None = self.result["exit"]["signal"]
        return signal_number


def attack(scenario: str, layers: list[str] | str, **params: Any) -> Attack:
    """Run one scenario of the helper with ``layers`` applied in the child."""
    if os.geteuid() != 0:
        # The scenarios switch uids, chroot and make setuid files, as only the root
        # sandbox host can; the unprivileged case is test_unprivileged_host_reports_...
        pytest.skip("the attack scenarios need root, like the sandbox host")
    env = {**os.environ, **params.pop("env", {})}
    proc = subprocess.run(
        [sys.executable, str(HELPER), scenario, json.dumps({"layers": layers, **params})],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    result = json.loads(proc.stdout)
    assert result["leftover_children"] is False, "the helper left an unreaped process"
    return Attack(result)


def assert_applied(found: Attack, *layers: str) -> None:
    assert found.report == {"applied": list(layers), "missing": []}


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    """No test leaves a descriptor open or a child process behind in pytest's process."""
    me = psutil.Process()
    fds_before = set(os.listdir("/proc/self/fd"))
    children_before = {child.pid for child in me.children(recursive=True)}
    yield
    assert set(os.listdir("/proc/self/fd")) <= fds_before
    assert {child.pid for child in me.children(recursive=True)} <= children_before


# ----------------------------------------------------------------------- public API


def test_layer_values_are_snake_case_names() -> None:
    assert [layer.value for layer in Layer] == [
        "rlimits",
        "close_fds",
        "scrub_env",
        "no_new_privs",
        "pdeathsig",
        "uid",
        "netns",
        "filesystem",
        "seccomp",
    ]
    assert IsolationConfig().layers == frozenset(Layer)


def test_tenant_ids_are_stable_unprivileged_and_distinct() -> None:
    ids = {tenant: tenant_ids(tenant) for tenant in ("acme", "globex", "initech", "")}
    assert ids["acme"] == tenant_ids("acme")
    for uid, gid in ids.values():
        assert uid == gid
        assert 2_000_000 <= uid < 2**31 - 1
    assert len({uid for uid, _ in ids.values()}) == len(ids)


def test_config_refuses_to_run_tenants_as_root() -> None:
    with pytest.raises(ValueError, match="uid/gid 0"):
        IsolationConfig(uid=0)
    with pytest.raises(ValueError, match="positive"):
        IsolationConfig(open_files=0)


def test_prepare_seccomp_builds_without_loading() -> None:
    def filters() -> str:
        status = Path("/proc/self/status").read_text().splitlines()
        return next(line for line in status if line.startswith("Seccomp_filters:"))

    before = filters()
    assert prepare_seccomp() is not None
    assert filters() == before, "building the filter must not load it"


# ------------------------------------------------------------------------- RLIMITS


def test_rlimits_refuse_1gib_under_256mib_and_the_process_survives() -> None:
    found = attack("memory", ["rlimits"])
    assert_applied(found, "rlimits")
    assert found.outcome == {"map_1gib": "ENOMEM", "alloc_1gib": "MemoryError", "after": "ok"}
    # Without the limit, reserving the same gigabyte works (touching it would be slow).
    assert attack("memory", [], allocate=False).outcome == {"map_1gib": "ok"}


def test_rlimits_kill_a_busy_loop_past_the_cpu_limit() -> None:
    found = attack("cpu", ["rlimits"])
    assert_applied(found, "rlimits")
    # SIGXCPU at the soft limit; SIGKILL at the hard one if SIGXCPU were ignored.
    assert found.killed_by in (signal.SIGXCPU, signal.SIGKILL)


def test_rlimits_cap_open_files() -> None:
    found = attack("open_files", ["rlimits"])
    assert found.outcome["error"] == "EMFILE"
    assert found.outcome["opened"] < 16
    assert attack("open_files", []).outcome == {"opened": 100, "error": "ok"}


def test_rlimits_forbid_writing_files() -> None:
    assert attack("write_file", ["rlimits"]).outcome == {"write": "EFBIG"}
    assert attack("write_file", []).outcome == {"write": "ok"}


def test_rlimits_cap_threads_of_the_tenant_uid() -> None:
    found = attack("thread_bomb", ["rlimits", "uid"])
    assert_applied(found, "rlimits", "uid")
    assert found.outcome["started"] < 8  # processes=8 counts the process itself
    assert "can't start new thread" in found.outcome["error"]


# ----------------------------------------------------------------------- CLOSE_FDS


def test_close_fds_hides_descriptors_the_parent_had_open() -> None:
    found = attack("inherited_fd", ["close_fds"])
    assert_applied(found, "close_fds")
    assert found.outcome == {"read": "EBADF", "stdin": "/dev/null"}
    assert attack("inherited_fd", []).outcome["read"] == "ok"


# ----------------------------------------------------------------------- SCRUB_ENV

SECRET = "tf-secret-9f4c2e"


def test_scrub_env_leaves_no_secret_in_environ_getenv_proc_or_memory() -> None:
    found = attack("environment", ["scrub_env"], secret=SECRET, env={"TF_SECRET": SECRET})
    assert_applied(found, "scrub_env")
    assert found.outcome == {
        "os_environ": [],
        "getenv": [None, None],
        "proc_environ_has_secret": False,
        "memory_has_secret": [False, False],  # exec-time block and glibc's setenv copy
    }
    leaky = attack("environment", [], secret=SECRET, env={"TF_SECRET": SECRET}).outcome
    assert "TF_SECRET" in leaky["os_environ"]
    assert None not in leaky["getenv"]
    assert leaky["proc_environ_has_secret"] is True
    assert leaky["memory_has_secret"] == [True, True]


# -------------------------------------------------------------------- NO_NEW_PRIVS


def test_no_new_privs_defeats_a_setuid_binary() -> None:
    found = attack("setuid_binary", ["no_new_privs"])
    assert_applied(found, "no_new_privs")
    assert found.outcome["NoNewPrivs"] == "1"
    assert found.result["raw"] == "60001", "id -u must not run with the file owner's euid"
    escalated = attack("setuid_binary", [])
    assert escalated.outcome["NoNewPrivs"] == "0"
    assert escalated.result["raw"] == "0", "without the layer the setuid bit gives root"


def test_no_new_privs_makes_the_process_undumpable() -> None:
    assert attack("dumpable", ["no_new_privs"]).outcome == {"dumpable": 0}
    assert attack("dumpable", []).outcome == {"dumpable": 1}


# ----------------------------------------------------------------------- PDEATHSIG


@pytest.mark.parametrize("layers", [["pdeathsig"], APPLY_ORDER], ids=["alone", "all-layers"])
def test_pdeathsig_kills_the_sandbox_when_its_parent_dies(layers: list[str]) -> None:
    # With every layer the uid drop happens too, which clears the parent-death signal
    # in the kernel: this proves it is armed after the drop.
    found = attack("parent_death", layers)
    assert found.report == {"applied": layers, "missing": []}
    assert found.result["middle"]["signal"] == signal.SIGKILL
    assert found.killed_by == signal.SIGKILL
    assert len(found.result["lines"]) == 1, "the sandbox must not answer after its parent died"


def test_without_pdeathsig_the_sandbox_outlives_its_parent() -> None:
    found = attack("parent_death", [])
    assert found.outcome == {"alive": True, "ppid": found.result["helper"]}
    assert found.result["exit"] == {"code": 0, "signal": None}


def test_pdeathsig_kills_a_child_whose_parent_died_before_it_was_armed() -> None:
    found = attack("orphaned_before_arming", ["pdeathsig"])
    assert found.killed_by == signal.SIGKILL
    assert found.result["lines"] == []


# ----------------------------------------------------------------------------- UID


def test_uid_stops_signalling_another_tenant_and_reading_root_files() -> None:
    found = attack("other_tenant", ["uid"])
    assert_applied(found, "uid")
    uid, gid = tenant_ids("acme")
    assert found.outcome == {
        "kill_other_tenant": "EPERM",
        "list_root": "EACCES",
        "read_shadow": "EACCES",
        "regain_root": "EPERM",
        "ids": [uid, uid, gid, []],
    }
    privileged = attack("other_tenant", []).outcome
    assert privileged["kill_other_tenant"] == "ok"
    assert privileged["read_shadow"] == "ok"


# --------------------------------------------------------------------------- NETNS


def test_netns_cuts_the_sandbox_off_the_host_loopback() -> None:
    found = attack("network", ["netns"])
    assert_applied(found, "netns")
    assert found.outcome == {"connect": "ENETUNREACH", "interfaces": ["lo"]}
    assert attack("network", []).outcome["connect"] == "ok"


# ---------------------------------------------------------------------- FILESYSTEM


def test_filesystem_allows_only_reading_readable_paths() -> None:
    found = attack("filesystem", ["filesystem"])
    assert_applied(found, "filesystem")
    assert found.outcome == {
        "read_passwd": "EACCES",
        "write_tmp": "EACCES",
        "read_allowed": "tenant code",
        "list_allowed": ["allowed.txt"],
        "write_allowed": "EACCES",
        "tcp_connect": "EACCES",
        "abstract_unix": "EPERM",
        "signal_parent": "EPERM",
    }
    open_host = attack("filesystem", []).outcome
    assert {open_host[key] for key in open_host if key not in ("read_allowed", "list_allowed")} == {
        "ok"
    }


# ------------------------------------------------------------------------- SECCOMP


def test_seccomp_denies_process_network_and_privileged_calls_but_not_threads() -> None:
    found = attack("syscalls", ["seccomp"])
    assert_applied(found, "seccomp")
    assert found.outcome == {
        "socket": "EPERM",
        "fork": "EPERM",
        "kill_parent": "EPERM",
        "open_for_write": "EPERM",
        "read_open": "ok",  # which paths are readable is FILESYSTEM's decision
        "exec_mapping": "EPERM",
        "thread": "ok",
        "cpu_budget": "ok",  # the sandbox sets a CPU budget per step attempt
        "raise_nofile": "ValueError",  # how Python's setrlimit() reports EPERM
        "execve": "EPERM",
        "ptrace": "EPERM",
        "mount": "EPERM",
        "unshare": "EPERM",
        "setuid": "EPERM",
        "clone3": "ENOSYS",  # so that glibc falls back to clone, whose flags are checked
        "clone_process": "EPERM",
    }
    unfiltered = attack("syscalls", []).outcome
    assert set(unfiltered.values()) == {"ok"}


# ---------------------------------------------------------------------- all layers


def test_all_layers_together_run_a_real_sandbox_workload() -> None:
    found = attack("workload", "all")
    assert found.report == {"applied": APPLY_ORDER, "missing": []}
    assert found.result["reply"] == {"id": 7, "echo": ["hello", 1, 2.5, None]}
    assert found.outcome == {
        "threads": 8,
        "restricted": [[], {"total": 6}],
        "alloc_100mib": 100 * 2**20,
        "traceback": "KeyError: 'missing'",
        "attacks": {
            "read_passwd": "EACCES",
            "socket": "EPERM",
            "fork": "EPERM",
            "kill_parent": "EPERM",
            "execve": "EPERM",
            "env": [],
        },
    }
    assert found.result["exit"] == {"code": 0, "signal": None}


# ------------------------------------------------------------ refused, not skipped


def test_unprivileged_host_reports_missing_layers_instead_of_raising() -> None:
    # An unprivileged user inside a chroot: the kernel refuses it user namespaces, so
    # neither a network namespace nor a uid switch is possible; the rest still applies.
    layers = ["netns", "uid", "rlimits", "pdeathsig", "no_new_privs", "filesystem", "seccomp"]
    found = attack("not_root", layers)
    assert found.report["applied"] == [
        "rlimits",
        "pdeathsig",
        "no_new_privs",
        "filesystem",
        "seccomp",
    ]
    missing = dict(found.report["missing"])
    assert set(missing) == {"netns", "uid"}
    assert "CLONE_NEWUSER|CLONE_NEWNET): Operation not permitted" in missing["netns"]
    assert "Operation not permitted" in missing["uid"]
    assert found.outcome == {"still_running": True, "uid": 60001}


def test_host_without_landlock_or_libseccomp_reports_missing_layers() -> None:
    found = attack("host_without_features", ["filesystem", "uid", "seccomp"])
    assert found.report["applied"] == []
    assert dict(found.report["missing"]) == {
        "uid": "no per-tenant uid configured (uid=None)",
        "filesystem": "kernel has no Landlock (Function not implemented)",
        "seccomp": "libseccomp unavailable: [Errno 2] libseccomp.so.2: "
        "cannot open shared object file",
    }
    assert found.outcome == {"still_running": True}


def test_old_landlock_abi_is_applied_and_reported_as_partial() -> None:
    found = attack("old_landlock", ["filesystem"])
    assert found.report["applied"] == ["filesystem"]
    assert found.report["missing"] == [
        [
            "filesystem",
            "Landlock ABI 3 cannot enforce: TCP bind/connect, signal and abstract-unix scoping",
        ]
    ]
    assert found.outcome == {"read_passwd": "EACCES", "signal_parent": "ok"}


def test_an_unexpected_error_raises_and_tenant_code_never_runs() -> None:
    found = attack("unexpected_error", ["netns"])
    assert found.result["lines"][0]["error"] == "EFAULT"
    assert "reached_tenant_code" not in json.dumps(found.result["lines"])
    assert found.result["exit"] == {"code": 1, "signal": None}


def test_a_multithreaded_process_is_refused() -> None:
    found = attack("threaded", ["rlimits"])
    assert found.result["lines"][0]["error"] == "RuntimeError"
    assert found.result["exit"] == {"code": 1, "signal": None}
