"""Attack scenarios for test_oslayers.py, run as a script: ``python oslayers_attacks.py NAME JSON``.

It runs in a fresh, single-threaded interpreter -- never in the pytest process, which may
have threads and must not unshare or lose its privileges. The script forks a child that
applies the requested layers (JSON ``layers``: names, or "all") with
``sandbox._oslayers.apply_isolation`` and then attacks; the child reports over a pipe as
JSON lines, the script reaps every process it made and prints one JSON object:

    {"lines": [...], "raw": "...", "exit": {"code": int|null, "signal": int|null},
     "leftover_children": bool, ...scenario extras}

Every wait is bounded (``DEADLINE``); a child that overstays is SIGKILLed and reaped.
"""

from __future__ import annotations

import contextlib
import ctypes
import encodings.idna  # noqa: F401 - imported before isolation: later imports fail
import errno
import json
import mmap
import os
import resource
import select
import shutil
import signal
import socket
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import msgpack
import psutil
from RestrictedPython import compile_restricted_exec, safe_builtins

from sandbox import _landlock, _oslayers, _seccomp
from sandbox._oslayers import IsolationConfig, Layer, apply_isolation, tenant_ids

DEADLINE = 15.0
OUTSIDER_UID = 60001  # an unprivileged uid that is no tenant's
LIBC = ctypes.CDLL(None, use_errno=True)
SECCOMP_FILTER = _oslayers.prepare_seccomp()
CHILD_OUT = -1  # in a forked child: the descriptor its reports go to
Outcome = dict[str, Any]


def errname(exc: BaseException) -> str:
    """The errno name of an OSError, else the exception type."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


def attempt(action: Callable[[], object]) -> str:
    """'ok' if ``action`` succeeds, else the errno name or exception type."""
    try:
        action()
    except BaseException as exc:
        return errname(exc)
    return "ok"


def raw_syscall(number: int, *args: int) -> str:
    """A system call through libc, reported as 'ok' or its errno name."""
    ctypes.set_errno(0)
    result = LIBC.syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args))
    if result == -1:
        return errno.errorcode.get(ctypes.get_errno(), "?")
    return "ok"


def send(fd: int, message: dict[str, Any]) -> None:
    """One JSON line on ``fd``."""
    os.write(fd, json.dumps(message).encode() + b"\n")


def drop_to(uid: int) -> None:
    """Test setup, not a layer: become an unprivileged uid by hand."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def parse_layers(spec: str | list[str]) -> frozenset[Layer]:
    """'all' or a list of layer values."""
    return frozenset(Layer) if spec == "all" else frozenset(Layer(name) for name in spec)


def wait_exit(pid: int, deadline: float = DEADLINE) -> dict[str, int | None]:
    """Reap ``pid`` within ``deadline`` seconds, SIGKILLing it if it overstays."""
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], deadline)
        if not ready:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return {"code": None, "signal": os.WTERMSIG(status)}
    return {"code": os.WEXITSTATUS(status), "signal": None}


def read_until_eof(fd: int, deadline: float = DEADLINE) -> bytes:
    """Everything written to ``fd`` until every writer closed it (bounded)."""
    chunks = []
    while True:
        ready, _, _ = select.select([fd], [], [], deadline)
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def read_line(fd: int, deadline: float = DEADLINE) -> dict[str, Any]:
    """One JSON line from ``fd``, byte by byte so that nothing after it is consumed."""
    data = b""
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], deadline)
        chunk = os.read(fd, 1) if ready else b""
        if not chunk:
            raise TimeoutError(f"no line from the child (got {data!r})")
        data += chunk
    result: dict[str, Any] = json.loads(data)
    return result


def split_output(data: bytes) -> dict[str, Any]:
    """JSON objects go to 'lines', anything else (an exec'd program's output) to 'raw'."""
    lines, raw = [], []
    for line in data.decode(errors="replace").splitlines():
        try:
            parsed = json.loads(line)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            lines.append(parsed)
        else:
            raw.append(line)
    return {"lines": lines, "raw": "\n".join(raw)}


