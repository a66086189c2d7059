"""Crash recovery with real processes: SIGKILL the engine anywhere, restart, carry on.

Each test starts ``tests/helpers/engine_proc.py`` (a real engine on a real SQLite file,
wall-clock time), kills it with SIGKILL (from outside, or from inside at a named crash
point, ``TENANTFLOW_CRASH_AT``), restarts it on the same file and checks that:

* every instance completes;
* every step result recorded before a kill is the one used after it (journal and
  final output), and no recorded step ran again after the kill (side channel);
* the recorded result of every step is the value of the last run of its callback;
* acknowledged writes (creates, events) survived the kill.

The side channel (one fsync'ed line per callback run, see the helper) tells exactly
which callbacks ran in which process lifetime; the journal is read straight from the
SQLite file (a copy of it, taken while no engine runs).
"""

from __future__ import annotations

import json
import os
import queue
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest

HELPER = Path(__file__).resolve().parents[1] / "helpers" / "engine_proc.py"
REPO = Path(__file__).resolve().parents[2]
FINISHED = ["complete", "errored", "terminated"]
START_TIMEOUT = 30.0
CALL_TIMEOUT = 30.0


# ---------------------------------------------------------------------- the engine process


class EngineProc:
    """One engine process: JSON lines in on stdin, JSON lines out on stdout."""

    def __init__(self, db: Path, side: Path, log: Path, crash_at: str | None) -> None:
        env = {k: v for k, v in os.environ.items() if k != "TENANTFLOW_CRASH_AT"}
        if crash_at is not None:
            env["TENANTFLOW_CRASH_AT"] = crash_at
        self.log = log
        with log.open("ab") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, str(HELPER), str(db), str(side)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=REPO,
                env=env,
            )
        self.pid = self.proc.pid
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()
        ready = self.read(START_TIMEOUT)
        assert ready is not None, f"no ready line: {self.stderr()}"
        assert ready.get("ready"), ready
        self.recovered: int = ready["recovered"]

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._replies.put(json.loads(line))
        self._replies.put(None)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, cmd: dict[str, Any]) -> bool:
        """Write one command; False if the process is gone."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return False
        return True

    def read(self, timeout: float = CALL_TIMEOUT) -> dict[str, Any] | None:
        """The next answer, or None once the process has died and its output is drained."""
        try:
            return self._replies.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"engine {self.pid} gave no answer in {timeout}s: {self.stderr()}"
            ) from None

    def call(self, cmd: dict[str, Any], timeout: float = CALL_TIMEOUT) -> dict[str, Any]:
        """Send a command and return its answer; the process must stay alive."""
        assert self.send(cmd), f"engine {self.pid} is gone: {self.stderr()}"
        reply = self.read(timeout)
        assert reply is not None, f"engine {self.pid} died during {cmd}: {self.stderr()}"
        return reply

    def kill(self) -> list[dict[str, Any]]:
        """SIGKILL now; return the answers it wrote before dying (acknowledged writes)."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        return self.wait_dead(10.0, expect_kill=True)

    def wait_dead(self, timeout: float, *, expect_kill: bool = True) -> list[dict[str, Any]]:
        """Wait for the process to end; return the answers not read yet."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"engine {self.pid} still alive after {timeout}s") from None
        self._reader.join(10.0)
        if expect_kill:
            assert code == -signal.SIGKILL, f"exit code {code}: {self.stderr()}"
        replies = []
        while True:
            try:
                reply = self._replies.get_nowait()
            except queue.Empty:
                break
            if reply is not None:
                replies.append(reply)
        return replies

    def stop(self) -> None:
        """Stop cleanly: EOF on stdin."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self.wait_dead(15.0, expect_kill=False)
        assert self.proc.returncode == 0, f"exit code {self.proc.returncode}: {self.stderr()}"

    def close(self) -> None:
        """Never leave a process behind (used in ``finally``)."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        try:
            self.proc.wait(10.0)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            pass
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        self._reader.join(10.0)


# ---------------------------------------------------------------------- observations


@dataclass(frozen=True)
class Run:
    """One line of the side channel."""

    kind: str  # start | fail | ran
    iid: str
    step: str
    count: int
    attempt: int
    tail: str  # the value (ran) or the pid (start, fail)

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.iid, self.step, self.count)


@dataclass(frozen=True)
class Step:
    seq: int
    name: str
    count: int
    kind: str
    status: str
    attempts: int
    output: Any
    started_at: float | None
    ended_at: float | None
    wake_at: float | None


@dataclass
class Instance:
    iid: str
    status: str
    output: Any
    error: str | None
    steps: dict[tuple[str, int], Step]
    buffered: list[tuple[str, Any]]  # (event type, payload) not consumed yet

    def done(self) -> dict[tuple[str, int], Step]:
        """Completed ``step.do`` results: the recorded ones."""
        return {k: s for k, s in self.steps.items() if s.kind == "do" and s.status == "complete"}


@dataclass
class Kill:
    """What the database held when an engine died, and where its side channel ended."""

    db: dict[str, Instance]
    side_offset: int


def _token(value: str) -> str:
    """The random part of a step value ``name#count@attempt:pid:token<previous token``."""
    return value.split(":")[2].partition("<")[0]


