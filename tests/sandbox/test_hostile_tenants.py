"""Hostile tenants against the real engine, real sandboxes and a real SQLite file.

Every case deploys a hostile tenant next to a well-behaved one and runs both at once.
It then asserts the safe outcome the SPEC promises (sections 3, 6 and 7):

(a) the hostile instance ends with one specific, clear result;
(b) the good tenant's instance completes with the right output;
(c) the supervisor is still healthy: the zygote lives, one more good instance completes,
    and a calm instance of the hostile tenant itself still runs (its sandbox is not
    left poisoned);
(d) nothing persisted is lost: the step the hostile instance recorded before its
    attack is still in its journal, and replay hands back the recorded value.

The cases:

- ``HOSTILE``: a table of tenants (escapes, resource exhaustion, floods), run by
  ``test_hostile_tenant``. An attack is tried inside a step (``in_step``), in ``run()``
  between steps (``in_run``) or at module level, where the load fails (``at_load``).
- ``test_a_sandbox_that_breaks_the_protocol_*``: fake sandboxes (a real dummy process
  for the pidfd, and a socket this test controls) that write garbage, oversized or
  ill-shaped frames, close the channel or never answer.
- cross-tenant reads (``env.WORKFLOWS`` and, past RestrictedPython, the OS layers:
  ``hostile_child.py``), timeouts that ``except BaseException`` cannot swallow, and
  stalls and crash loops that the supervisor itself must survive.

Waits are bounded and stay well under 10 s per test (see
``test_a_long_step_leaves_the_supervisor_its_zygote`` for why that matters).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import psutil
import pytest
import trio

from runtime import InstanceStatus
from runtime._engine import InstanceView
from sandbox import _host
from sandbox._framing import TrioFrames
from sandbox._host import SandboxSettings, SandboxState, _Spawned
from sandbox.protocol import (
    CHILD_FRAME_LIMIT,
    HOST_FRAME_LIMIT,
    Activate,
    LoadCode,
    Ready,
    Reply,
    ReplyKind,
    StepFinished,
    StepStarted,
    decode,
    encode,
)

# The fixtures' module (tests/sandbox/conftest.py) is loaded by pytest; only its type is
# needed here, for annotations.
SandboxEnv = Any

FINISHED = ("complete", "errored", "terminated")
#: How long a case may take to reach its outcome. Every correct outcome arrives in well
#: under a second or two; the bound only turns a hang into a failure that says why.
FINISH_WITHIN = 8.0
#: Cases run with cpu_seconds=1 fail as soon as their sandbox has used this much CPU.
CPU_CAP = 2.5
#: Cases that can only hang if they go wrong (no CPU use to watch) give up after this.
HANG_WITHIN = 4.0
#: A crash loop is declared after this many sandbox deaths during one wait.
CRASH_LOOP = 5
#: The supervisor may grow by this much while a case runs (a 100 MB print flood must not
#: end up in its memory).
SUPERVISOR_GROWTH_LIMIT = 128 * 1024 * 1024

GOOD = """
from tenantflow import WorkflowEntrypoint


class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
        a = step.do("one", lambda: event.payload["n"] + 1)
        b = step.do("two", lambda: a * 2)
        c = step.do("three", lambda: [a, b, "done"])
        return {"result": c}
"""
GOOD_PARAMS = {"n": 20}
GOOD_OUTPUT = {"result": [21, 42, "done"]}

HOSTILE_LIMITS = SandboxSettings(memory_mb=256, cpu_seconds=10)
CPU_LIMITS = SandboxSettings(memory_mb=256, cpu_seconds=1)
MEMORY_ERROR = "SandboxLimitError: memory limit 256 MiB exceeded"
CPU_ERROR = "SandboxLimitError: cpu limit 1 s exceeded"
RECURSION_ERROR = "SandboxLimitError: recursion limit exceeded"
CRASHED = "SandboxCrashedError: the sandbox exited"


# ---------------------------------------------------------------------------
# hostile tenant sources


# A calm instance (params "calm") of each hostile tenant prints 1 KB and runs a one-branch
# step.parallel: it fails if the attack left the tenant's sandbox without its print
# allowance, its threads or its memory.
_CALM = """\
        if event.payload == "calm":
            print("calm " + "." * 995)
            return step.parallel({"calm": lambda: "calm"})
"""

_STEP_TEMPLATE = """\
from tenantflow import WorkflowEntrypoint, StepError, InstanceNotFoundError, log
{prelude}

def attack(env):
{body}


class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
{calm}\
        first = step.do("first", lambda: "kept")
        try:
            result = step.do("attack", lambda: attack(self.env), retries={{"limit": 0}})
        except StepError as err:
            return [first, err.name + ": " + err.message]
        return [first, result]
"""

_RUN_TEMPLATE = """\
from tenantflow import WorkflowEntrypoint, StepError, log
{prelude}

class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
{calm}\
        first = step.do("first", lambda: "kept")
{body}
        return [first, "survived"]
"""

_LOAD_TEMPLATE = """\
from tenantflow import WorkflowEntrypoint
{body}


class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
        return "loaded"
"""


def in_step(body: str, prelude: str = "") -> str:
    """``body`` is the step callback ``attack(env)``, run after step "first" recorded."""
    return _STEP_TEMPLATE.format(
        prelude=prelude, body=textwrap.indent(textwrap.dedent(body), " " * 4), calm=_CALM
    )


def in_run(body: str, prelude: str = "") -> str:
    """``body`` runs in ``run()`` itself, outside any step, after step "first" recorded."""
    return _RUN_TEMPLATE.format(
        prelude=prelude, body=textwrap.indent(textwrap.dedent(body), " " * 8), calm=_CALM
    )


def at_load(body: str) -> str:
    """``body`` is module-level code starting on line 2 of main.py."""
    return _LOAD_TEMPLATE.format(body=textwrap.dedent(body).strip("\n"))


# ---------------------------------------------------------------------------
# expected outcomes


@dataclass(frozen=True)
class Prefix:
    text: str

    def __call__(self, value: object) -> bool:
        return isinstance(value, str) and value.startswith(self.text)


@dataclass(frozen=True)
class OneOf:
    values: tuple[object, ...]

    def __call__(self, value: object) -> bool:
        return value in self.values


@dataclass(frozen=True)
class Satisfies:
    description: str
    predicate: Callable[[Any], bool]

    def __call__(self, value: object) -> bool:
        return self.predicate(value)

    def __repr__(self) -> str:
        return self.description


Expected = object  # an exact value, or one of the matchers above


def _matches(expected: Expected, actual: object) -> bool:
    if isinstance(expected, Prefix | OneOf | Satisfies):
        return expected(actual)
    return expected == actual


@dataclass(frozen=True)
class StepGives:
    """The attack ran in step "attack": ``run()`` returned ``["kept", X]``, X being the
    step's value or the ``"<name>: <message>"`` of its StepError."""

    result: Expected


@dataclass(frozen=True)
class RunGives:
    """``run()`` (attacking outside any step) completed with exactly this output."""

    output: Expected


@dataclass(frozen=True)
class RunFails:
    """``run()`` raised outside any step: the instance errored with this error."""

    name: Expected
    message: Expected


@dataclass(frozen=True)
class LoadFails:
    """main.py failed to load: the instance errored with a TenantLoadError whose message
    holds every fragment (file:line for compile-time refusals), and ran no step."""

    fragments: tuple[str, ...]


@dataclass(frozen=True)
class ViewSatisfies:
    """Whatever the instance ended with passes ``predicate(view)``."""

    description: str
    predicate: Callable[[InstanceView], bool]


Outcome = StepGives | RunGives | RunFails | LoadFails | ViewSatisfies