def child_main(
    out: int,
    config: IsolationConfig,
    body: Callable[[], Outcome],
    before: Callable[[], None],
    seccomp_filter: object | None = SECCOMP_FILTER,
) -> None:
    """In the forked child: set up, isolate, report, attack, report; never returns."""
    global CHILD_OUT
    CHILD_OUT = out
    code = 0
    try:
        before()
        report = apply_isolation(config, seccomp_filter=seccomp_filter)
        send(
            out,
            {
                "applied": [layer.value for layer in report.applied],
                "missing": [[layer.value, reason] for layer, reason in report.missing],
            },
        )
        send(out, {"outcome": body()})
    except BaseException as exc:
        send(out, {"error": errname(exc), "traceback": traceback.format_exc()})
        code = 1
    os._exit(code)


def run_isolated(
    params: dict[str, Any],
    body: Callable[[], Outcome],
    *,
    before: Callable[[], None] = lambda: None,
    keep: tuple[int, ...] = (),
    seccomp_filter: object | None = SECCOMP_FILTER,
    **config: Any,
) -> dict[str, Any]:
    """Fork, isolate the child with ``params['layers']``, run ``body``, reap, collect."""
    read_end, write_end = os.pipe()
    defaults: dict[str, Any] = {"parent_pid": os.getpid()}
    settings = {**defaults, **config}
    cfg = IsolationConfig(
        layers=parse_layers(params["layers"]), keep_fds=(write_end, *keep), **settings
    )
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        child_main(write_end, cfg, body, before, seccomp_filter)
    os.close(write_end)
    try:
        data = read_until_eof(read_end)
    finally:
        os.close(read_end)
    return {**split_output(data), "exit": wait_exit(pid)}


# --------------------------------------------------------------------------- scenarios


def memory(params: dict[str, Any]) -> dict[str, Any]:
    def body() -> Outcome:
        def reserve() -> None:
            mmap.mmap(-1, 2**30).close()  # address space only: cheap to prove unlimited

        result = {"map_1gib": attempt(reserve)}
        if params.get("allocate", True):
            result["alloc_1gib"] = attempt(lambda: bytearray(2**30))
            # The process must keep working after the refused allocation.
            result["after"] = attempt(lambda: bytearray(2**20))
        return result

    return run_isolated(params, body, memory_bytes=256 * 2**20)


def cpu(params: dict[str, Any]) -> dict[str, Any]:
    def body() -> Outcome:
        while True:
            pass

    return run_isolated(params, body, cpu_seconds=1)


def open_files(params: dict[str, Any]) -> dict[str, Any]:
    def body() -> Outcome:
        opened = []
        error = "ok"
        try:
            for _ in range(100):
                opened.append(os.open(os.devnull, os.O_RDONLY))
        except OSError as exc:
            error = errname(exc)
        for fd in opened:
            os.close(fd)
        return {"opened": len(opened), "error": error}

    return run_isolated(params, body, open_files=16)


def write_file(params: dict[str, Any]) -> dict[str, Any]:
    directory = tempfile.mkdtemp(prefix="tf-oslayers-")
    target = os.path.join(directory, "out.txt")

    def body() -> Outcome:
        def write() -> None:
            with open(target, "wb") as f:
                f.write(b"tenant data")

        return {"write": attempt(write)}

    try:
        return run_isolated(params, body)
    finally:
        shutil.rmtree(directory)


def inherited_fd(params: dict[str, Any]) -> dict[str, Any]:
    secret_r, secret_w = os.pipe()
    os.write(secret_w, b"supervisor-secret")
    os.close(secret_w)

    def body() -> Outcome:
        result: Outcome = {"read": attempt(lambda: os.read(secret_r, 100))}
        result["stdin"] = os.readlink("/proc/self/fd/0")
        return result

    try:
        return run_isolated(params, body)
    finally:
        os.close(secret_r)


