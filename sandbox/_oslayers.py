"""OS isolation layers, applied in a freshly forked sandbox child before tenant code runs.

Only code running in the sandbox child calls :func:`apply_isolation`; the zygote calls
:func:`prepare_seccomp` once and :func:`tenant_ids` per tenant. RestrictedPython is the
first line; these layers are the boundary that still holds when it is bypassed.

Each layer, what it stops, and the attack in ``tests/sandbox/test_oslayers.py`` that only
it stops:

=============  ===========================================  ===================================
layer          mechanism                                    attack it stops
=============  ===========================================  ===================================
RLIMITS        AS, CPU (soft, hard=soft+1), NOFILE,         1 GiB allocation under 256 MiB;
               FSIZE 0, CORE 0, MEMLOCK 0, MSGQUEUE 0,      busy loop past the CPU limit; 100
               NPROC (per-tenant uid only), one malloc      files under open_files=16; writing
               arena                                        a file; a thread bomb
CLOSE_FDS      close every fd but keep_fds; 0/1/2 ->        reading a descriptor the parent
               /dev/null                                    had open
SCRUB_ENV      clear os.environ and the C environ, zero     reading a secret from os.environ,
               the env strings and the exec-time env block  getenv(), /proc/self/environ or
                                                            the process's own memory
NETNS          unshare(NEWNET) (NEWUSER|NEWNET if not root) TCP connect to the host loopback
UID            setgroups([]), setresgid, setresuid to the   kill() of another tenant's process,
               per-tenant ids                               reading /root and /etc/shadow
PDEATHSIG      setsid, PR_SET_PDEATHSIG(SIGKILL), then      outliving the parent (zygote or
               re-check the parent pid                      supervisor)
NO_NEW_PRIVS   PR_SET_NO_NEW_PRIVS, PR_SET_DUMPABLE 0       gaining root through a setuid binary
FILESYSTEM     Landlock: nothing readable but               reading /etc/passwd, writing /tmp,
               readable_paths, no TCP bind/connect,         TCP connect, signalling the parent
               signals and abstract sockets scoped
SECCOMP        allow-list (compiled to BPF in the zygote),  execve, socket, fork, ptrace, mount,
               EPERM by default; clone3 -> ENOSYS           unshare, kill, setuid, open for
                                                            writing, PROT_EXEC mappings
=============  ===========================================  ===================================

Order (SANDBOX-NOTES 2.8, with one correction): CLOSE_FDS, SCRUB_ENV, NETNS, (Landlock
ruleset built), RLIMITS, UID, PDEATHSIG, NO_NEW_PRIVS, FILESYSTEM (enforced), SECCOMP.
PDEATHSIG comes *after* the namespace and uid changes because the kernel clears the
parent-death signal (and the dumpable flag) whenever the credentials change; the parent
re-check right after arming it closes the window since the fork. Landlock paths are
opened before the uid drop, enforcement needs NO_NEW_PRIVS, and seccomp goes last
because it forbids the system calls every earlier layer uses.

The filesystem layer is Landlock, not chroot: it works as root and as an unprivileged
user alike (ABI 7 on this kernel), needs no empty directory or mount namespace, also
covers TCP and signals, and a chroot only holds once root is gone. Landlock does not
govern ``stat`` or ``readlink``, which reveal metadata only.

A layer the host refuses (not root, no user namespaces, no Landlock, no seccomp) is
reported in :attr:`IsolationReport.missing` with the reason; a layer partly applied (an
old Landlock ABI) appears in both ``applied`` and ``missing``. Any other failure raises,
and the child must then exit without running tenant code.

Measured cost on this machine (2 vCPU VM shared with other work, root, all layers with
a uid drop, filter prepared in the parent): ``apply_isolation`` in a forked child takes
a median of 1.4-1.8 ms over 50 forks (fork to first message: ~2.9 ms, against ~1.2 ms
with no layer). The largest parts: unshare(CLONE_NEWNET) ~0.4 ms, loading the seccomp
program ~0.2 ms, scrubbing the environment ~0.2 ms, building the Landlock ruleset
~0.1 ms; the rest is copy-on-write faults of a freshly forked interpreter.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import hashlib
import os
import posix
import resource
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

from . import _landlock, _seccomp

__all__ = [
    "IsolationConfig",
    "IsolationReport",
    "Layer",
    "apply_isolation",
    "prepare_seccomp",
    "tenant_ids",
]


class Layer(str, enum.Enum):
    """One OS isolation layer; the values are stable names for logs and reports."""

    RLIMITS = "rlimits"
    CLOSE_FDS = "close_fds"
    SCRUB_ENV = "scrub_env"
    NO_NEW_PRIVS = "no_new_privs"
    PDEATHSIG = "pdeathsig"
    UID = "uid"
    NETNS = "netns"
    FILESYSTEM = "filesystem"
    SECCOMP = "seccomp"


@dataclass(frozen=True, slots=True)
class IsolationConfig:
    """What :func:`apply_isolation` enforces in one sandbox child."""

    memory_bytes: int = 512 * 2**20
    """RLIMIT_AS: virtual memory, so thread stacks and mapped libraries count too."""
    cpu_seconds: int = 30
    """RLIMIT_CPU soft limit (SIGXCPU); the hard limit, one second later, is SIGKILL."""
    open_files: int = 64
    """RLIMIT_NOFILE."""
    uid: int | None = None
    """Per-tenant unprivileged uid (see :func:`tenant_ids`); None = don't drop."""
    gid: int | None = None
    """Per-tenant gid; None = same number as ``uid``."""
    keep_fds: tuple[int, ...] = ()
    """Descriptors that survive CLOSE_FDS: the RPC channel (and a capped stderr, if any)."""
    readable_paths: tuple[str, ...] = ()
    """Files or directory trees left readable by FILESYSTEM (empty = nothing readable)."""
    layers: frozenset[Layer] = frozenset(Layer)
    """Which layers to apply; tests apply one at a time."""
    parent_pid: int | None = None
    """The pid the child expects as its parent, to detect that it died before PDEATHSIG
    was armed; None = treat being reparented to pid 1 as the parent's death."""
    processes: int = 128
    """RLIMIT_NPROC when the uid is dropped. It counts every thread and process of the
    tenant's uid system-wide, so it caps the threads of all this tenant's sandboxes."""

    def __post_init__(self) -> None:
        if self.uid == 0 or self.gid == 0:
            raise ValueError("a sandbox never runs as uid/gid 0; use tenant_ids()")
        if min(self.memory_bytes, self.cpu_seconds, self.open_files, self.processes) <= 0:
            raise ValueError("resource limits must be positive")