def _unpack(blob: bytes | None) -> Any:
    return None if blob is None else msgpack.unpackb(blob, raw=False, strict_map_key=False)


class Harness:
    """One database and side channel, the engine processes run on them, and the kills."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.db = tmp_path / "engine.db"
        self.side = tmp_path / "side.log"
        self.side.touch()
        self.procs: list[EngineProc] = []
        self.kills: list[Kill] = []

    def start(self, crash_at: str | None = None) -> EngineProc:
        assert not any(p.alive() for p in self.procs), "one engine at a time"
        proc = EngineProc(self.db, self.side, self.tmp / f"engine{len(self.procs)}.log", crash_at)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            proc.close()

    # -- the side channel --------------------------------------------------------------

    def side_size(self) -> int:
        return self.side.stat().st_size

    def runs(self, start: int = 0) -> list[Run]:
        with self.side.open("rb") as f:
            f.seek(start)
            data = f.read()
        runs = []
        for line in data.decode().splitlines():
            kind, iid, step, count, attempt, tail = line.split(" ")
            runs.append(Run(kind, iid, step, int(count), int(attempt), tail))
        return runs

    def wait_for_run(
        self, pred: Any, *, start: int = 0, timeout: float = 20.0, what: str = ""
    ) -> Run:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for run in self.runs(start):
                if pred(run):
                    return run
            time.sleep(0.01)
        raise AssertionError(f"no side-channel line {what} within {timeout}s")

    # -- the database ------------------------------------------------------------------

    def read_db(self) -> dict[str, Instance]:
        """Every instance with its journal, read from a copy of the files (no engine runs)."""
        assert not any(p.alive() for p in self.procs), "read the database only when no engine runs"
        copy_dir = self.tmp / f"copy-{uuid.uuid4().hex[:8]}"
        copy_dir.mkdir()
        copy = copy_dir / "engine.db"
        shutil.copyfile(self.db, copy)
        wal = Path(f"{self.db}-wal")
        if wal.exists():
            shutil.copyfile(wal, f"{copy}-wal")
        conn = sqlite3.connect(copy)
        try:
            result: dict[str, Instance] = {}
            keys: dict[int, Instance] = {}
            for key, iid, status, output, error in conn.execute(
                "SELECT key, instance_id, status, output, error_message FROM instances"
            ):
                inst = Instance(iid, status, _unpack(output), error, {}, [])
                result[iid] = keys[key] = inst
            for row in conn.execute(
                "SELECT key, seq, name, count, kind, status, attempts, output, started_at,"
                " ended_at, wake_at FROM steps ORDER BY key, seq"
            ):
                key, seq, name, count, kind, status, attempts, output, started, ended, wake = row
                keys[key].steps[(name, count)] = Step(
                    seq, name, count, kind, status, attempts, _unpack(output), started, ended, wake
                )
            for key, event_type, payload in conn.execute(
                "SELECT key, type, payload FROM events ORDER BY id"
            ):
                keys[key].buffered.append((event_type, _unpack(payload)))
            return result
        finally:
            conn.close()
            shutil.rmtree(copy_dir, ignore_errors=True)

    def killed(self, proc: EngineProc, *, by_test: bool) -> tuple[Kill, list[dict[str, Any]]]:
        """Record a kill: the engine died (SIGKILL from the test or from a crash point)."""
        replies = proc.kill() if by_test else proc.wait_dead(CALL_TIMEOUT)
        kill = Kill(self.read_db(), self.side_size())
        self.kills.append(kill)
        return kill, replies

    # -- the checks --------------------------------------------------------------------

    def verify(self, ids: Iterable[str], views: dict[str, dict[str, Any]] | None = None) -> None:
        """Every instance complete; nothing recorded before a kill ran again or changed."""
        final = self.read_db()
        runs = self.runs()
        ids = list(ids)
        for iid in ids:
            inst = final.get(iid)
            assert inst is not None, f"{iid} was lost"
            assert inst.status == "complete", (iid, inst.status, inst.error)
            done = inst.done()
            # The output is built from the recorded results, and from nothing else.
            assert inst.output["steps"] == {f"{n}#{c}": s.output for (n, c), s in done.items()}
            for (name, count), step in done.items():
                mine = [r for r in runs if r.key == (iid, name, count)]
                recorded = [
                    i for i, r in enumerate(mine) if r.kind == "ran" and r.tail == step.output
                ]
                assert len(recorded) == 1, (iid, name, count, step.output, mine)
                # The recorded value is the one of the last run: nothing ran after it.
                assert recorded[0] == len(mine) - 1, ("ran after its record", mine)
                assert mine[-1].attempt == step.attempts, (mine[-1], step)
            # Persist before proceeding: a callback runs only once the result run() had
            # before it is durable; its value names that result's token, so every run of
            # every lifetime must name a recorded result.
            tokens = {_token(s.output) for s in done.values()}
            for run in runs:
                if run.iid == iid and run.kind == "ran":
                    seen = run.tail.rpartition("<")[2]
                    assert seen == "-" or seen in tokens, ("ran after an unrecorded result", run)
        for number, kill in enumerate(self.kills):
            later = self.runs(kill.side_offset)
            for iid in ids:
                before = kill.db.get(iid)
                if before is None:
                    continue
                after = final[iid]
                for key, step in before.done().items():
                    assert after.steps[key].output == step.output, (
                        f"kill {number}: {iid} {key} changed after the restart"
                    )
                    again = [r for r in later if r.key == (iid, *key)]
                    assert not again, f"kill {number}: recorded step {iid} {key} ran again: {again}"
                for key, step in before.steps.items():
                    if step.kind == "sleep":
                        # A sleep keeps the wake-up time it was recorded with.
                        assert after.steps[key].wake_at == step.wake_at, (iid, key)
        if views is not None:
            # What the engine's own API showed agrees with the file.
            for iid, view in views.items():
                assert view["status"] == "complete"
                assert view["output"] == final[iid].output
                assert [(s["name"], s["count"], s["output"]) for s in view["steps"]] == [
                    (s.name, s.count, s.output)
                    for s in sorted(final[iid].steps.values(), key=lambda s: s.seq)
                ]


@pytest.fixture
def harness(tmp_path: Path) -> Any:
    h = Harness(tmp_path)
    try:
        yield h
    finally:
        h.close()


def create_all(
    proc: EngineProc, ids: list[str], params: dict[str, Any] | Any
) -> tuple[set[str], list[str]]:
    """Create instances (pipelined); return (acknowledged ids, already existing ids)."""
    for iid in ids:
        p = params(iid) if callable(params) else params
        if not proc.send({"op": "create", "tenant": "mixed", "id": iid, "params": p}):
            break
    acked, existing = set(), []
    for _ in ids:
        reply = proc.read()
        if reply is None:
            break
        if reply["ok"]:
            acked.add(reply["id"])
        else:
            assert reply["code"] == "instance.already_exists", reply
            existing.append(reply["id"])
    return acked, existing


def finish(proc: EngineProc, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Wait until every instance has finished; return their ``get`` views, then stop."""
    views = {}
    for iid in ids:
        reply = proc.call({"op": "wait", "id": iid, "statuses": FINISHED, "timeout": 30})
        assert reply["ok"], (iid, reply, proc.stderr())
        views[iid] = proc.call({"op": "get", "id": iid})
        assert reply["status"] == "complete", (iid, views[iid])
    proc.stop()
    return views