def environment(params: dict[str, Any]) -> dict[str, Any]:
    secret = params["secret"]
    # A variable set after exec lives in glibc's heap copy, not in the exec-time block.
    os.environ["TF_LATE_SECRET"] = secret + "-late"
    getenv = LIBC.getenv
    getenv.restype = ctypes.c_void_p
    # Where the values sit in memory: what a tenant past RestrictedPython could read.
    addresses = {name: getenv(name.encode()) for name in ("TF_SECRET", "TF_LATE_SECRET")}

    def body() -> Outcome:
        with open("/proc/self/environ", "rb") as f:
            block = f.read()
        return {
            "os_environ": sorted(os.environ),
            "getenv": [getenv(name.encode()) for name in addresses],
            "proc_environ_has_secret": secret.encode() in block,
            "memory_has_secret": [
                ctypes.string_at(address, len(secret)) == secret.encode()
                for address in addresses.values()
            ],
        }

    return run_isolated(params, body)


def setuid_binary(params: dict[str, Any]) -> dict[str, Any]:
    # A root-owned setuid copy of id(1): as an unprivileged user it prints euid 0 unless
    # NO_NEW_PRIVS is set. mkdtemp is 0700; the unprivileged user must reach the file.
    directory = tempfile.mkdtemp(prefix="tf-oslayers-")
    os.chmod(directory, 0o755)
    program = os.path.join(directory, "id")
    shutil.copy(shutil.which("id") or "/usr/bin/id", program)
    os.chmod(program, 0o4755)

    def body() -> Outcome:
        status = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("NoNewPrivs", "Uid"):
                    status[key] = value.split()[0] if key == "NoNewPrivs" else value.split()
        send(CHILD_OUT, {"outcome": status})
        os.dup2(CHILD_OUT, 1)
        os.execv(program, [program, "-u"])

    def before() -> None:
        drop_to(OUTSIDER_UID)

    try:
        return run_isolated(params, body, before=before)
    finally:
        shutil.rmtree(directory)


def dumpable(params: dict[str, Any]) -> dict[str, Any]:
    def body() -> Outcome:
        return {"dumpable": LIBC.prctl(3, 0, 0, 0, 0)}  # PR_GET_DUMPABLE

    return run_isolated(params, body)


def parent_death(params: dict[str, Any]) -> dict[str, Any]:
    """Helper (subreaper) -> middle (the 'zygote') -> sandbox; SIGKILL the middle."""
    LIBC.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come back to us
    ask_r, ask_w = os.pipe()
    reply_r, reply_w = os.pipe()
    pid_r, pid_w = os.pipe()
    layers = parse_layers(params["layers"])
    uid, gid = tenant_ids("acme")
    middle = os.fork()
    if middle == 0:
        os.close(reply_r)
        os.close(pid_r)
        sandbox = os.fork()
        if sandbox == 0:
            os.close(pid_w)
            cfg = IsolationConfig(
                layers=layers, uid=uid, gid=gid, keep_fds=(ask_r, reply_w), parent_pid=os.getppid()
            )

            def body() -> Outcome:
                os.read(ask_r, 1)  # blocks until the helper asks, after the middle died
                return {"alive": True, "ppid": os.getppid()}

            child_main(reply_w, cfg, body, lambda: None)
        os.write(pid_w, str(sandbox).encode())
        os.close(pid_w)
        while True:
            signal.pause()
    os.close(reply_w)
    os.close(pid_w)
    os.close(ask_r)
    sandbox = int(read_until_eof(pid_r))
    os.close(pid_r)
    report = read_line(reply_r)
    os.kill(middle, signal.SIGKILL)
    middle_exit = wait_exit(middle)
    # The parent-death signal is queued before the middle can be reaped, so from here the
    # sandbox is either doomed or will answer.
    with contextlib.suppress(BrokenPipeError):
        os.write(ask_w, b"?")
    os.close(ask_w)
    data = read_until_eof(reply_r)
    os.close(reply_r)
    result = split_output(data)
    result["lines"].insert(0, report)
    return {**result, "exit": wait_exit(sandbox), "middle": middle_exit, "helper": os.getpid()}


def orphaned_before_arming(params: dict[str, Any]) -> dict[str, Any]:
    def body() -> Outcome:
        return {"alive": True}

    # A parent pid that is not ours stands for "the parent died before PDEATHSIG".
    return run_isolated(params, body, parent_pid=1)