@dataclass(frozen=True)
class Hostile:
    name: str
    source: str
    outcome: Outcome
    limits: SandboxSettings = HOSTILE_LIMITS
    within: float = FINISH_WITHIN
    cpu_cap: float | None = None
    max_steps: int | None = None
    check: Callable[[SandboxEnv, str], Awaitable[None]] | None = None


def _error_text(view: InstanceView) -> str:
    error = view.record.error
    return "" if error is None else f"{error.name}: {error.message}"


def check_outcome(outcome: Outcome, view: InstanceView) -> None:
    record, steps = view.record, view.steps
    summary = (
        f"status={record.status.value} output={record.output!r:.300} "
        f"error={_error_text(view)[:300]!r} "
        f"steps={[(s.name, s.status.value, s.attempts) for s in steps][:6]}"
    )
    if isinstance(outcome, LoadFails):
        assert record.status is InstanceStatus.ERRORED, summary
        assert record.error is not None and record.error.name == "TenantLoadError", summary
        for fragment in outcome.fragments:
            assert fragment in record.error.message, summary
        assert steps == (), summary
        return
    if isinstance(outcome, ViewSatisfies):
        assert outcome.predicate(view), f"expected {outcome.description}; got {summary}"
        return
    # (d) the step recorded before the attack survived it, whatever the attack did
    assert steps, summary
    assert (steps[0].name, steps[0].status.value, steps[0].output) == (
        "first",
        "complete",
        "kept",
    ), summary
    if isinstance(outcome, StepGives):
        assert record.status is InstanceStatus.COMPLETE, summary
        assert isinstance(record.output, list) and len(record.output) == 2, summary
        assert record.output[0] == "kept", summary
        assert _matches(outcome.result, record.output[1]), (
            f"expected the attack step to give {outcome.result!r}; got {summary}"
        )
        attack = steps[1]
        assert attack.name == "attack", summary
        if attack.status.value == "errored":
            assert attack.error is not None, summary
            assert str(record.output[1]).startswith(attack.error.name + ":"), summary
    elif isinstance(outcome, RunGives):
        assert record.status is InstanceStatus.COMPLETE, summary
        assert _matches(outcome.output, record.output), f"expected {outcome.output!r}; {summary}"
    else:
        assert record.status is InstanceStatus.ERRORED, summary
        assert record.error is not None, summary
        assert _matches(outcome.name, record.error.name), summary
        assert _matches(outcome.message, record.error.message), (
            f"expected the message {outcome.message!r}; got {summary}"
        )


# ---------------------------------------------------------------------------
# extra checks of some cases


async def _all_logs(env: SandboxEnv, tenant: str, iid: str) -> list[Any]:
    lines: list[Any] = []
    while True:
        page = await env.engine.read_logs(tenant, iid, after_id=lines[-1].id if lines else 0)
        if not page:
            return lines
        lines.extend(page)


async def _print_flood_was_capped(env: SandboxEnv, iid: str) -> None:
    lines = await _all_logs(env, "hostile", iid)
    assert len(lines) == 1048, len(lines)
    assert sum(len(line.message) for line in lines) <= 1024 * 1024


async def _giant_log_line_was_cut(env: SandboxEnv, iid: str) -> None:
    [line] = await _all_logs(env, "hostile", iid)
    assert line.message.startswith("LLLL")
    assert len(line.message) <= 8 * 1024 + 32


async def _log_flood_was_capped(env: SandboxEnv, iid: str) -> None:
    lines = await _all_logs(env, "hostile", iid)
    assert 1 <= len(lines) <= 10_000
    assert lines[-1].level == "warning" and "log limit" in lines[-1].message


async def _steps_stopped_at_the_limit(env: SandboxEnv, iid: str) -> None:
    view = await env.engine.get("hostile", iid)
    assert len(view.steps) == 500
    assert all(s.status.value == "complete" for s in view.steps)


async def _no_threads_left_behind(env: SandboxEnv, iid: str) -> None:
    """Whatever became of the bomb, its branches must not outlive the instance: threads
    left blocked in the sandbox keep their stacks, and RLIMIT_AS counts them."""
    [sandbox] = [s for s in env.runner.live() if s.key[0] == "hostile"] or [None]
    if sandbox is None:
        return  # the sandbox was replaced: nothing of the attack is left
    process = psutil.Process(sandbox.pid)
    with trio.move_on_after(1.0):
        while process.num_threads() > 4:
            await trio.sleep(0.05)
    assert process.num_threads() <= 4, (
        f"{process.num_threads()} threads of the ended instance are left in the tenant's "
        f"sandbox, which reserves {process.memory_info().vms >> 20} MiB of its 256 MiB"
    )


# ---------------------------------------------------------------------------
# the table


def _each_refused(statements: list[str]) -> str:
    """A step body running each statement in turn, collecting each ImportError's text."""
    lines = ["out = []"]
    for statement in statements:
        lines += [
            "try:",
            f"    {statement}",
            f'    out.append("ran: {statement}")',
            "except ImportError as err:",
            "    out.append(str(err))",
        ]
    return in_step("\n".join([*lines, "return out"]))


FORBIDDEN_IMPORTS = {
    "os": "system",
    "sys": "modules",
    "subprocess": "Popen",
    "socket": "socket",
    "ctypes": "CDLL",
    "importlib": "import_module",
    "pickle": "loads",
    "marshal": "loads",
    "io": "open",
    "shutil": "rmtree",
    "pathlib": "Path",
    "threading": "Thread",
    "multiprocessing": "Process",
    "signal": "SIGKILL",
}
NOT_ALLOWED = [f"module {name!r} is not allowed in tenant code" for name in FORBIDDEN_IMPORTS]


ALLOWED_MODULE_ATTRIBUTES = in_step(
    """
    import collections, datetime, functools, json, random, re, string, uuid
    tries = [
        lambda: json.decoder,
        lambda: getattr(re, "sre_compile"),
        lambda: datetime.sys,
        lambda: collections.abc,
        lambda: getattr(uuid, "_" + "uuid"),
        lambda: getattr(getattr(random.Random, "seed"), "_" + "_globals__"),
        lambda: functools.wraps,
        lambda: string.Template,
    ]
    out = []
    for attempt in tries:
        try:
            out.append("reached " + repr(attempt()))
        except (AttributeError, ImportError, TypeError) as err:
            out.append(str(err))
    return out
    """
)

NESTED_MAPS = """
it = [1]
for i in range(300000):
    it = map(abs, it)
"""


def _bounded_value_error(value: object) -> bool:
    return isinstance(value, str) and value.startswith("ValueError: eee") and len(value) < 65536