@dataclass(frozen=True)
class IsolationReport:
    """Which layers :func:`apply_isolation` applied, in order, and which the host refused."""

    applied: tuple[Layer, ...]
    missing: tuple[tuple[Layer, str], ...]
    """(layer, reason) for every requested layer not (fully) in force."""


class _Refused(Exception):
    """The host cannot apply a layer (as opposed to a bug or a misconfiguration)."""


# Resolved at import, in the zygote, so that a forked child does not pay for dlsym().
_libc = ctypes.CDLL(None, use_errno=True)
_libc_prctl = _libc.prctl
_libc_unshare = _libc.unshare
_libc_mallopt = _libc.mallopt
_libc_strlen = _libc.strlen
_libc_clearenv = _libc.clearenv
_libc_strlen.restype = ctypes.c_size_t
_libc_strlen.argtypes = [ctypes.c_void_p]
_environ = ctypes.POINTER(ctypes.c_void_p).in_dll(_libc, "environ")

_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38
_M_ARENA_MAX = -8
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
# close_range(2) clamps the upper bound to the table size, so this costs one system call.
_MAX_FD = 2**31 - 1
# errnos with which a kernel says "not allowed / not built in" rather than "you erred".
_NAMESPACE_REFUSALS = (errno.EPERM, errno.EINVAL, errno.ENOSPC, errno.EUSERS)

_UID_BASE = 2_000_000
_UID_SPAN = 1_000_000_000


def tenant_ids(tenant_id: str) -> tuple[int, int]:
    """A stable (uid, gid) for ``tenant_id`` in [2e6, 1.002e9), a range no distribution uses.

    Derived from a hash, so it needs no registry; two tenants collide with probability
    about n**2 / 2e9 (0.05 % for 1,000 tenants), and a collision only lets them share
    the RLIMIT_NPROC budget: Landlock scoping and seccomp still stop cross-signals.
    """
    digest = hashlib.blake2b(tenant_id.encode("utf-8"), digest_size=8).digest()
    uid = _UID_BASE + int.from_bytes(digest, "big") % _UID_SPAN
    return uid, uid


def prepare_seccomp() -> object:
    """Build the seccomp allow-list in the zygote, so each child only loads it.

    The result is a compiled BPF program (about 130 instructions), shared copy-on-write
    by every child. Raises ImportError or OSError when libseccomp is not installed; pass
    ``None`` to :func:`apply_isolation` then, and the child reports SECCOMP as missing.
    """
    return _seccomp.compile_filter()