def other_tenant(params: dict[str, Any]) -> dict[str, Any]:
    victim_uid, _ = tenant_ids("globex")
    hold_r, hold_w = os.pipe()
    victim = os.fork()
    if victim == 0:
        os.close(hold_w)
        drop_to(victim_uid)
        os.read(hold_r, 1)  # lives until the helper closes hold_w
        os._exit(0)
    os.close(hold_r)
    uid, gid = tenant_ids("acme")

    def body() -> Outcome:
        return {
            "kill_other_tenant": attempt(lambda: os.kill(victim, 0)),
            "list_root": attempt(lambda: os.listdir("/root")),
            "read_shadow": attempt(lambda: open("/etc/shadow", "rb").close()),
            "regain_root": attempt(lambda: os.setuid(0)),
            "ids": [os.getuid(), os.geteuid(), os.getgid(), os.getgroups()],
        }

    try:
        return run_isolated(params, body, uid=uid, gid=gid)
    finally:
        os.close(hold_w)
        wait_exit(victim)


def thread_bomb(params: dict[str, Any]) -> dict[str, Any]:
    uid, gid = tenant_ids("initech")

    def body() -> Outcome:
        release = threading.Event()
        threads = []
        error = "ok"
        try:
            for _ in range(32):
                thread = threading.Thread(target=release.wait)
                thread.start()
                threads.append(thread)
        except RuntimeError as exc:
            error = str(exc)
        release.set()
        for thread in threads:
            thread.join()
        return {"started": len(threads), "error": error}

    return run_isolated(params, body, uid=uid, gid=gid, processes=8)


def network(params: dict[str, Any]) -> dict[str, Any]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def body() -> Outcome:
            def connect() -> None:
                with socket.socket() as s:
                    s.settimeout(5)
                    s.connect(("127.0.0.1", port))

            return {
                "connect": attempt(connect),
                "interfaces": [name for _, name in socket.if_nameindex()],
            }

        return run_isolated(params, body)


def filesystem(params: dict[str, Any]) -> dict[str, Any]:
    readable = tempfile.mkdtemp(prefix="tf-oslayers-")
    Path(readable, "allowed.txt").write_text("tenant code")
    abstract_name = f"\0tf-oslayers-{os.getpid()}"
    with (
        socket.create_server(("127.0.0.1", 0)) as tcp_listener,
        socket.socket(socket.AF_UNIX) as unix_listener,
    ):
        port = tcp_listener.getsockname()[1]
        unix_listener.bind(abstract_name)
        unix_listener.listen()

        def body() -> Outcome:
            def tcp() -> None:
                with socket.socket() as s:
                    s.settimeout(5)
                    s.connect(("127.0.0.1", port))

            def abstract() -> None:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(abstract_name)

            def write_tmp() -> None:
                with open(f"/tmp/tf-oslayers-{os.getpid()}", "wb") as f:
                    f.write(b"x")
                os.unlink(f"/tmp/tf-oslayers-{os.getpid()}")

            return {
                "read_passwd": attempt(lambda: open("/etc/passwd", "rb").close()),
                "write_tmp": attempt(write_tmp),
                "read_allowed": Path(readable, "allowed.txt").read_text(),
                "list_allowed": os.listdir(readable),
                "write_allowed": attempt(lambda: Path(readable, "new.txt").write_text("x")),
                "tcp_connect": attempt(tcp),
                "abstract_unix": attempt(abstract),
                "signal_parent": attempt(lambda: os.kill(os.getppid(), 0)),
            }

        try:
            return run_isolated(params, body, readable_paths=(readable,))
        finally:
            shutil.rmtree(readable)