HOSTILE: list[Hostile] = [
    # -- escapes refused when main.py compiles (the load fails, naming file:line) ----------
    Hostile(
        "subclasses-walk",
        at_load("x = ().__class__.__base__.__subclasses__()"),
        LoadFails(("main.py:2:", "is an invalid attribute name because it starts with")),
    ),
    Hostile(
        "fstring-dunder",
        at_load('x = f"{().__class__}"'),
        LoadFails(('main.py:2: "__class__" is an invalid attribute name',)),
    ),
    Hostile(
        "generator-frame-walk",
        at_load("def g():\n    yield 1\n\nx = g().gi_frame.f_back.f_globals"),
        LoadFails(("main.py:5:", '"f_globals" is a restricted name', "(and 2 more)")),
    ),
    Hostile(
        "traceback-frame-walk",
        at_load(
            "try:\n    1 / 0\nexcept ZeroDivisionError as exc:\n"
            "    frame = exc.__traceback__.tb_frame"
        ),
        LoadFails(("main.py:5:", '"tb_frame" is a restricted name', "(and 1 more)")),
    ),
    Hostile(
        "dunder-builtins",
        at_load("b = __builtins__"),
        LoadFails(('main.py:2: "__builtins__" is an invalid variable name',)),
    ),
    Hostile(
        "builtins-name",
        at_load("b = builtins"),
        LoadFails(('main.py:2: "builtins" is a reserved name',)),
    ),
    Hostile(
        "dunder-import",
        at_load('os = __import__("os")'),
        LoadFails(('main.py:2: "__import__" is an invalid variable name',)),
    ),
    Hostile(
        "exec", at_load('exec("import os")'), LoadFails(("main.py:2: Exec calls are not allowed",))
    ),
    Hostile("eval", at_load('eval("1")'), LoadFails(("main.py:2: Eval calls are not allowed",))),
    Hostile(
        "except-star",
        at_load("try:\n    pass\nexcept* ValueError:\n    pass"),
        LoadFails(("main.py:2: TryStar statements are not allowed",)),
    ),
    Hostile(
        "compiler-bomb",
        at_load("x = " + "-" * 100_000 + "1"),
        LoadFails(("main.py: code is nested too deeply to compile",)),
    ),
    # -- escapes that module-level code tries at run time (the load fails) -----------------
    Hostile(
        "import-os-at-load",
        at_load("import os"),
        LoadFails(("main.py raised ImportError: module 'os' is not allowed in tenant code",)),
    ),
    Hostile(
        "from-subprocess-at-load",
        at_load("from subprocess import Popen"),
        LoadFails(("ImportError: module 'subprocess' is not allowed in tenant code",)),
    ),
    Hostile(
        "formatter-at-load",
        at_load("from string import Formatter"),
        LoadFails(("main.py raised ImportError: cannot import name 'Formatter'",)),
    ),
    Hostile(
        "open-at-load",
        at_load('secret = open("/etc/passwd").read()'),
        LoadFails(("main.py raised NameError: name 'open' is not defined",)),
    ),
    Hostile(
        "runtime-dunder-at-load",
        at_load('x = getattr((), "_" + "_class__")'),
        LoadFails(('main.py raised AttributeError: "__class__" is an invalid attribute name',)),
    ),
    Hostile(
        "memory-at-load",
        at_load('hoard = "x" * (1024 * 1024 * 1024)'),
        LoadFails(("main.py raised MemoryError",)),
    ),
    Hostile(
        "recursion-at-load",
        at_load("def f(n):\n    return f(n + 1)\n\nf(0)"),
        LoadFails(("main.py raised RecursionError",)),
    ),
    Hostile(
        "cpu-at-load",
        at_load("while True:\n    pass"),
        ViewSatisfies(
            "the load to fail on the 1 s CPU limit (module-level code runs under no CPU "
            "budget: only a step's start arms one, and the load's only bound is a 30 s "
            "wall-clock timeout, after which the instance crash-loops)",
            lambda view: (
                view.record.status is InstanceStatus.ERRORED and "cpu limit" in _error_text(view)
            ),
        ),
        limits=CPU_LIMITS,
        cpu_cap=CPU_CAP,
    ),
    # -- escapes tried inside a step at run time ---------------------------------------------
    Hostile(
        "runtime-built-dunder",
        in_step('return getattr((), "_" + "_class__")'),
        StepGives(
            'AttributeError: "__class__" is an invalid attribute name because it starts with "_"'
        ),
    ),
    Hostile(
        "str-subclass-attribute-name",
        in_step(
            'return getattr((), Name("__class__"))',
            prelude="class Name(str):\n    def startswith(self, prefix):\n        return False\n",
        ),
        StepGives("TypeError: attribute name must be a str"),
    ),
    Hostile(
        "builtin-self-is-the-builtins-module",
        in_step('return repr(getattr(len, "_" + "_self__"))'),
        StepGives(
            'AttributeError: "__self__" is an invalid attribute name because it starts with "_"'
        ),
    ),
    Hostile(
        "type-builtin",
        in_step("return repr(type(1))"),
        StepGives("NameError: name 'type' is not defined"),
    ),
    Hostile(
        "vars-builtin",
        in_step("return repr(vars())"),
        StepGives("NameError: name 'vars' is not defined"),
    ),
    Hostile(
        "globals-builtin",
        in_step("return repr(globals())"),
        StepGives("NameError: name 'globals' is not defined"),
    ),
    Hostile(
        "generator-frame-at-runtime",
        in_step('g = (i for i in [1])\nreturn repr(getattr(g, "gi_" + "frame"))'),
        StepGives('AttributeError: "gi_frame" is a restricted name in tenant code'),
    ),
    Hostile(
        "str-format-walk",
        in_step('return "{0.__class__.__mro__}".format(1)'),
        StepGives(
            "NotImplementedError: format() walks attributes unguarded and is not allowed in "
            "tenant code; use an f-string"
        ),
    ),
    Hostile(
        "str-format-map-walk",
        in_step('return "{x.__class__}".format_map({"x": 1})'),
        StepGives(
            "NotImplementedError: format_map() walks attributes unguarded and is not allowed "
            "in tenant code; use an f-string"
        ),
    ),
    Hostile(
        "unbound-str-format",
        in_step('return str.format("{0.__class__}", 1)'),
        StepGives(
            "NotImplementedError: format() walks attributes unguarded and is not allowed in "
            "tenant code; use an f-string"
        ),
    ),
    Hostile(
        "string-formatter",
        in_step('import string\nreturn string.Formatter().format("{0.__class__}", 1)'),
        StepGives("AttributeError: module 'string' has no attribute 'Formatter'"),
    ),
    Hostile(
        "open-etc-passwd",
        in_step('return open("/etc/passwd").read()'),
        StepGives("NameError: name 'open' is not defined"),
    ),
    Hostile(
        "compile-builtin",
        in_step('return repr(compile("1", "x", "eval"))'),
        StepGives("NameError: name 'compile' is not defined"),
    ),
    Hostile(
        "relative-import",
        in_step("from . import main\nreturn 1"),
        StepGives(
            "ImportError: relative imports are not allowed in tenant code; import sibling "
            "modules by name"
        ),
    ),
    Hostile(
        "forbidden-modules-imported",
        _each_refused([f"import {module}" for module in FORBIDDEN_IMPORTS]),
        StepGives(NOT_ALLOWED),
    ),
    Hostile(
        "forbidden-modules-from-imported",
        _each_refused([f"from {m} import {name}" for m, name in FORBIDDEN_IMPORTS.items()]),
        StepGives(NOT_ALLOWED),
    ),
    Hostile(
        "from-os-import-system",
        in_step('from os import system\nreturn system("id")'),
        StepGives("ImportError: module 'os' is not allowed in tenant code"),
    ),
    Hostile(
        "dotted-import-json-decoder",
        in_step("import json.decoder\nreturn 1"),
        StepGives("ImportError: module 'json.decoder' is not allowed in tenant code"),
    ),
    Hostile(
        "from-json-import-decoder",
        in_step("from json import decoder\nreturn repr(decoder)"),
        StepGives(Prefix("ImportError: cannot import name 'decoder'")),
    ),
    Hostile(
        "allowed-modules-attributes",
        ALLOWED_MODULE_ATTRIBUTES,
        StepGives(
            [
                "module 'json' has no attribute 'decoder'",
                "module 're' has no attribute 'sre_compile'",
                "module 'datetime' has no attribute 'sys'",
                "module 'collections' has no attribute 'abc'",
                '"_uuid" is an invalid attribute name because it starts with "_"',
                '"__globals__" is an invalid attribute name because it starts with "_"',
                "module 'functools' has no attribute 'wraps'",
                "module 'string' has no attribute 'Template'",
            ]
        ),
    ),
    # -- memory --------------------------------------------------------------------------------
    Hostile(
        "memory-1-gib",
        in_step('return len("x" * (1024 * 1024 * 1024))'),
        StepGives(MEMORY_ERROR),
    ),
    Hostile(
        "memory-doubling-list",
        in_step('data = ["x"]\nwhile True:\n    data = data + data'),
        StepGives(MEMORY_ERROR),
    ),
    Hostile(
        "memory-giant-join",
        in_step('return len("".join(["y" * 1048576 for i in range(2048)]))'),
        StepGives(MEMORY_ERROR),
    ),
    Hostile(
        "memory-outside-a-step",
        in_run('hoard = "m" * (1024 * 1024 * 1024)'),
        RunFails("SandboxLimitError", "memory limit 256 MiB exceeded"),
    ),
    Hostile(
        "memory-hoarded-to-the-last-byte",
        in_step(
            """
            for size in [1048576, 65536, 4096, 256, 16, 1]:
                try:
                    while True:
                        HOARD.append("h" * size + str(len(HOARD)))
                except MemoryError:
                    pass
            return len(HOARD)
            """,
            prelude="HOARD = []\n",
        ),
        StepGives(
            Satisfies(
                "the hoard's size, or a SandboxLimitError/SandboxCrashedError (today the "
                "step's thread dies of MemoryError while reporting it, and the step hangs "
                "until its timeout)",
                lambda value: (
                    isinstance(value, int)
                    or (
                        isinstance(value, str)
                        and value.startswith(("SandboxLimitError", "Sandbox"))
                    )
                ),
            )
        ),
        within=HANG_WITHIN,
    ),
    # -- CPU -------------------------------------------------------------------------------------
    Hostile(
        "cpu-busy-loop",
        in_step("n = 0\nwhile True:\n    n = n + 1"),
        StepGives(CPU_ERROR),
        limits=CPU_LIMITS,
        cpu_cap=CPU_CAP,
    ),
    Hostile(
        "cpu-huge-pow",
        in_step("return 10 ** 10 ** 8 > 1"),
        StepGives(CPU_ERROR),
        limits=CPU_LIMITS,
        cpu_cap=CPU_CAP,
    ),
    Hostile(
        "cpu-catastrophic-regex",
        in_step('import re\nreturn repr(re.match("(a+)+$", "a" * 40 + "b"))'),
        StepGives(CPU_ERROR),
        limits=CPU_LIMITS,
        cpu_cap=CPU_CAP,
    ),
    Hostile(
        "cpu-outside-a-step",
        in_run("n = 0\nwhile True:\n    n = n + 1"),
        RunFails("SandboxLimitError", "cpu limit 1 s exceeded"),
        limits=CPU_LIMITS,
        cpu_cap=CPU_CAP,
    ),
    # -- recursion -----------------------------------------------------------------------------
    Hostile(
        "recursion",
        in_step("return recurse(0)", prelude="def recurse(n):\n    return recurse(n + 1)\n"),
        StepGives(RECURSION_ERROR),
    ),
    Hostile(
        "recursion-in-c-json",
        in_step("import json\nx = []\nfor i in range(100000):\n    x = [x]\nreturn json.dumps(x)"),
        StepGives(RECURSION_ERROR),
    ),
    Hostile(
        "c-stack-overflow-in-a-step",
        in_step(NESTED_MAPS + "return list(it)"),
        # CPython 3.11 does not bound this C recursion: the sandbox's 2 MiB thread stack
        # overflows and the process dies of SIGSEGV. Only the sandbox may die.
        StepGives(OneOf((RECURSION_ERROR, CRASHED))),
    ),
    Hostile(
        "recursion-outside-a-step",
        in_run("recurse(0)", prelude="def recurse(n):\n    return recurse(n + 1)\n"),
        RunFails("SandboxLimitError", "recursion limit exceeded"),
    ),
    Hostile(
        "c-stack-overflow-outside-a-step",
        in_run(NESTED_MAPS + "return [first, list(it)]"),
        RunFails(
            OneOf(("SandboxLimitError", "SandboxCrashedError")),
            Satisfies("a limit or crash message", lambda message: isinstance(message, str)),
        ),
    ),
    # -- giant or unserializable values --------------------------------------------------------
    Hostile(
        "giant-step-result",
        in_step('return "z" * (2 * 1024 * 1024)'),
        StepGives(
            "PayloadTooLargeError: step result is 2097157 bytes, more than the limit of 1048576"
        ),
    ),
    Hostile(
        "set-step-result",
        in_step("return {1, 2}"),
        StepGives(Prefix("SerializationError: step result is not serializable")),
    ),
    Hostile(
        "object-step-result",
        in_step("return Thing()", prelude="class Thing:\n    pass\n"),
        StepGives(Satisfies("a SerializationError naming Thing", lambda v: "'Thing'" in v)),
    ),
    Hostile(
        "giant-workflow-result",
        in_run('return [first, "r" * (2 * 1024 * 1024)]'),
        RunFails("PayloadTooLargeError", Prefix("the workflow's return value is 2097")),
    ),
    Hostile(
        "giant-exception-in-a-step",
        in_step('raise ValueError("e" * (3 * 1024 * 1024))'),
        StepGives(
            Satisfies(
                "the tenant's ValueError with its message cut to a bounded size (today the "
                "child sends a frame over CHILD_FRAME_LIMIT, the host calls it a protocol "
                "violation and kills the sandbox)",
                _bounded_value_error,
            )
        ),
    ),
    Hostile(
        "giant-exception-outside-a-step",
        in_run('raise ValueError("e" * (3 * 1024 * 1024))'),
        RunFails(
            "ValueError",
            Satisfies(
                "a message cut to a bounded size (today the oversized WorkflowFinished "
                "frame kills the sandbox between steps and the instance crash-loops)",
                lambda message: isinstance(message, str) and len(message) < 65536,
            ),
        ),
    ),
    # -- output and RPC floods ---------------------------------------------------------------
    Hostile(
        "print-100-mb",
        in_step(
            """
            refused = 0
            chunk = "q" * 999
            for i in range(100000):
                try:
                    print(chunk)
                except Exception:
                    refused = refused + 1
            return refused
            """
        ),
        StepGives(100_000 - 1048),
        check=_print_flood_was_capped,
    ),
    Hostile(
        "log-line-of-50-mb",
        in_step('log.info("L" * (50 * 1024 * 1024))\nreturn "logged"'),
        StepGives("logged"),
        check=_giant_log_line_was_cut,
    ),
    Hostile(
        "log-flood-100000-lines",
        in_step('for i in range(100000):\n    log.info("line", i)\nreturn i + 1'),
        StepGives(100_000),
        check=_log_flood_was_capped,
    ),
    Hostile(
        "binding-call-flood",
        in_step(
            """
            refused = 0
            for i in range(1000):
                try:
                    env.WORKFLOWS.get("missing-" + str(i))
                except InstanceNotFoundError:
                    refused = refused + 1
            return refused
            """
        ),
        StepGives(1000),
    ),
    Hostile(
        "step-flood-20000",
        in_run(
            """
            done = 1
            refused = 0
            for i in range(20000):
                try:
                    step.do("s", lambda: 1)
                    done = done + 1
                except Exception:
                    refused = refused + 1
            return [first, done, refused]
            """
        ),
        # The default limit (10,000) costs ~10 s of commits here; the engine's own
        # max_steps is lowered to keep the case fast. The limit is the same code path.
        RunGives(["kept", 500, 19501]),
        max_steps=500,
        check=_steps_stopped_at_the_limit,
    ),
    Hostile(
        "thread-bomb-via-parallel",
        in_run(
            """
            branches = {}
            for i in range(2000):
                branches["b" + str(i)] = lambda: 1
            try:
                got = step.parallel(branches, retries={"limit": 0})
            except Exception as err:
                return [first, "refused: " + str(err)]
            return [first, len(got)]
            """
        ),
        # The attack's outcome may be either; what must hold is that no thread of it
        # outlives the instance, and that the tenant's next instance still runs.
        RunGives(
            Satisfies(
                "all 2000 branches, or a refusal",
                lambda output: (
                    output[0] == "kept"
                    and (output[1] == 2000 or str(output[1]).startswith("refused: "))
                ),
            )
        ),
        check=_no_threads_left_behind,
    ),
    Hostile(
        "retry-policy-overflow",
        in_run(
            """
            try:
                step.do("flaky", always_fails,
                        retries={"limit": 1100, "delay": 0, "backoff": "exponential"})
            except StepError as err:
                return [first, err.name + ": " + err.message]
            """,
            prelude="def always_fails(ctx):\n    raise ValueError('attempt ' + str(ctx.attempt))\n",
        ),
        ViewSatisfies(
            "the step to fail after its 1101 attempts (or the policy to be refused) with the "
            "supervisor alive; today attempt 1026 makes RetryPolicy.delay_before compute "
            "float(2 ** 1024), and the OverflowError crashes the engine",
            lambda view: (
                view.record.output == ["kept", "ValueError: attempt 1101"]
                or "InvalidStepError" in _error_text(view)
            ),
        ),
    ),
]


