"""A real engine process for the crash-recovery tests: ``engine_proc.py DB_PATH SIDE_PATH``.

It runs ``Engine(open_store(DB_PATH), InProcessRunner(...), clock=WallClock())`` and
serves JSON-lines commands on stdin, one JSON line of answer each on stdout, written
only after the engine call returned (so an answered write is a committed write)::

    {"op": "create", "tenant": "mixed", "id": "i1", "params": {...}}
    {"op": "send_event", "tenant": "mixed", "id": "i1", "type": "a", "payload": {...}}
    {"op": "status", "tenant": "mixed", "id": "i1"}
    {"op": "get", "tenant": "mixed", "id": "i1"}
    {"op": "wait", "tenant": "mixed", "id": "i1", "statuses": ["complete"], "timeout": 20}

Answers are ``{"ok": true, ...}`` or ``{"ok": false, "error": ..., "code": ..., ...}``.
The first line it prints is ``{"ready": true, "pid": ..., "recovered": ...}``, once the
engine has recovered what a crash left running. EOF on stdin stops it cleanly.

Every step callback appends to SIDE_PATH, with ``os.fsync`` before it returns, one of::

    start <instance> <step> <count> <attempt> <pid>    (a blocking step began)
    fail <instance> <step> <count> <attempt> <pid>     (an attempt raised on purpose)
    ran <instance> <step> <count> <attempt> <value>    (the value it returns)

``value`` is ``<step>#<count>@<attempt>:<pid>:<token><<token of the previous result>``:
unique per run, so the test can tell which run's result the journal recorded, and which
result ``run()`` had in hand when it ran the step.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import trio

from runtime import Engine, InProcessRunner, WallClock, open_store
from sandbox.sdk import WorkflowEntrypoint

_PID = os.getpid()
_SIDE_LOCK = threading.Lock()
_SIDE_FD: int | None = None
_GATE_TIMEOUT = 60.0


def side(*fields: object) -> None:
    """Append one line to the side channel and make it durable before going on."""
    assert _SIDE_FD is not None
    line = (" ".join(str(f) for f in fields) + "\n").encode()
    with _SIDE_LOCK:
        os.write(_SIDE_FD, line)
        os.fsync(_SIDE_FD)


def token_of(value: Any) -> str:
    """The random part of a step value (``-`` for anything else)."""
    return value.split(":")[2].split("<")[0] if isinstance(value, str) and ":" in value else "-"


def work(
    iid: str, name: str, prev: Any = None, *, gate: str | None = None, failures: int = 0
) -> Any:
    """A step callback: optionally blocks on ``gate``, fails its first ``failures`` attempts.

    Its value ends with ``<`` and the token of ``prev``, the result of the step before it
    in ``run()``: a result that ``run()`` went past must be a recorded one.
    """

    def callback(ctx: Any) -> str:
        count, attempt = ctx.step.count, ctx.attempt
        if gate is not None:
            side("start", iid, name, count, attempt, _PID)
            deadline = time.monotonic() + _GATE_TIMEOUT
            while not os.path.exists(gate):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gate {gate} never opened")
                time.sleep(0.01)
        if attempt <= failures:
            side("fail", iid, name, count, attempt, _PID)
            raise RuntimeError(f"{name} fails attempt {attempt} on purpose")
        value = f"{name}#{count}@{attempt}:{_PID}:{secrets.token_hex(6)}<{token_of(prev)}"
        side("ran", iid, name, count, attempt, value)
        return value

    return callback


class Mixed(WorkflowEntrypoint):
    """Steps, an optional blocking step, a loop of one name, a parallel, a retrying step,
    an optional sleep, optional event streams, a last step.

    Params: ``gate`` (path: add step ``block`` that waits for it), ``loops`` (int),
    ``retry_delay`` (seconds between the failed first attempt of ``retry`` and the
    second), ``sleep`` (seconds), ``events`` (event types: for each, wait for events
    until one has ``"last": true``, with a step ``got-<type>`` after each), ``think``
    (see ``wait``), ``linger`` (seconds of cleanup whenever run() unwinds).
    The output is ``{"steps": {"<name>#<count>": result}, "events": {type: [seq, ...]}}``.
    """

    def run(self, event: Any, step: Any) -> Any:
        try:
            return self.body(event, step)
        except BaseException:
            # Slow cleanup while run() unwinds (a suspension too): the instance is still
            # ``running`` although its sleep, wait or retry is already recorded.
            time.sleep((event.payload or {}).get("linger", 0))
            raise

    def body(self, event: Any, step: Any) -> Any:
        p = event.payload or {}
        iid = event.instance_id
        steps: dict[str, Any] = {}
        counts: dict[str, int] = {}

        def key(name: str) -> str:
            counts[name] = counts.get(name, 0) + 1
            return f"{name}#{counts[name]}"

        prev: list[Any] = [None]

        def do(name: str, **kwargs: Any) -> None:
            retries = kwargs.pop("retries", None)
            k = key(name)
            steps[k] = prev[0] = step.do(name, work(iid, name, prev[0], **kwargs), retries=retries)

        do("first")
        if p.get("gate"):
            do("block", gate=p["gate"])
        for _ in range(p.get("loops", 3)):
            do("loop")
        branches = ["p1", "p2", "p3"]
        results = step.parallel({n: work(iid, n, prev[0]) for n in branches})
        for n in branches:
            steps[key(n)] = prev[0] = results[n]
        do(
            "retry",
            failures=1,
            retries={"limit": 3, "delay": p.get("retry_delay", 0), "backoff": "constant"},
        )
        if p.get("sleep") is not None:
            step.sleep("nap", p["sleep"])
        events: dict[str, list[int]] = {}
        for event_type in p.get("events") or []:
            seqs = events[event_type] = []
            while True:
                got = wait(step, f"wait-{event_type}", event_type, p)
                seqs.append(got["payload"]["seq"])
                do(f"got-{event_type}")
                if got["payload"].get("last"):
                    break
        do("last")
        return {"steps": steps, "events": events}


def wait(step: Any, name: str, event_type: str, p: dict[str, Any]) -> Any:
    """``step.wait_for_event`` after ``think`` seconds of plain work (so that every replay
    takes that long to reach the wait)."""
    time.sleep(p.get("think", 0))
    return step.wait_for_event(name, type=event_type, timeout="10 minutes")


WORKFLOWS = {"mixed": Mixed}


def _step_json(s: Any) -> dict[str, Any]:
    return {
        "seq": s.seq,
        "name": s.name,
        "count": s.count,
        "kind": s.kind.value,
        "status": s.status.value,
        "attempts": s.attempts,
        "output": s.output,
        "started_at": s.started_at,
        "ended_at": s.ended_at,
        "wake_at": s.wake_at,
    }


async def handle(engine: Engine, cmd: dict[str, Any]) -> dict[str, Any]:
    op = cmd.get("op")
    tenant, iid = cmd.get("tenant", "mixed"), cmd.get("id")
    if op == "create":
        iid, status = await engine.create(tenant, instance_id=iid, params=cmd.get("params"))
        return {"id": iid, "status": status.value}
    if op == "send_event":
        await engine.send_event(tenant, iid, cmd["type"], cmd.get("payload"))
        return {}
    if op == "status":
        return {"status": (await engine.status(tenant, iid)).value}
    if op == "get":
        view = await engine.get(tenant, iid)
        return {
            "status": view.record.status.value,
            "output": view.record.output,
            "error": None if view.record.error is None else view.record.error.message,
            "steps": [_step_json(s) for s in view.steps],
        }
    if op == "wait":
        with trio.fail_after(float(cmd.get("timeout", 20))):
            status = await engine.wait_for_status(tenant, iid, cmd["statuses"])
        return {"status": status.value}
    if op == "counts":
        return {"counts": await engine.count_by_status(None)}
    raise ValueError(f"unknown op {op!r}")


def answer(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def serve(engine: Engine) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(0))
    buffer = b""
    while True:
        chunk = await stdin.receive_some(65536)
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if not line.strip():
                continue
            cmd = json.loads(line)
            try:
                reply = {"ok": True, **await handle(engine, cmd)}
            except Exception as exc:
                reply = {
                    "ok": False,
                    "error": type(exc).__name__,
                    "code": getattr(exc, "code", None),
                    "message": str(exc),
                }
            answer({"op": cmd.get("op"), "id": cmd.get("id"), **reply})


async def main(db_path: str, side_path: str) -> None:
    global _SIDE_FD
    _SIDE_FD = os.open(side_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    store = open_store(db_path)
    engine = Engine(store, InProcessRunner(WORKFLOWS), clock=WallClock())
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            answer({"ready": True, "pid": _PID, "recovered": engine.recovered})
            await serve(engine)
            nursery.cancel_scope.cancel()
    finally:
        store.close()


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2])