def syscalls(params: dict[str, Any]) -> dict[str, Any]:
    scratch = tempfile.mkdtemp(prefix="tf-oslayers-")
    with_filter = params["layers"] != []
    # A per-step CPU budget the sandbox sets itself, and another limit it must not touch.
    cpu_budget = (60, resource.getrlimit(resource.RLIMIT_CPU)[1])
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)

    def body() -> Outcome:
        def fork() -> None:
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)

        def thread() -> None:
            done = []
            worker = threading.Thread(target=lambda: done.append(1))
            worker.start()
            worker.join()
            assert done == [1]

        def write_open() -> None:
            with open(os.path.join(scratch, "w.txt"), "wb") as f:
                f.write(b"x")

        result = {
            "socket": attempt(lambda: socket.socket().close()),
            "fork": attempt(fork),
            "kill_parent": attempt(lambda: os.kill(os.getppid(), 0)),
            "open_for_write": attempt(write_open),
            "read_open": attempt(lambda: open("/etc/hostname", "rb").close()),
            "exec_mapping": attempt(
                lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC).close()
            ),
            "thread": attempt(thread),
            "cpu_budget": attempt(lambda: resource.setrlimit(resource.RLIMIT_CPU, cpu_budget)),
            "raise_nofile": attempt(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile)),
        }
        if with_filter:
            # Harmful without the filter (they would succeed), so only tried with it.
            result["execve"] = attempt(lambda: os.execv("/bin/true", ["/bin/true"]))
            result["ptrace"] = raw_syscall(101, 0, 0, 0, 0)  # PTRACE_TRACEME
            result["mount"] = raw_syscall(165, 0, 0, 0, 0, 0)
            result["unshare"] = raw_syscall(272, 0x04000000)  # CLONE_NEWUTS
            result["setuid"] = attempt(lambda: os.setuid(0))
            result["clone3"] = raw_syscall(435, 0, 0)
            result["clone_process"] = raw_syscall(56, 17, 0, 0, 0, 0)  # SIGCHLD only
        return result

    try:
        return run_isolated(params, body)
    finally:
        shutil.rmtree(scratch)