def wait_status(proc: EngineProc, iid: str, statuses: list[str]) -> str:
    reply = proc.call({"op": "wait", "id": iid, "statuses": statuses, "timeout": 20})
    assert reply["ok"], (iid, statuses, reply)
    return str(reply["status"])


# ---------------------------------------------------------------------- (1) mid-step


def test_sigkill_mid_step_runs_the_step_again(harness: Harness) -> None:
    gate = harness.tmp / "gate"
    proc = harness.start()
    assert proc.call({"op": "create", "id": "i1", "params": {"gate": str(gate)}})["ok"]
    started = harness.wait_for_run(
        lambda r: r.kind == "start" and r.key == ("i1", "block", 1), what="start block"
    )
    kill, _ = harness.killed(proc, by_test=True)

    before = kill.db["i1"]
    assert before.status == "running"
    assert ("first", 1) in before.done()
    assert ("block", 1) not in before.steps  # it was running, not recorded
    assert not [r for r in harness.runs() if r.kind == "ran" and r.step == "block"]

    proc = harness.start()
    assert proc.recovered == 1
    again = harness.wait_for_run(
        lambda r: r.kind == "start" and r.key == ("i1", "block", 1),
        start=kill.side_offset,
        what="block started again after the restart",
    )
    assert again.tail == str(proc.pid) != started.tail
    gate.touch()
    views = finish(proc, ["i1"])
    harness.verify(["i1"], views)
    block = harness.read_db()["i1"].steps[("block", 1)].output
    assert block.split(":")[1] == str(proc.pid)  # the run after the restart was recorded