# ---------------------------------------------------------------------------
# fixtures and helpers


def scoped_binding_handler(engine: Any) -> Callable[..., Awaitable[Any]]:
    """``env.WORKFLOWS`` served as the supervisor serves it: its dispatch, the real
    tenant-scoped binding, and the tenant taken from the calling sandbox's channel."""
    from loader._binding import wrap_workflow_binding
    from runtime._supervisor import Supervisor

    class _Bindings:
        def binding(self, tenant_id: str) -> Any:
            metadata = {"tenant_id": tenant_id, "code_version": "v1"}
            return wrap_workflow_binding(metadata, engine=engine)

    bindings = _Bindings()

    async def handle(tenant_id: str, code_version: str, method: str, args: dict[str, Any]) -> Any:
        return await Supervisor.handle_binding_call(
            bindings,  # type: ignore[arg-type]
            tenant_id,
            code_version,
            method,
            args,
        )

    return handle


@pytest.fixture
async def scoped_env(sandbox_env: SandboxEnv) -> SandboxEnv:
    """``sandbox_env`` whose sandboxes get ``env.WORKFLOWS``, as under the supervisor."""
    sandbox_env.runner.binding_handler = scoped_binding_handler(sandbox_env.engine)
    return sandbox_env


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


async def _describe(env: SandboxEnv, tenant: str, iid: str) -> str:
    view = await env.engine.get(tenant, iid)
    logs = await env.engine.read_logs(tenant, iid)
    sandboxes = []
    for sandbox in env.runner.live():
        try:
            cpu = psutil.Process(sandbox.pid).cpu_times()
            usage = f"{cpu.user + cpu.system:.1f} s CPU"
        except psutil.Error:
            usage = "gone"
        sandboxes.append(f"{sandbox.key[0]} pid {sandbox.pid} {sandbox.state.value} {usage}")
    return (
        f"status={view.record.status.value} "
        f"steps={[(s.name, s.status.value, s.attempts) for s in view.steps][:6]} "
        f"logs={[line.message[:160] for line in logs][-3:]} "
        f"sandbox deaths={env.runner.stats.crashes} live sandboxes={sandboxes}"
    )