def workload(params: dict[str, Any]) -> dict[str, Any]:
    """Every layer at once, then what a real sandbox does, then the usual attacks."""
    request_r, request_w = os.pipe()
    reply_r, reply_w = os.pipe()
    uid, gid = tenant_ids("acme")
    read_end, write_end = os.pipe()
    cfg = IsolationConfig(
        uid=uid, gid=gid, keep_fds=(write_end, request_r, reply_w), parent_pid=os.getpid()
    )

    def body() -> Outcome:
        result: Outcome = {}
        results: list[int] = []
        workers = [
            threading.Thread(target=lambda n=n: results.append(sum(range(n * 10_000))))
            for n in range(8)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        result["threads"] = len(results)
        unpacker = msgpack.Unpacker()
        while True:
            chunk = os.read(request_r, 65536)
            if not chunk:
                raise EOFError("the helper closed the request pipe")
            unpacker.feed(chunk)
            request = next(unpacker, None)
            if request is not None:
                break
        os.write(reply_w, msgpack.packb({"id": request["id"], "echo": request["payload"]}))
        compiled = compile_restricted_exec(
            "def run(event):\n"
            "    total = 0\n"
            "    for item in event['items']:\n"
            "        total = total + item\n"
            "    return {'total': total}\n"
            "result = run({'items': [1, 2, 3]})\n"
        )
        scope = {
            "__builtins__": safe_builtins,
            "_getiter_": iter,
            "_getitem_": lambda obj, key: obj[key],
        }
        exec(compiled.code, scope)
        result["restricted"] = [compiled.errors, scope["result"]]
        block = bytearray(100 * 2**20)
        result["alloc_100mib"] = len(block)
        del block
        try:
            {}["missing"]
        except KeyError:
            result["traceback"] = traceback.format_exc().splitlines()[-1]
        result["attacks"] = {
            "read_passwd": attempt(lambda: open("/etc/passwd", "rb").close()),
            "socket": attempt(lambda: socket.socket().close()),
            "fork": attempt(os.fork),
            "kill_parent": attempt(lambda: os.kill(os.getppid(), 0)),
            "execve": attempt(lambda: os.execv("/bin/true", ["/bin/true"])),
            "env": sorted(os.environ),
        }
        return result

    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        child_main(write_end, cfg, body, lambda: None)
    os.close(write_end)
    os.close(request_r)
    os.close(reply_w)
    report = read_line(read_end)
    os.write(request_w, msgpack.packb({"id": 7, "payload": ["hello", 1, 2.5, None]}))
    unpacker = msgpack.Unpacker()
    reply = None
    while reply is None:
        ready, _, _ = select.select([reply_r], [], [], DEADLINE)
        chunk = os.read(reply_r, 65536) if ready else b""
        if not chunk:
            break
        unpacker.feed(chunk)
        reply = next(unpacker, None)
    data = read_until_eof(read_end)
    for fd in (read_end, request_w, reply_r):
        os.close(fd)
    result = split_output(data)
    result["lines"].insert(0, report)
    return {**result, "exit": wait_exit(pid), "reply": reply}


def not_root(params: dict[str, Any]) -> dict[str, Any]:
    """An unprivileged user in a chroot: the kernel refuses user namespaces there."""
    empty = tempfile.mkdtemp(prefix="tf-oslayers-")
    uid, gid = tenant_ids("acme")

    def before() -> None:
        os.chroot(empty)
        os.chdir("/")
        drop_to(OUTSIDER_UID)

    def body() -> Outcome:
        return {"still_running": True, "uid": os.getuid()}

    try:
        return run_isolated(params, body, before=before, uid=uid, gid=gid)
    finally:
        os.rmdir(empty)


def host_without_features(params: dict[str, Any]) -> dict[str, Any]:
    """No Landlock, no libseccomp, no uid configured: reported, not raised."""

    def no_landlock(*args: object) -> int:
        ctypes.set_errno(errno.ENOSYS)
        return -1

    def no_libseccomp() -> object:
        raise OSError(errno.ENOENT, "libseccomp.so.2: cannot open shared object file")

    def before() -> None:
        _landlock._libc_syscall = no_landlock
        _seccomp.compile_filter = no_libseccomp

    # No prebuilt filter: the child builds one itself, and finds no libseccomp.
    return run_isolated(params, lambda: {"still_running": True}, before=before, seccomp_filter=None)


def old_landlock(params: dict[str, Any]) -> dict[str, Any]:
    """A kernel with Landlock ABI 3: files are covered, TCP and signals are not."""
    real_syscall = _landlock._libc_syscall

    def abi_3(number: ctypes.c_long, *args: Any) -> int:
        if number.value == 444 and args[-1].value == 1:  # LANDLOCK_CREATE_RULESET_VERSION
            return 3
        result: int = real_syscall(number, *args)
        return result

    def before() -> None:
        _landlock._libc_syscall = abi_3

    def body() -> Outcome:
        return {
            "read_passwd": attempt(lambda: open("/etc/passwd", "rb").close()),
            "signal_parent": attempt(lambda: os.kill(os.getppid(), 0)),
        }

    return run_isolated(params, body, before=before)


def unexpected_error(params: dict[str, Any]) -> dict[str, Any]:
    """An errno that is no host refusal (EFAULT from unshare) must raise, not be hidden."""

    def broken_unshare(flags: object) -> int:
        ctypes.set_errno(errno.EFAULT)
        return -1

    def before() -> None:
        _oslayers._libc_unshare = broken_unshare

    return run_isolated(params, lambda: {"reached_tenant_code": True}, before=before)


def threaded(params: dict[str, Any]) -> dict[str, Any]:
    """apply_isolation refuses to run while another thread could escape it."""
    stop = threading.Event()

    def before() -> None:
        threading.Thread(target=stop.wait, daemon=True).start()

    return run_isolated(params, lambda: {"reached_tenant_code": True}, before=before)


SCENARIOS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    fn.__name__: fn
    for fn in (
        memory,
        cpu,
        open_files,
        write_file,
        inherited_fd,
        environment,
        setuid_binary,
        dumpable,
        parent_death,
        orphaned_before_arming,
        other_tenant,
        thread_bomb,
        network,
        filesystem,
        syscalls,
        workload,
        not_root,
        host_without_features,
        old_landlock,
        unexpected_error,
        threaded,
    )
}


def kill_descendants() -> None:
    """Safety net when a scenario fails half-way: no process of ours outlives the script."""
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def main() -> None:
    """Run one scenario and print its result as JSON."""
    name, params = sys.argv[1], json.loads(sys.argv[2])
    try:
        result = SCENARIOS[name](params)
    except BaseException:
        kill_descendants()
        raise
    try:
        os.waitpid(-1, os.WNOHANG)
        result["leftover_children"] = True
    except ChildProcessError:
        result["leftover_children"] = False
    print(json.dumps(result))


if __name__ == "__main__":
    main()
