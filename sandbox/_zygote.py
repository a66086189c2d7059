"""The zygote: a pre-warmed, single-threaded fork server for sandboxes.

Run as ``python -m sandbox._zygote FD`` by the supervisor, which keeps the other end
of the SOCK_SEQPACKET socket FD. It imports everything a sandbox will ever need
(msgpack, RestrictedPython, the SDK, every allowed stdlib module), builds the seccomp
filter once, freezes the GC so forked children share its pages copy-on-write, then
serves requests::

    supervisor                               zygote
    {"op": "spawn", ...} + [rpc fd] ───────▶ fork ──▶ child: isolate, serve(rpc fd)
                        ◀─────────────────── {"op": "spawned", "pid"} + [pidfd]
                        ◀─────────────────── {"op": "exited", "pid", "status"}

A cold start is therefore a fork plus isolation, not an interpreter boot. The zygote
is the children's parent: it reaps every one of them (no zombies) and reports how
each ended. It dies with the supervisor (parent-death signal), and its children die
with it (theirs).
"""

from __future__ import annotations

import array
import gc
import importlib
import os
import selectors
import signal
import socket
import sys
from typing import Any

import msgpack

_MAX_MESSAGE = 65536


def _preimport() -> Any:
    """Import every module a sandbox may touch, before any filesystem is closed."""
    import encodings.idna  # noqa: F401 - codecs are looked up lazily by name
    import json  # noqa: F401

    import RestrictedPython  # noqa: F401

    from . import _child, _executor, _restricted, sdk  # noqa: F401
    from ._oslayers import prepare_seccomp
    from ._policy import DEFAULT_POLICY

    for name in DEFAULT_POLICY.allowed_modules:
        importlib.import_module(name)
    return prepare_seccomp()


def _spawn(
    control: socket.socket,
    request: dict[str, Any],
    rpc_fd: int,
    seccomp: Any,
    me: int,
    private_fds: tuple[int, ...],
) -> None:
    pid = os.fork()
    if pid == 0:  # the sandbox child
        try:
            # The zygote's own descriptors never reach tenant code, whatever layers apply.
            control.close()
            for fd in private_fds:
                os.close(fd)
            _become_sandbox(request, rpc_fd, seccomp, me)
        finally:
            os._exit(1)
    os.close(rpc_fd)
    pidfd = os.pidfd_open(pid)
    try:
        reply = msgpack.packb({"op": "spawned", "req": request["req"], "pid": pid})
        control.sendmsg(
            [reply], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [pidfd]))]
        )
    finally:
        os.close(pidfd)


def _become_sandbox(request: dict[str, Any], rpc_fd: int, seccomp: Any, zygote_pid: int) -> None:
    from ._child import SandboxLimits, serve
    from ._oslayers import IsolationConfig, Layer, apply_isolation, tenant_ids

    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    os.setsid()
    memory_mb = int(request["memory_mb"])
    cpu_seconds = int(request["cpu_seconds"])
    layers = frozenset(Layer(name) for name in request.get("layers", [la.value for la in Layer]))
    uid, gid = tenant_ids(str(request["tenant_id"]))
    config = IsolationConfig(
        memory_bytes=memory_mb * 1024 * 1024,
        # The hard CPU limit backs up the whole sandbox's life; each step attempt gets
        # its own soft budget of cpu_seconds (see _child.start_cpu_budget).
        cpu_seconds=24 * 3600,
        open_files=int(request["open_files"]),
        uid=uid if Layer.UID in layers else None,
        gid=gid if Layer.UID in layers else None,
        keep_fds=(rpc_fd,),
        # Every activation is a thread, and RLIMIT_NPROC counts the tenant uid's threads.
        processes=2048,
        layers=layers,
        parent_pid=zygote_pid,
    )
    report = apply_isolation(config, seccomp_filter=seccomp if Layer.SECCOMP in layers else None)
    missing = {layer.value: reason for layer, reason in report.missing}
    serve(rpc_fd, SandboxLimits(memory_mb, cpu_seconds), missing)


def _reap(control: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        message = {"op": "exited", "pid": pid, "status": status}
        try:
            control.send(msgpack.packb(message))
        except OSError:
            return


def main(control_fd: int) -> None:
    # No parent-death signal here: it fires when the *thread* that forked us exits, and
    # trio starts processes from worker threads it retires when idle (the zygote was
    # SIGKILLed ten seconds after start). The control socket's EOF is the parent's
    # death instead: the kernel closes the supervisor's end however it dies.
    # Ctrl-C reaches the whole process group; the supervisor decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control = socket.socket(fileno=control_fd)
    seccomp = _preimport()
    me = os.getpid()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    # Objects that exist now are never collected: the children share these pages
    # instead of copying them when the GC would touch their headers.
    gc.freeze()
    control.send(msgpack.packb({"op": "ready", "pid": me}))
    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj == wake_r:
                while True:
                    try:
                        if not os.read(wake_r, 512):
                            break
                    except BlockingIOError:
                        break
                _reap(control)
                continue
            try:
                data, ancdata, _, _ = control.recvmsg(_MAX_MESSAGE, socket.CMSG_SPACE(4 * 4))
            except OSError:
                return  # the supervisor is gone (reset)
            if not data:
                return  # the supervisor is gone
            fds = array.array("i")
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            request = msgpack.unpackb(data, raw=False)
            if request.get("op") == "spawn" and len(fds) == 1:
                _spawn(control, request, fds[0], seccomp, me, (wake_r, wake_w))
            else:
                for fd in fds:
                    os.close(fd)
        _reap(control)


if __name__ == "__main__":
    main(int(sys.argv[1]))