def _cpu_seconds(pid: int) -> float:
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


async def finish(
    env: SandboxEnv,
    tenant: str,
    iid: str,
    *,
    within: float = FINISH_WITHIN,
    cpu_cap: float | None = None,
) -> InstanceView:
    """Wait for the instance to end; fail saying what it is doing if it does not.

    It fails early if the tenant's sandboxes die more than ``CRASH_LOOP`` times, or if one
    of them has used more than ``cpu_cap`` seconds of CPU (a limit that works acts long
    before: this does not depend on how busy the machine is).
    """
    deaths = env.runner.stats.crashes
    verdict = f"did not end within {within} s"
    async with trio.open_nursery() as nursery:

        async def ended() -> None:
            nonlocal verdict
            await env.engine.wait_for_status(tenant, iid, FINISHED)
            verdict = "ended"
            nursery.cancel_scope.cancel()

        async def runs_away() -> None:
            nonlocal verdict
            while True:
                await trio.sleep(0.05)
                if env.runner.stats.crashes - deaths > CRASH_LOOP:
                    verdict = "crash-loops instead of ending"
                    break
                used = max(
                    (_cpu_seconds(s.pid) for s in env.runner.live() if s.key[0] == tenant),
                    default=0.0,
                )
                if cpu_cap is not None and used > cpu_cap:
                    limit = env.settings.get(tenant, SandboxSettings()).cpu_seconds
                    verdict = (
                        f"runs on: its sandbox used {used:.1f} s of CPU under a limit of "
                        f"{limit} s per step attempt"
                    )
                    break
            nursery.cancel_scope.cancel()

        nursery.start_soon(ended)
        nursery.start_soon(runs_away)
        await trio.sleep(within)
        nursery.cancel_scope.cancel()
    if verdict == "ended":
        view: InstanceView = await env.engine.get(tenant, iid)
        return view
    what = await _describe(env, tenant, iid)
    # Stop the stuck sandbox now rather than through a 2 s grace period at teardown.
    for sandbox in env.runner.live():
        if sandbox.key[0] == tenant and sandbox.state is SandboxState.READY:
            sandbox.kill("the test gave up on it")
    raise AssertionError(f"{tenant}/{iid} {verdict}: {what}")


async def assert_good_completed(env: SandboxEnv, iid: str) -> None:
    view = await finish(env, "good", iid)
    assert view.record.status is InstanceStatus.COMPLETE, view.record.error
    assert view.record.output == GOOD_OUTPUT
    assert [s.name for s in view.steps] == ["one", "two", "three"]


async def assert_supervisor_healthy(env: SandboxEnv, *, calm_tenant: str | None) -> None:
    """(c): the zygote lives and new instances complete, the hostile tenant's included."""
    returncode = env.runner.zygote._process.returncode
    assert returncode is None, f"the zygote died (status {returncode})"
    iid, _ = await env.engine.create("good", params={"n": 1}, code_version="v1")
    view = await finish(env, "good", iid)
    assert view.record.output == {"result": [2, 4, "done"]}, _error_text(view)
    if calm_tenant is not None:
        iid, _ = await env.engine.create(calm_tenant, params="calm", code_version="v1")
        view = await finish(env, calm_tenant, iid)
        assert view.record.output == {"calm": "calm"}, (
            f"the hostile tenant's next, calm instance failed: {_error_text(view)!r} "
            "(its sandbox was left poisoned by the attack)"
        )


# ---------------------------------------------------------------------------
# the table's test


@pytest.mark.parametrize("case", HOSTILE, ids=lambda case: case.name)
async def test_hostile_tenant(scoped_env: SandboxEnv, case: Hostile) -> None:
    env = scoped_env
    env.settings["hostile"] = case.limits
    env.deploy("hostile", case.source)
    env.deploy("good", GOOD)
    if case.max_steps is not None:
        env.engine.max_steps = case.max_steps
    rss_before = _rss()
    hostile, _ = await env.engine.create("hostile", code_version="v1")
    good, _ = await env.engine.create("good", params=GOOD_PARAMS, code_version="v1")
    try:
        view = await finish(env, "hostile", hostile, within=case.within, cpu_cap=case.cpu_cap)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; expected {case.outcome}") from None
    check_outcome(case.outcome, view)
    if case.check is not None:
        await case.check(env, hostile)
    await assert_good_completed(env, good)
    loads = not isinstance(case.outcome, LoadFails) and case.name != "cpu-at-load"
    await assert_supervisor_healthy(env, calm_tenant="hostile" if loads else None)
    growth = _rss() - rss_before
    assert growth < SUPERVISOR_GROWTH_LIMIT, f"the supervisor grew by {growth >> 20} MiB"