# ---------------------------------------------------------------------- (2) (3) crash points

IDS3 = ["c1", "c2", "c3"]


@pytest.mark.parametrize(
    ("point", "name"),
    [
        ("step.before_record", "first"),
        ("step.before_record", "loop"),
        ("step.before_record", "p2"),
        ("step.before_record", "retry"),
        ("step.after_record", "first"),
        ("step.after_record", "loop"),
        ("step.after_record", "p2"),
        ("step.after_record", "retry"),
        ("step.after_record", "last"),
    ],
)
def test_crash_point_around_a_step_record(harness: Harness, point: str, name: str) -> None:
    proc = harness.start(crash_at=f"{point}:{name}")
    acked, _ = create_all(proc, IDS3, {"loops": 3})
    kill, _ = harness.killed(proc, by_test=False)  # it killed itself at the crash point
    assert acked <= set(kill.db), "an acknowledged create was lost"
    lifetime1 = harness.runs(0)
    ran_name = [r for r in lifetime1 if r.kind == "ran" and r.step == name]
    assert ran_name, f"the engine died before any {name!r} ran"
    unrecorded = [r for r in ran_name if (r.step, r.count) not in kill.db[r.iid].done()]
    recorded = [r for r in ran_name if (r.step, r.count) in kill.db[r.iid].done()]
    if point == "step.before_record":
        assert unrecorded, "the crash point is before the record: a result must be missing"
    else:
        assert recorded, "the crash point is after the record: a result must be there"
        for r in recorded:
            assert kill.db[r.iid].done()[(r.step, r.count)].output == r.tail

    proc = harness.start()
    _, existing = create_all(proc, [i for i in IDS3 if i not in acked], {"loops": 3})
    assert len(existing) <= 1  # only the create in flight at the kill may have committed
    views = finish(proc, IDS3)
    harness.verify(IDS3, views)

    final = harness.read_db()
    later = harness.runs(kill.side_offset)
    for r in unrecorded:
        # At least once: the lost run was run again, and the new value is the recorded one.
        reruns = [x for x in later if x.kind == "ran" and x.key == r.key]
        assert reruns, f"{r.key} was never run again"
        assert final[r.iid].steps[(r.step, r.count)].output == reruns[-1].tail != r.tail
        if r.step == "retry":
            # The failed first attempt was recorded: the retry goes on at attempt 2.
            assert reruns[-1].attempt == 2
            assert not [x for x in later if x.kind == "fail" and x.key == r.key]


# ---------------------------------------------------------------------- (4) sleeps