def apply_isolation(
    config: IsolationConfig, *, seccomp_filter: object | None = None
) -> IsolationReport:
    """Apply ``config.layers`` to this process, in the order of the module docstring.

    Call it in a freshly forked, single-threaded child, after everything the child will
    ever import is imported (FILESYSTEM and SECCOMP stop later imports). It is
    irreversible. Host refusals are reported, not raised; anything else raises and the
    child must exit without running tenant code. Python objects inherited from the
    parent that own descriptors other than ``keep_fds`` must not be used (or collected
    into a ``close``) afterwards: their descriptor numbers may be reused.
    """
    if threading.active_count() != 1:
        # Landlock and seccomp bind only the calling thread, and unshare(CLONE_NEWUSER)
        # fails in a multithreaded process: another thread would escape every layer.
        raise RuntimeError("apply_isolation() must run in a single-threaded process")
    layers = config.layers
    applied: list[Layer] = []
    missing: list[tuple[Layer, str]] = []

    def attempt(layer: Layer, step: Callable[[], None]) -> None:
        if layer not in layers:
            return
        try:
            step()
        except _Refused as refused:
            missing.append((layer, str(refused)))
        else:
            applied.append(layer)

    attempt(Layer.CLOSE_FDS, lambda: _close_inherited_fds(config.keep_fds))
    attempt(Layer.SCRUB_ENV, _scrub_environment)
    attempt(Layer.NETNS, _isolate_network)
    ruleset: _landlock.Ruleset | None = None
    landlock_refusal = ""
    if Layer.FILESYSTEM in layers:
        try:
            ruleset = _landlock.build_ruleset(config.readable_paths)
        except _landlock.LandlockUnavailable as exc:
            landlock_refusal = str(exc)
    attempt(Layer.RLIMITS, lambda: _set_rlimits(config))
    attempt(Layer.UID, lambda: _drop_privileges(config.uid, config.gid))
    attempt(Layer.PDEATHSIG, lambda: _bind_lifetime(config.parent_pid))
    attempt(Layer.NO_NEW_PRIVS, _forbid_privilege_gain)
    attempt(Layer.FILESYSTEM, lambda: _restrict_filesystem(ruleset, landlock_refusal))
    if ruleset is not None and ruleset.missing and Layer.FILESYSTEM in applied:
        missing.append((Layer.FILESYSTEM, ruleset.missing))
    attempt(Layer.SECCOMP, lambda: _load_seccomp(seccomp_filter))
    return IsolationReport(applied=tuple(applied), missing=tuple(missing))


def _prctl(option: int, arg: int) -> None:
    if _libc_prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def _close_inherited_fds(keep_fds: tuple[int, ...]) -> None:
    keep = set(keep_fds)
    for fd in keep:
        os.fstat(fd)  # a kept descriptor that is not open is a caller bug: EBADF
    # 0/1/2 stay open (on /dev/null) so that nothing the child opens later lands on
    # them and gets written to by a stray print() or C-level diagnostic.
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        if fd not in keep and fd != devnull:
            os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)
    low = 3
    for fd in sorted(fd for fd in keep if fd >= 3):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, _MAX_FD)


def _environment_block() -> tuple[int, int]:
    """Where the kernel put the exec-time environment (what /proc/self/environ shows)."""
    fd = os.open("/proc/self/stat", os.O_RDONLY | os.O_CLOEXEC)
    try:
        line = os.read(fd, 4096)
    finally:
        os.close(fd)
    # Fields 50 and 51 of proc(5) are env_start and env_end; after the ")" that closes
    # the command name (which may itself contain spaces) the list starts at field 3.
    fields = line.rsplit(b")", 1)[1].split()
    return int(fields[47]), int(fields[48])


# A forked child has its parent's address space, so the zygote reads this once, here.
try:
    _ENV_BLOCK: tuple[int, int] | None = _environment_block()
except OSError:
    _ENV_BLOCK = None


def _scrub_environment() -> None:
    # clearenv() empties the C environment (getenv() sees nothing) and posix.environ is
    # the dict os.environ wraps. The strings themselves stay in memory: the exec-time
    # block (what /proc/self/environ shows) and the copies glibc's setenv() made, which
    # it never frees. Zero both, so that a tenant who gets past RestrictedPython still
    # cannot read the supervisor's secrets from memory or /proc/self/environ.
    env_start, env_end = _ENV_BLOCK or _environment_block()
    elsewhere: list[tuple[int, int]] = []
    if ctypes.cast(_environ, ctypes.c_void_p).value:
        index = 0
        while (address := _environ[index]) is not None:
            if not env_start <= address < env_end:
                elsewhere.append((address, int(_libc_strlen(address))))
            index += 1
    if _libc_clearenv() != 0:
        raise OSError(ctypes.get_errno(), "clearenv() failed")
    posix.environ.clear()
    for key in list(os.environ):  # only if os.environ ever stops wrapping posix.environ
        del os.environ[key]
    for address, length in elsewhere:
        ctypes.memset(address, 0, length)
    if env_end > env_start:
        ctypes.memset(env_start, 0, env_end - env_start)