def test_the_table_is_large_enough() -> None:
    names = [case.name for case in HOSTILE]
    assert len(names) == len(set(names))
    assert len(names) >= 40


# ---------------------------------------------------------------------------
# protocol abuse: fake sandboxes at the host boundary

SLEEP = shutil.which("sleep") or "/bin/sleep"

MIMIC = """
from tenantflow import WorkflowEntrypoint


class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
        first = step.do("first", lambda: "from-real")
        second = step.do("second", lambda: "second-from-real", retries={"limit": 2, "delay": 0})
        return [first, second]
"""


class FakePeer:
    """The far end of a fake sandbox's channel, played by the test."""

    def __init__(self, pid: int, stream: trio.SocketStream) -> None:
        self.pid = pid
        self.stream = stream
        self.frames = TrioFrames(stream, HOST_FRAME_LIMIT)

    async def receive(self) -> Any:
        return decode(await self.frames.receive())

    async def send(self, message: Any) -> None:
        await self.frames.send(encode(message))

    async def start(self) -> Activate:
        """Load like a sandbox, and return the activation the host sends next."""
        assert isinstance(await self.receive(), LoadCode)
        await self.send(Ready())
        activate = await self.receive()
        assert isinstance(activate, Activate)
        return activate

    async def honest_step(self, act: Activate, seq: int, name: str, output: Any) -> None:
        """Run step ``name`` as the executor would, and wait until the host recorded it."""
        aid = act.activation_id
        await self.send(StepStarted(aid, seq, name, 1, 1, None, 600.0))
        await self.send(StepFinished(aid, seq, name, 1, 1, True, output))
        reply = await self.receive()
        assert isinstance(reply, Reply) and reply.kind is ReplyKind.VALUE, reply


Script = Callable[[FakePeer], Awaitable[None]]


@dataclass
class FakeSandboxes:
    """Gives chosen tenants a scripted fake sandbox instead of a forked one.

    A fake sandbox is a real process (``sleep``, so that the host's pidfd and SIGKILL are
    real) and a socket pair whose far end a script plays. Each spawn of a tenant takes
    the next script; when none is left the real zygote spawns a real sandbox.
    """

    nursery: trio.Nursery
    real_spawn: Callable[..., Awaitable[Any]]
    scripts: dict[str, list[Script]] = field(default_factory=dict)
    pids: list[int] = field(default_factory=list)

    async def spawn(self, tenant_id: str, settings: SandboxSettings) -> Any:
        queue = self.scripts.get(tenant_id)
        if not queue:
            return await self.real_spawn(tenant_id, settings)
        script = queue.pop(0)
        pid = _start_dummy()
        self.pids.append(pid)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        peer = FakePeer(pid, trio.SocketStream(trio.socket.from_stdlib_socket(theirs)))
        self.nursery.start_soon(self._play, script, peer)
        return _Spawned(pid, os.pidfd_open(pid)), ours

    async def _play(self, script: Script, peer: FakePeer) -> None:
        try:
            await script(peer)
            await trio.sleep_forever()  # keep our end open: only the host ends it
        except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError):
            pass  # the host hung up on us, as it should
        finally:
            with trio.CancelScope(shield=True):
                await peer.stream.aclose()


def _start_dummy() -> int:
    """A real process for a fake sandbox (posix_spawn: fast, and no thread involved)."""
    return os.posix_spawn(SLEEP, [SLEEP, "600"], {})


def _reap(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)


def killed_by(pid: int) -> int | None:
    """The signal that ended process ``pid`` (not reaped yet), None while it runs."""
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    if info is None:
        return None
    assert info.si_code == os.CLD_KILLED, info
    return info.si_status


@asynccontextmanager
async def fake_sandboxes(env: SandboxEnv) -> AsyncIterator[FakeSandboxes]:
    zygote = env.runner.zygote
    async with trio.open_nursery() as nursery:
        fakes = FakeSandboxes(nursery, zygote.spawn)
        zygote.spawn = fakes.spawn
        try:
            yield fakes
        finally:
            zygote.spawn = fakes.real_spawn
            nursery.cancel_scope.cancel()
    _reap(fakes.pids)


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def _tag(example: Any) -> int:
    tag: int = msgpack.unpackb(encode(example))[0]
    return tag


def _wrong_types(act: Activate) -> bytes:
    tag = _tag(StepFinished(0, 1, "x", 1, 1, True))
    return frame(msgpack.packb([tag, act.activation_id, "two", "second", 1, 1, True, None, None]))


#: (name, the bytes a fake sandbox sends after its first step, whether it then closes the
#: channel, what the host must call it)
GARBAGE: list[tuple[str, Callable[[Activate], bytes], bool, str]] = [
    ("not-msgpack", lambda act: frame(b"\xc1" * 16), False, "protocol violation: malformed frame"),
    (
        "not-a-list",
        lambda act: frame(msgpack.packb({"op": "spawn"})),
        False,
        "protocol violation: a frame must be a list starting with a message tag",
    ),
    (
        "unknown-message-type",
        lambda act: frame(msgpack.packb([250, act.activation_id])),
        False,
        "protocol violation: unknown message type 250",
    ),
    (
        "wrong-shape",
        lambda act: frame(msgpack.packb([_tag(StepStarted(0, 1, "x", 1, 1, None, 1.0)), 1])),
        False,
        "protocol violation: malformed StepStarted",
    ),
    ("wrong-field-types", _wrong_types, False, "protocol violation: expected an integer"),
    (
        "host-only-message",
        lambda act: frame(encode(Reply(act.activation_id, 1, ReplyKind.VALUE))),
        False,
        "protocol violation: the child may not send Reply",
    ),
    (
        "frame-just-over-the-limit",
        lambda act: struct.pack(">I", CHILD_FRAME_LIMIT + 1) + b"x" * 4096,
        False,
        f"protocol violation: frame of {CHILD_FRAME_LIMIT + 1} bytes exceeds the limit",
    ),
    (
        "frame-of-4-gib",
        lambda act: b"\xff\xff\xff\xff",
        False,
        f"protocol violation: frame of {2**32 - 1} bytes exceeds the limit",
    ),
    ("truncated-frame", lambda act: struct.pack(">I", 100) + b"x" * 10, True, "exited"),
    ("channel-closed", lambda act: b"", True, "exited"),
]


async def _wait_for(predicate: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    with trio.move_on_after(within):
        while not await predicate():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"gave up waiting for {what}")


async def _assert_mimic_recovered(
    env: SandboxEnv, iid: str, reason: str | None, *, first: str = "from-fake", attempts: int = 1
) -> None:
    view = await finish(env, "mimic", iid)
    assert view.record.status is InstanceStatus.COMPLETE, _error_text(view)
    # (d) the step the fake sandbox recorded before its abuse is what replay returned
    assert view.record.output == [first, "second-from-real"]
    assert [(s.name, s.attempts) for s in view.steps] == [("first", 1), ("second", attempts)]
    if reason is not None:  # what the engine logged when the activation failed
        messages = [line.message for line in await env.engine.read_logs("mimic", iid)]
        assert any(reason in message for message in messages), messages