def test_sigkill_during_sleep_past_its_wake_time_fires_late(harness: Harness) -> None:
    proc = harness.start()
    assert proc.call({"op": "create", "id": "s1", "params": {"sleep": 1.0, "loops": 1}})["ok"]
    assert wait_status(proc, "s1", ["waiting"]) == "waiting"
    kill, _ = harness.killed(proc, by_test=True)
    nap = kill.db["s1"].steps[("nap", 1)]
    assert (kill.db["s1"].status, nap.status) == ("waiting", "waiting")
    assert not [r for r in harness.runs() if r.step == "last"]
    while time.time() < nap.wake_at + 0.3:  # stay down past the wake-up time
        time.sleep(0.05)

    proc = harness.start()
    views = finish(proc, ["s1"])
    harness.verify(["s1"], views)
    after = harness.read_db()["s1"].steps
    assert after[("nap", 1)].ended_at >= nap.wake_at
    assert [r.tail for r in harness.runs(kill.side_offset) if r.kind == "ran"] == [
        after[("last", 1)].output
    ]


def test_sigkill_during_sleep_before_its_wake_time_wakes_on_time(harness: Harness) -> None:
    proc = harness.start()
    assert proc.call({"op": "create", "id": "s2", "params": {"sleep": 3.0, "loops": 1}})["ok"]
    assert wait_status(proc, "s2", ["waiting"]) == "waiting"
    kill, _ = harness.killed(proc, by_test=True)
    nap = kill.db["s2"].steps[("nap", 1)]
    assert nap.status == "waiting"

    proc = harness.start()
    status = proc.call({"op": "status", "id": "s2"})["status"]
    answered = time.time()
    if answered < nap.wake_at:
        assert status == "waiting", "woke before its wake-up time"
    views = finish(proc, ["s2"])
    harness.verify(["s2"], views)
    after = harness.read_db()["s2"].steps
    assert after[("nap", 1)].ended_at >= nap.wake_at
    assert after[("last", 1)].started_at >= nap.wake_at


def test_crash_point_after_sleep_record(harness: Harness) -> None:
    proc = harness.start(crash_at="sleep.after_record:nap")
    assert proc.call({"op": "create", "id": "s3", "params": {"sleep": 1.0, "loops": 1}})["ok"]
    kill, _ = harness.killed(proc, by_test=False)
    nap = kill.db["s3"].steps[("nap", 1)]
    assert (kill.db["s3"].status, nap.status) == ("running", "waiting")

    proc = harness.start()
    assert proc.recovered == 1
    views = finish(proc, ["s3"])
    harness.verify(["s3"], views)
    assert harness.read_db()["s3"].steps[("nap", 1)].ended_at >= nap.wake_at


def test_sigkill_during_retry_backoff(harness: Harness) -> None:
    proc = harness.start()
    assert proc.call({"op": "create", "id": "r1", "params": {"retry_delay": 1.5, "loops": 1}})["ok"]
    assert wait_status(proc, "r1", ["waiting"]) == "waiting"
    kill, _ = harness.killed(proc, by_test=True)
    retry = kill.db["r1"].steps[("retry", 1)]
    assert (retry.status, retry.attempts) == ("retrying", 1)

    proc = harness.start()
    views = finish(proc, ["r1"])
    harness.verify(["r1"], views)
    later = [r for r in harness.runs(kill.side_offset) if r.step == "retry"]
    assert [(r.kind, r.attempt) for r in later] == [("ran", 2)]


# ---------------------------------------------------------------------- (5) events

EVENTS_PER_TYPE = 8


def _event_stream() -> list[tuple[str, int]]:
    return [(t, n) for n in range(EVENTS_PER_TYPE) for t in ("a", "b")]


def _committed_events(inst: Instance) -> dict[str, list[int]]:
    """Events the database holds: delivered to a wait step, or buffered."""
    held: dict[str, list[int]] = {"a": [], "b": []}
    for step in sorted(inst.steps.values(), key=lambda s: s.seq):
        if step.kind == "waitForEvent" and step.status == "complete":
            held[step.output["type"]].append(step.output["payload"]["seq"])
    for event_type, payload in inst.buffered:
        held[event_type].append(payload["seq"])
    return held


