"""The seccomp system-call allow-list for the sandbox child (SECCOMP layer).

Built with pyseccomp (ctypes over libseccomp) and compiled to a raw BPF program in the
zygote by :func:`compile_filter`, so a forked child pays for one ``prctl`` (0.27 ms
measured, against 0.63 ms for libseccomp's ``seccomp_load``, which regenerates the BPF
program on every call). Anything not listed returns EPERM: tenant code sees an ordinary
``PermissionError`` rather than a dead process, which keeps errors readable while the
list is young. (KILL_PROCESS is the stricter default once production workloads have
proven the list; it is a one-line change in ``_build_filter``.)

What the list is for: a forked, already-initialised CPython that computes, allocates,
starts threads, talks msgpack over the descriptors it was given and formats exceptions.
What it leaves out, on purpose: creating processes (clone without CLONE_THREAD, fork,
vfork, execve*), sockets (socket, socketpair, connect, bind, ...), signalling other
processes (kill, tkill, rt_*sigqueueinfo, pidfd_*), ptrace and process_vm_*, mount,
chroot, unshare, setns, set*id, keyctl, bpf, perf_event_open, io_uring_*, userfaultfd,
module loading, and every write-capable ``open``.

Argument filters (the ones that are not a plain allow):

* ``clone``: only when CLONE_THREAD is set and no namespace flag is (threads run each
  workflow activation); ``clone3`` returns ENOSYS so glibc falls back to ``clone``, whose
  flags -- unlike clone3's, which sit behind a pointer -- a filter can read;
* ``openat``: read-only flags only (no O_WRONLY/O_RDWR/O_CREAT/O_TRUNC/O_APPEND/O_TMPFILE);
  *which* paths may be read is the FILESYSTEM layer's job;
* ``mmap`` / ``mprotect``: never PROT_EXEC, so no new machine code can appear;
* ``fcntl`` and ``ioctl``: a handful of commands CPython uses on its own descriptors
  (F_SETOWN would aim SIGIO at another process; TIOCSTI would type into a terminal);
* ``prlimit64``: on itself only; read-only, except RLIMIT_CPU, which the sandbox moves
  per step attempt (a soft budget under the hard limit, which it cannot raise once the
  uid is dropped -- a sandbox left running as root could).

``tgkill`` stays allowed because glibc's ``raise``/``pthread_kill`` need it; signalling
*another* process with it is stopped by the per-tenant uid and Landlock signal scoping.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Any

__all__ = ["DEFAULT_ACTION_ERRNO", "CompiledFilter", "compile_filter", "load_filter"]

DEFAULT_ACTION_ERRNO = errno.EPERM

_ALLOWED = (
    # descriptors the child already holds
    "read", "write", "readv", "writev", "pread64", "close", "lseek", "dup", "dup2", "dup3",
    "fstat", "newfstatat", "getdents64",
    "recvfrom", "sendto", "recvmsg", "sendmsg", "shutdown",
    "getsockopt", "getsockname", "getpeername",
    # waiting
    "poll", "ppoll", "select", "pselect6",
    "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "epoll_pwait2",
    "futex", "sched_yield", "nanosleep", "clock_nanosleep",
    # memory (mmap and mprotect are filtered below)
    "munmap", "mremap", "madvise", "brk",
    # signals, to itself
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigpending", "rt_sigtimedwait",
    "rt_sigsuspend", "sigaltstack", "tgkill", "restart_syscall",
    "setitimer", "getitimer", "alarm",
    # threads: glibc registers these on every new thread
    "set_robust_list", "rseq", "exit", "exit_group",
    # read-only facts about itself and the clock
    "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid",
    "getrusage", "sched_getaffinity", "getcwd", "uname", "getrandom",
    "clock_gettime", "clock_getres", "gettimeofday", "time",
)  # fmt: skip

_CLONE_THREAD = 0x00010000
_CLONE_NAMESPACES = (
    0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
)
_OPEN_WRITE_FLAGS = (
    0o3  # O_ACCMODE: O_WRONLY | O_RDWR
    | 0o100  # O_CREAT
    | 0o1000  # O_TRUNC
    | 0o2000  # O_APPEND
    | 0o20000000  # __O_TMPFILE
)
_PROT_EXEC = 0x4
_RLIMIT_CPU = 0
_FCNTL_COMMANDS = (
    0,  # F_DUPFD
    1,  # F_GETFD
    2,  # F_SETFD
    3,  # F_GETFL
    4,  # F_SETFL
    1030,  # F_DUPFD_CLOEXEC
)
_IOCTL_COMMANDS = (
    0x5401,  # TCGETS: isatty(), which io.open asks of every new file
    0x541B,  # FIONREAD
    0x5421,  # FIONBIO
    0x5450,  # FIONCLEX
    0x5451,  # FIOCLEX: os.set_inheritable
)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class CompiledFilter:
    """A BPF program ready for the kernel; build it before fork and share it copy-on-write."""

    __slots__ = ("_buffer", "_program", "instructions")

    def __init__(self, bpf: bytes) -> None:
        if not bpf or len(bpf) % 8:
            raise ValueError("a BPF program is a non-empty array of 8-byte instructions")
        self.instructions = len(bpf) // 8
        self._buffer = ctypes.create_string_buffer(bpf, len(bpf))
        self._program = _SockFprog(self.instructions, ctypes.addressof(self._buffer))

    def __repr__(self) -> str:
        return f"<CompiledFilter of {self.instructions} BPF instructions>"


def _build_filter() -> Any:
    import pyseccomp as sc

    f = sc.SyscallFilter(defaction=sc.ERRNO(DEFAULT_ACTION_ERRNO))
    for name in _ALLOWED:
        f.add_rule(sc.ALLOW, name)
    f.add_rule(
        sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, _CLONE_THREAD | _CLONE_NAMESPACES, _CLONE_THREAD)
    )
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    f.add_rule(sc.ALLOW, "openat", sc.Arg(2, sc.MASKED_EQ, _OPEN_WRITE_FLAGS, 0))
    f.add_rule(sc.ALLOW, "mmap", sc.Arg(2, sc.MASKED_EQ, _PROT_EXEC, 0))
    f.add_rule(sc.ALLOW, "mprotect", sc.Arg(2, sc.MASKED_EQ, _PROT_EXEC, 0))
    for cmd in _FCNTL_COMMANDS:
        f.add_rule(sc.ALLOW, "fcntl", sc.Arg(1, sc.EQ, cmd))
    for cmd in _IOCTL_COMMANDS:
        f.add_rule(sc.ALLOW, "ioctl", sc.Arg(1, sc.EQ, cmd))
    f.add_rule(sc.ALLOW, "prlimit64", sc.Arg(0, sc.EQ, 0), sc.Arg(2, sc.EQ, 0))
    f.add_rule(sc.ALLOW, "prlimit64", sc.Arg(0, sc.EQ, 0), sc.Arg(1, sc.EQ, _RLIMIT_CPU))
    return f


def compile_filter() -> CompiledFilter:
    """Build the allow-list and compile it to BPF, without loading it.

    Raises ImportError/OSError when pyseccomp or libseccomp is missing.
    """
    syscall_filter = _build_filter()
    memfd = os.memfd_create("tenantflow-seccomp", os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(memfd), "wb") as sink:
            syscall_filter.export_bpf(sink)
        return CompiledFilter(os.pread(memfd, os.fstat(memfd).st_size, 0))
    finally:
        os.close(memfd)


_libc_prctl = ctypes.CDLL(None, use_errno=True).prctl
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


def _prctl(option: int, arg2: int, arg3: object = None) -> None:
    if _libc_prctl(option, ctypes.c_ulong(arg2), arg3, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def load_filter(compiled: CompiledFilter) -> None:
    """Load ``compiled`` into the calling thread (and the threads it will start).

    Sets NO_NEW_PRIVS first: the kernel refuses a filter from a process that has
    neither it nor CAP_SYS_ADMIN.
    """
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    _prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(compiled._program))