@pytest.mark.parametrize(
    ("payload", "close", "reason"),
    [case[1:] for case in GARBAGE],
    ids=[case[0] for case in GARBAGE],
)
async def test_a_sandbox_that_breaks_the_protocol_is_killed(
    scoped_env: SandboxEnv, payload: Callable[[Activate], bytes], close: bool, reason: str
) -> None:
    env = scoped_env
    env.deploy("mimic", MIMIC)
    env.deploy("good", GOOD)

    async def abuse(peer: FakePeer) -> None:
        act = await peer.start()
        await peer.honest_step(act, 1, "first", "from-fake")
        await peer.stream.send_all(payload(act))
        if close:
            await peer.stream.aclose()

    async with fake_sandboxes(env) as fakes:
        fakes.scripts["mimic"] = [abuse]
        iid, _ = await env.engine.create("mimic", code_version="v1")
        good, _ = await env.engine.create("good", params=GOOD_PARAMS, code_version="v1")
        await _assert_mimic_recovered(env, iid, f"activation failed (the sandbox {reason}")
        [pid] = fakes.pids
        assert killed_by(pid) == signal.SIGKILL  # the host killed the fake sandbox
        await assert_good_completed(env, good)
        await assert_supervisor_healthy(env, calm_tenant=None)


async def test_a_sandbox_that_breaks_the_protocol_mid_step_fails_that_attempt(
    scoped_env: SandboxEnv,
) -> None:
    env = scoped_env
    env.deploy("mimic", MIMIC)
    env.deploy("good", GOOD)

    async def abuse(peer: FakePeer) -> None:
        act = await peer.start()
        await peer.honest_step(act, 1, "first", "from-fake")
        retries = {"limit": 2, "delay": 0.0, "backoff": "exponential"}
        await peer.send(StepStarted(act.activation_id, 2, "second", 1, 1, retries, 600.0))
        await peer.stream.send_all(frame(b"\xc1"))

    async with fake_sandboxes(env) as fakes:
        fakes.scripts["mimic"] = [abuse]
        iid, _ = await env.engine.create("mimic", code_version="v1")
        good, _ = await env.engine.create("good", params=GOOD_PARAMS, code_version="v1")
        # the attempt in flight failed with the crash and was retried per its policy
        await _assert_mimic_recovered(env, iid, None, attempts=2)
        assert killed_by(fakes.pids[0]) == signal.SIGKILL
        await assert_good_completed(env, good)


async def _loads_then(peer: FakePeer, then: Callable[[FakePeer], Awaitable[None]]) -> None:
    assert isinstance(await peer.receive(), LoadCode)
    await then(peer)


async def _never_ready(peer: FakePeer) -> None:
    async def hang(peer: FakePeer) -> None:
        await trio.sleep_forever()

    await _loads_then(peer, hang)


async def _garbage_for_ready(peer: FakePeer) -> None:
    await _loads_then(peer, lambda peer: peer.stream.send_all(frame(b"\xc1\xc1")))


async def _step_for_ready(peer: FakePeer) -> None:
    started = StepStarted(1, 1, "first", 1, 1, None, 600.0)
    await _loads_then(peer, lambda peer: peer.send(started))


async def _dies_before_ready(peer: FakePeer) -> None:
    async def die(peer: FakePeer) -> None:
        os.kill(peer.pid, signal.SIGKILL)  # as an OOM kill or a segfault while loading would

    await _loads_then(peer, die)


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        (_never_ready, "failed to start"),
        (_garbage_for_ready, "failed to start: malformed frame"),
        (_step_for_ready, "something else than Ready"),
        (_dies_before_ready, "failed to start"),
    ],
    ids=["never-ready", "garbage-for-ready", "step-for-ready", "dies-before-ready"],
)
async def test_a_sandbox_that_does_not_start_properly_is_killed(
    scoped_env: SandboxEnv, monkeypatch: pytest.MonkeyPatch, script: Script, reason: str
) -> None:
    env = scoped_env
    monkeypatch.setattr(_host, "_LOAD_TIMEOUT_SECONDS", 0.5)
    env.deploy("mimic", MIMIC)
    env.deploy("good", GOOD)
    async with fake_sandboxes(env) as fakes:
        fakes.scripts["mimic"] = [script]
        iid, _ = await env.engine.create("mimic", code_version="v1")
        good, _ = await env.engine.create("good", params=GOOD_PARAMS, code_version="v1")
        # the instance is not lost: it starts again on a real sandbox
        await _assert_mimic_recovered(env, iid, reason, first="from-real")
        assert killed_by(fakes.pids[0]) == signal.SIGKILL
        await assert_good_completed(env, good)
        await assert_supervisor_healthy(env, calm_tenant=None)


async def test_a_sandbox_that_never_answers_an_activation_is_given_up(
    manual_sandbox_env: SandboxEnv,
) -> None:
    env = manual_sandbox_env
    env.deploy("mimic", MIMIC)
    env.deploy("good", GOOD)

    async def silent(peer: FakePeer) -> None:
        act = await peer.start()
        await peer.honest_step(act, 1, "first", "from-fake")
        # ... and never another word: no step, no result, no exit

    async with fake_sandboxes(env) as fakes:
        fakes.scripts["mimic"] = [silent]
        iid, _ = await env.engine.create("mimic", code_version="v1")

        async def first_recorded() -> bool:
            return len((await env.engine.get("mimic", iid)).steps) == 1

        await _wait_for(first_recorded, FINISH_WITHIN, "the fake's first step")
        good = await env.run_to_end("good", GOOD_PARAMS)
        await assert_good_completed(env, good)
        # A day passes: far beyond the default step timeout (10 minutes) and any
        # reasonable time for replaying code between steps.
        env.clock.advance(24 * 3600)

        async def fake_killed() -> bool:
            env.clock.advance(60)  # and the crash backoff, whatever it is
            return killed_by(fakes.pids[0]) is not None

        try:
            await _wait_for(fake_killed, 3.0, "the silent sandbox to be killed")
        except AssertionError:
            raise AssertionError(
                "a sandbox that never answers after an Activate holds the instance (and a "
                "concurrency slot) forever: no deadline applies to an activation outside "
                f"its steps; {await _describe(env, 'mimic', iid)}"
            ) from None
        await _assert_mimic_recovered(env, iid, None)


async def test_a_crash_looping_sandbox_never_brings_the_supervisor_down(
    scoped_env: SandboxEnv,
) -> None:
    """An instance whose sandbox dies between steps is retried with a capped backoff;
    after MAX_CRASHES crashes in a row without a step recorded it fails, with the
    supervisor alive (the backoff once overflowed a float after 1,024 crashes)."""
    from runtime._engine import MAX_CRASHES

    env = scoped_env
    env.deploy("mimic", MIMIC)
    env.deploy("good", GOOD)
    crashes = MAX_CRASHES + 3

    async def crash(peer: FakePeer) -> None:
        await peer.start()
        await peer.stream.send_all(frame(b"\xc1"))

    async with fake_sandboxes(env) as fakes:
        fakes.scripts["mimic"] = [crash] * crashes
        iid, _ = await env.engine.create("mimic", code_version="v1")
        view = await finish(env, "mimic", iid)
        assert view.record.status.value == "errored", _error_text(view)
        assert view.record.error is not None
        assert view.record.error.name == "SandboxCrashedError"
        assert f"{MAX_CRASHES} times in a row" in view.record.error.message
        assert len(fakes.pids) == MAX_CRASHES
        # the engine is alive: another tenant runs
        good = await env.run_to_end("good", GOOD_PARAMS)
        await assert_good_completed(env, good)


# ---------------------------------------------------------------------------
# stalls and timeouts


STUBBORN = in_step(
    """
    while True:
        try:
            while True:
                pass
        except BaseException:
            pass
    """
).replace('retries={"limit": 0}', 'retries={"limit": 0}, timeout="30 seconds"')