def _send_events(
    harness: Harness,
    proc: EngineProc,
    events: list[tuple[str, int]],
    kill_at: int | None,
    rng: random.Random,
) -> tuple[list[tuple[str, int]], Kill | None]:
    """Send events one by one; SIGKILL right after sending event ``kill_at`` (so that it
    is in flight). Return the acknowledged events, and the kill if the engine died."""
    answers: list[dict[str, Any]] = []
    for index, (event_type, seq) in enumerate(events):
        payload = {"seq": seq, "last": seq == EVENTS_PER_TYPE - 1}
        sent = proc.send({"op": "send_event", "id": "e1", "type": event_type, "payload": payload})
        if index == kill_at:
            time.sleep(rng.uniform(0.0, 0.004))
            kill, rest = harness.killed(proc, by_test=True)
            answers += rest
            break
        reply = proc.read() if sent else None
        if reply is None:  # it died at a crash point
            kill, rest = harness.killed(proc, by_test=False)
            answers += rest
            break
        answers.append(reply)
    else:
        kill = None
    assert all(a["ok"] for a in answers), answers
    return events[: len(answers)], kill


def test_kill_while_events_arrive(harness: Harness) -> None:
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    stream = _event_stream()
    proc = harness.start()
    assert proc.call({"op": "create", "id": "e1", "params": {"events": ["a", "b"], "loops": 1}})[
        "ok"
    ]
    acked: list[tuple[str, int]] = []
    resent: list[tuple[str, int]] = []  # committed without an answer, then sent again
    pending = stream
    # Lifetime 1 is SIGKILLed from outside mid-stream; lifetime 2 kills itself right after
    # committing an event of type b; lifetime 3 takes the rest.
    plans: list[tuple[str | None, int | None]] = [
        (None, rng.randrange(2, len(stream) - 6)),
        ("event.after_record:b", None),
        (None, None),
    ]
    for number, (crash_at, kill_at) in enumerate(plans):
        if number:
            proc = harness.start(crash_at=crash_at)
        got, kill = _send_events(harness, proc, pending, kill_at, rng)
        acked += got
        pending = pending[len(got) :]
        assert (kill is not None) == (number < 2), (seed, number, pending)
        if kill is None:
            assert not pending, (seed, pending)
            continue
        # Acknowledged events are durable; of the others, only the one in flight may be.
        held = _committed_events(kill.db["e1"])
        for event_type in ("a", "b"):
            ours = sorted(s for t, s in acked + resent if t == event_type)
            assert held[event_type][: len(ours)] == ours, (seed, event_type, held, acked)
            extra = held[event_type][len(ours) :]
            assert extra in ([], [s for t, s in pending[:1] if t == event_type]), (seed, held)
            resent += [(event_type, s) for s in extra]

    views = finish(proc, ["e1"])
    harness.verify(["e1"], views)
    output = harness.read_db()["e1"].output["events"]
    for event_type in ("a", "b"):
        # Every acknowledged event exactly once, in order; an event whose answer was lost
        # to the kill and that was sent again is there twice (at-least-once for the client).
        expected = sorted(
            [s for t, s in stream if t == event_type] + [s for t, s in resent if t == event_type]
        )
        assert output[event_type] == expected, (seed, event_type, output, resent)


# ---------------------------------------------------------------------- (6) before finish


def test_crash_point_before_finish(harness: Harness) -> None:
    proc = harness.start(crash_at="instance.before_finish:f1")
    create_all(proc, ["f1", "f2"], {"loops": 2})
    kill, _ = harness.killed(proc, by_test=False)
    before = kill.db["f1"]
    assert before.status == "running"
    assert ("last", 1) in before.done()  # every step was recorded, only the finish is missing

    proc = harness.start()
    create_all(proc, [i for i in ["f1", "f2"] if i not in kill.db], {"loops": 2})
    views = finish(proc, ["f1", "f2"])
    harness.verify(["f1", "f2"], views)
    assert not [r for r in harness.runs(kill.side_offset) if r.iid == "f1"]


# ---------------------------------------------------------------------- (7) many in flight