def _isolate_network() -> None:
    # As root a new network namespace is enough; otherwise only a user namespace grants
    # the right to create one. Either way the child is left with a down loopback only.
    reasons = []
    for flags, what in (
        (_CLONE_NEWNET, "unshare(CLONE_NEWNET)"),
        (_CLONE_NEWUSER | _CLONE_NEWNET, "unshare(CLONE_NEWUSER|CLONE_NEWNET)"),
    ):
        if _libc_unshare(ctypes.c_int(flags)) == 0:
            return
        err = ctypes.get_errno()
        if err not in _NAMESPACE_REFUSALS:
            raise OSError(err, f"{what}: {os.strerror(err)}")
        reasons.append(f"{what}: {os.strerror(err)}")
    raise _Refused("; ".join(reasons))


def _set_limit(which: int, soft: int, hard: int | None = None) -> None:
    hard = soft if hard is None else hard
    _, current_hard = resource.getrlimit(which)
    # An unprivileged process may only lower its hard limit, never raise it.
    if current_hard != resource.RLIM_INFINITY:
        hard = min(hard, current_hard)
        soft = min(soft, hard)
    resource.setrlimit(which, (soft, hard))


def _set_rlimits(config: IsolationConfig) -> None:
    _set_limit(resource.RLIMIT_AS, config.memory_bytes)
    _set_limit(resource.RLIMIT_CPU, config.cpu_seconds, config.cpu_seconds + 1)
    _set_limit(resource.RLIMIT_NOFILE, config.open_files)
    _set_limit(resource.RLIMIT_FSIZE, 0)
    _set_limit(resource.RLIMIT_CORE, 0)
    _set_limit(resource.RLIMIT_MEMLOCK, 0)
    _set_limit(resource.RLIMIT_MSGQUEUE, 0)
    if config.uid is not None and Layer.UID in config.layers:
        # Root is exempt from RLIMIT_NPROC, and a shared uid would share the budget, so
        # it only means something for a per-tenant uid.
        _set_limit(resource.RLIMIT_NPROC, config.processes)
    # Every thread's first malloc() reserves a 64 MiB arena of address space, which
    # RLIMIT_AS counts: with one arena, threads cost their stacks only.
    _libc_mallopt(ctypes.c_int(_M_ARENA_MAX), ctypes.c_int(1))


def _drop_privileges(uid: int | None, gid: int | None) -> None:
    if uid is None:
        raise _Refused("no per-tenant uid configured (uid=None)")
    gid = uid if gid is None else gid
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        # EPERM: not root. EINVAL: the id is not mapped in our user namespace (NETNS had
        # to create one because we are not root).
        if exc.errno in (errno.EPERM, errno.EINVAL):
            raise _Refused(f"cannot switch to uid {uid}/gid {gid}: {exc.strerror}") from exc
        raise
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise RuntimeError(f"uid/gid drop to {uid}/{gid} did not take effect")


def _bind_lifetime(parent_pid: int | None) -> None:
    try:
        # Its own session: a signal to the supervisor's process group or terminal does
        # not reach it, and the supervisor can kill the sandbox's group as one.
        os.setsid()
    except PermissionError:
        if os.getsid(0) != os.getpid():
            raise
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    # The parent may have died between fork() and the prctl: then no signal will come.
    ppid = os.getppid()
    orphaned = ppid != parent_pid if parent_pid is not None else ppid == 1
    if orphaned:
        os.kill(os.getpid(), signal.SIGKILL)


def _forbid_privilege_gain() -> None:
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    # Not dumpable: no core file, and /proc/<pid>/mem and ptrace are closed to other
    # processes of the same uid (Yama is not enabled on these kernels).
    _prctl(_PR_SET_DUMPABLE, 0)


def _restrict_filesystem(ruleset: _landlock.Ruleset | None, refusal: str) -> None:
    if ruleset is None:
        raise _Refused(refusal)
    # Landlock requires NO_NEW_PRIVS (or CAP_SYS_ADMIN), even when that layer is off.
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    _landlock.restrict_self(ruleset)


def _load_seccomp(seccomp_filter: object | None) -> None:
    if seccomp_filter is None:
        try:
            seccomp_filter = _seccomp.compile_filter()
        except (ImportError, OSError) as exc:
            raise _Refused(f"libseccomp unavailable: {exc}") from exc
    if not isinstance(seccomp_filter, _seccomp.CompiledFilter):
        raise TypeError(f"seccomp_filter must come from prepare_seccomp(), not {seccomp_filter!r}")
    try:
        _seccomp.load_filter(seccomp_filter)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise _Refused(f"kernel refused the seccomp filter: {exc.strerror}") from exc
        raise