async def test_except_base_exception_cannot_outlast_the_step_timeout(
    manual_sandbox_env: SandboxEnv,
) -> None:
    env = manual_sandbox_env
    env.settings["hostile"] = SandboxSettings(memory_mb=256, cpu_seconds=30)
    env.deploy("hostile", STUBBORN)
    env.deploy("good", GOOD)
    iid, _ = await env.engine.create("hostile", code_version="v1")

    async def attack_running() -> bool:
        steps = (await env.engine.get("hostile", iid)).steps
        return any(s.name == "attack" and s.status.value == "running" for s in steps)

    await _wait_for(attack_running, FINISH_WITHIN, "the attack step to run")
    [sandbox] = [s for s in env.runner.live() if s.key[0] == "hostile"]
    good = await env.run_to_end("good", GOOD_PARAMS)
    env.clock.advance(31)
    view = await finish(env, "hostile", iid)
    assert view.record.output == ["kept", "StepTimeoutError: step attempt timed out"]
    assert view.steps[0].output == "kept"
    with trio.fail_after(FINISH_WITHIN):
        await sandbox.exited.wait()  # killed from outside: no handler could keep it
    await assert_good_completed(env, good)
    assert env.runner.zygote._process.returncode is None


SPINNER = in_step("n = 0\nwhile True:\n    n = n + 1")


async def test_a_long_step_leaves_the_supervisor_its_zygote(scoped_env: SandboxEnv) -> None:
    """A step may compute for up to its cpu_seconds (30 by default) and the supervisor
    may have nothing else to do meanwhile. Today the zygote dies after 10 idle seconds:
    trio starts it from a worker thread, PR_SET_PDEATHSIG fires when *that thread* exits,
    and trio retires idle worker threads after 10 s. Every sandbox dies with it and the
    next spawn crashes the engine with BrokenPipeError."""
    env = scoped_env
    env.settings["hostile"] = SandboxSettings(memory_mb=256, cpu_seconds=30)
    env.deploy("hostile", SPINNER)
    env.deploy("good", GOOD)
    iid, _ = await env.engine.create("hostile", code_version="v1")

    async def attack_running() -> bool:
        steps = (await env.engine.get("hostile", iid)).steps
        return any(s.name == "attack" for s in steps)

    await _wait_for(attack_running, FINISH_WITHIN, "the long step to start")
    # 11 s within the step's CPU budget, with nothing else to do meanwhile (returncode
    # polls with waitpid(WNOHANG) on this thread: it keeps no worker thread busy)
    for _ in range(550):
        await trio.sleep(0.02)
        returncode = env.runner.zygote._process.returncode
        assert returncode is None, (
            f"the zygote died (status {returncode}) while one tenant ran a long step: "
            "its parent-death signal is bound to the trio worker thread that started it"
        )
    good, _ = await env.engine.create("good", params=GOOD_PARAMS, code_version="v1")
    await assert_good_completed(env, good)
    await env.engine.terminate("hostile", iid)


# ---------------------------------------------------------------------------
# reading another tenant's data


SNOOP = """
from tenantflow import WorkflowEntrypoint, InstanceNotFoundError, StepError


def reach(env, target):
    try:
        handle = env.WORKFLOWS.get(target)
    except InstanceNotFoundError as err:
        return str(err).replace(target, "<id>")
    return "reached: " + handle.status()


def rebind(env, own, victim):
    handle = env.WORKFLOWS.get(own)
    out = []
    try:
        handle.id = victim
        out.append("rebound")
    except TypeError as err:
        out.append(str(err))
    try:
        setattr(handle, "id", victim)
        out.append("rebound")
    except TypeError as err:
        out.append(str(err))
    out.append(handle.status())
    return out


def same_id(env, victim):
    return env.WORKFLOWS.create(id=victim, params="decoy").id


def read_database(path):
    return open(path, "rb").read()


class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
        if event.payload == "decoy" or not isinstance(event.payload, dict):
            return "decoy"
        env = self.env
        victim = event.payload["victim"]
        out = {}
        out["victim"] = step.do("victim", lambda: reach(env, victim))
        out["missing"] = step.do("missing", lambda: reach(env, "no-such-instance"))
        out["rebind"] = step.do(
            "rebind", lambda: rebind(env, event.instance_id, victim)
        )
        out["same id"] = step.do("same id", lambda: same_id(env, victim))
        try:
            step.do("database", lambda: read_database(event.payload["db"]),
                    retries={"limit": 0})
        except StepError as err:
            out["database"] = err.name + ": " + err.message
        return out
"""


async def test_a_tenant_cannot_reach_another_tenants_instances(
    scoped_env: SandboxEnv, tmp_path: Path
) -> None:
    env = scoped_env
    env.deploy("good", GOOD)
    env.deploy("snoop", SNOOP)
    victim = await env.run_to_end("good", GOOD_PARAMS)
    before = await env.engine.get("good", victim)
    db = str(tmp_path / "engine.db")  # where the fixture keeps the engine's database
    iid = await env.run_to_end("snoop", {"victim": victim, "db": db})
    view = await env.engine.get("snoop", iid)
    assert view.record.status is InstanceStatus.COMPLETE, _error_text(view)
    out = view.record.output
    # another tenant's instance is exactly an instance that does not exist
    assert out["victim"] == out["missing"] == "instance '<id>' not found for tenant 'snoop'"
    refused = "cannot assign attribute 'id' on a 'InstanceStub' object"
    assert [item.startswith(refused) for item in out["rebind"][:2]] == [True, True], out
    assert out["rebind"][2] == "running", out  # the handle still names its own instance
    # the same id names a new instance of the tenant's own, not the victim
    assert out["same id"] == victim
    assert (await env.engine.get("snoop", victim)).record.tenant_id == "snoop"
    assert out["database"] == "NameError: name 'open' is not defined"
    # the victim is untouched
    after = await env.engine.get("good", victim)
    assert (after.record.status, after.record.output) == (
        before.record.status,
        before.record.output,
    )
    assert after.steps == before.steps
    page, _ = await env.engine.list_instances("good")
    assert [summary.instance_id for summary in page] == [victim]


HELPER = Path(__file__).with_name("hostile_child.py")


@pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox layers drop to a tenant uid as root")
async def test_past_restrictedpython_the_os_layers_deny_other_tenants_data(
    scoped_env: SandboxEnv, tmp_path: Path
) -> None:
    """If tenant code ever reached ``open`` or ``os``, the layers around its process stop
    it reading the engine's database or reaching another tenant's sandbox."""
    env = scoped_env
    env.deploy("good", GOOD)
    good = await env.run_to_end("good", GOOD_PARAMS)
    await assert_good_completed(env, good)
    [victim] = env.runner.live()  # the good tenant's sandbox, idle and alive
    db = str(tmp_path / "engine.db")
    targets = {
        "files": [db, f"/proc/{victim.pid}/environ", f"/proc/{victim.pid}/mem"],
        "dirs": [str(tmp_path)],
        "pids": [victim.pid, os.getpid(), env.runner.zygote.pid],
    }
    with trio.fail_after(30):
        done = await trio.run_process(
            [sys.executable, str(HELPER), "snoop", json.dumps(targets)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    report = json.loads(done.stdout)
    assert report["missing"] == {}, report
    assert report["control"][f"read {db}"] == "allowed", report  # the file is readable...
    sandboxed = report["sandboxed"]
    assert sandboxed is not None, report
    allowed = [attempt for attempt, outcome in sandboxed.items() if outcome == "allowed"]
    assert allowed == [], report  # ...but not from a sandbox
    assert env.runner.zygote._process.returncode is None
    assert victim.state is SandboxState.READY  # the victim's sandbox was not disturbed