def test_many_instances_killed_at_random_moments(harness: Harness) -> None:
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    ids = [f"m{n:02d}" for n in range(50)]

    def params(iid: str) -> dict[str, Any]:
        n = int(iid[1:])
        p: dict[str, Any] = {"loops": 1 + n % 3}
        if n % 5 == 0:
            p["sleep"] = 0.5
        if n % 7 == 0:
            p["retry_delay"] = 0.3
        return p

    # Lifetime 1: killed while the creates stream in.
    proc = harness.start()
    for iid in ids:
        proc.send({"op": "create", "tenant": "mixed", "id": iid, "params": params(iid)})
    answers = [proc.read() for _ in range(rng.randrange(5, 40))]
    kill, rest = harness.killed(proc, by_test=True)
    acked = {a["id"] for a in [*answers, *rest] if a is not None and a["ok"]}
    assert acked <= set(kill.db), (seed, sorted(acked - set(kill.db)))

    # Lifetime 2: the rest are created again, then it is killed at a random moment.
    proc = harness.start()
    _, existing = create_all(proc, [i for i in ids if i not in acked], params)
    assert len(existing) <= 1, (seed, existing)
    time.sleep(rng.uniform(0.05, 0.8))
    kill, _ = harness.killed(proc, by_test=True)
    assert set(ids) <= set(kill.db)

    # Lifetime 3: killed again, at once after its restart.
    proc = harness.start()
    time.sleep(rng.uniform(0.0, 0.3))
    harness.killed(proc, by_test=True)

    proc = harness.start()
    views = finish(proc, ids)
    harness.verify(ids, views)


# ---------------------------------------------------------------------- killed before parking
# Two instances killed in the window between recording a wait (or a retry) and parking the
# instance: the database says ``running`` with a ``waiting`` (or ``retrying``) step. The
# workflow's slow cleanup (``linger``) holds that window open for the test to kill in.


def _kill_when(harness: Harness, proc: EngineProc, iid: str, name: str, status: str) -> Kill:
    """SIGKILL once ``iid`` is ``running`` and its step ``name`` (#1) is ``status``."""
    deadline = time.monotonic() + 20
    while True:
        view = proc.call({"op": "get", "id": iid})
        steps = [s for s in view["steps"] if (s["name"], s["count"]) == (name, 1)]
        if view["status"] == "running" and steps and steps[0]["status"] == status:
            break
        assert time.monotonic() < deadline, view
        time.sleep(0.02)
    kill, _ = harness.killed(proc, by_test=True)
    assert kill.db[iid].status == "running"
    assert kill.db[iid].steps[(name, 1)].status == status
    return kill


def test_events_arriving_while_a_recovered_wait_replays(harness: Harness) -> None:
    """After the restart, events arrive while the replay has not reached the recorded wait
    yet (it "thinks" for a second first). Each must be delivered once, in order, and the
    wait's result, once recorded, must not change."""
    params = {"events": ["a"], "loops": 1, "think": 1.0, "linger": 1.5}
    proc = harness.start()
    assert proc.call({"op": "create", "id": "w1", "params": params})["ok"]
    _kill_when(harness, proc, "w1", "wait-a", "waiting")

    proc = harness.start()
    assert proc.recovered == 1
    wait_status(proc, "w1", ["running"])
    for seq in range(3):
        payload = {"seq": seq, "last": seq == 2}
        reply = proc.call({"op": "send_event", "id": "w1", "type": "a", "payload": payload})
        assert reply["ok"], reply
        if seq == 0:
            # The event went straight to the waiting step: that is its recorded result.
            view = proc.call({"op": "get", "id": "w1"})
            wait_a = next(s for s in view["steps"] if (s["name"], s["count"]) == ("wait-a", 1))
            assert (wait_a["status"], wait_a["output"]["payload"]["seq"]) == ("complete", 0)
    views = finish(proc, ["w1"])
    harness.verify(["w1"], views)
    final = harness.read_db()["w1"]
    assert final.steps[("wait-a", 1)].output["payload"]["seq"] == 0, "recorded result changed"
    assert final.output["events"] == {"a": [0, 1, 2]}


def test_retry_backoff_survives_a_kill_before_the_instance_is_parked(harness: Harness) -> None:
    proc = harness.start()
    params = {"retry_delay": 3.0, "loops": 1, "linger": 1.0}
    assert proc.call({"op": "create", "id": "r2", "params": params})["ok"]
    kill = _kill_when(harness, proc, "r2", "retry", "retrying")
    backoff_ends = kill.db["r2"].steps[("retry", 1)].wake_at

    proc = harness.start()
    assert proc.recovered == 1
    views = finish(proc, ["r2"])
    harness.verify(["r2"], views)
    retry = harness.read_db()["r2"].steps[("retry", 1)]
    assert retry.attempts == 2
    # The engine's own timestamps: attempt 2 must not start before its backoff ended.
    assert retry.started_at >= backoff_ends, (retry.started_at, backoff_ends)
