"""Landlock through raw system calls (ctypes), for the sandbox child's FILESYSTEM layer.

Python 3.11 has no Landlock binding and the PyPI ``landlock`` package only knows the
filesystem half (ABI 1), so this module speaks to the three system calls directly:
``landlock_create_ruleset`` (444), ``landlock_add_rule`` (445) and
``landlock_restrict_self`` (446) -- the same numbers on every architecture.

One ruleset handles every access right the running kernel knows:

* filesystem: all of them (execute, write, read, directory changes, ``refer``,
  ``truncate``, ``ioctl_dev``); only ``readable_paths`` get read rights, everything else is
  denied with EACCES;
* network (ABI >= 4): TCP bind and connect, with no port rule, so both are denied;
* scoping (ABI >= 6): signals and abstract unix sockets may not leave the domain, so the
  sandbox cannot signal the supervisor or another tenant, nor reach an abstract socket.

The ruleset is built in two steps because of the order in the child (SANDBOX-NOTES 2.8):
:func:`build_ruleset` opens the readable paths while the child still has its original
credentials (a per-tenant uid may not be allowed to open them, and after the uid drop it
could not say so), and :func:`restrict_self` enforces it once ``NO_NEW_PRIVS`` is set.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from dataclasses import dataclass

__all__ = ["LandlockUnavailable", "Ruleset", "abi_version", "build_ruleset", "restrict_self"]

_SYS_CREATE_RULESET = 444
_SYS_ADD_RULE = 445
_SYS_RESTRICT_SELF = 446
_CREATE_RULESET_VERSION = 1 << 0
_RULE_PATH_BENEATH = 1

_FS_READ_FILE = 1 << 2
_FS_READ_DIR = 1 << 3
# Rights 0..12 (execute, write, read, make/remove ...) exist since ABI 1; execute is
# handled and never granted. REFER came with 2, TRUNCATE with 3, IOCTL_DEV with 5.
_FS_ABI1 = (1 << 13) - 1
_FS_REFER = 1 << 13
_FS_TRUNCATE = 1 << 14
_FS_IOCTL_DEV = 1 << 15
_NET_BIND_TCP = 1 << 0
_NET_CONNECT_TCP = 1 << 1
_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
_SCOPE_SIGNAL = 1 << 1

# ABI at which the kernel has everything this module asks for (network rules: 4,
# scoping: 6). Older kernels get the subset they know, reported as partial.
FULL_ABI = 6

# Resolved at import, in the zygote, so that a forked child does not pay for dlsym().
_libc_syscall = ctypes.CDLL(None, use_errno=True).syscall


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    # The kernel declares this struct __attribute__((packed)): 12 bytes, not 16.
    _pack_ = 1
    _fields_ = [
        ("allowed_access", ctypes.c_uint64),
        ("parent_fd", ctypes.c_int32),
    ]


class LandlockUnavailable(Exception):
    """Raised when the kernel has no usable Landlock (not built in, or disabled at boot)."""


@dataclass(frozen=True, slots=True)
class Ruleset:
    """A populated, not yet enforced Landlock ruleset (an fd owned by the caller)."""

    fd: int
    abi: int
    missing: str
    """What this kernel's ABI cannot enforce ('' when everything is covered)."""


def _syscall(number: int, *args: object) -> int:
    ctypes.set_errno(0)
    result = int(_libc_syscall(ctypes.c_long(number), *args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def abi_version() -> int:
    """The Landlock ABI of the running kernel; raises :class:`LandlockUnavailable`."""
    try:
        return _syscall(
            _SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION)
        )
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
            raise LandlockUnavailable(f"kernel has no Landlock ({exc.strerror})") from exc
        raise


def _handled_fs(abi: int) -> int:
    rights = _FS_ABI1
    if abi >= 2:
        rights |= _FS_REFER
    if abi >= 3:
        rights |= _FS_TRUNCATE
    if abi >= 5:
        rights |= _FS_IOCTL_DEV
    return rights


def build_ruleset(readable_paths: tuple[str, ...]) -> Ruleset:
    """Create a ruleset denying every handled right except reading ``readable_paths``.

    A path that does not exist raises (it is a configuration error, not a host refusal).
    """
    abi = abi_version()
    attr = _RulesetAttr(handled_access_fs=_handled_fs(abi))
    size = 8  # ABI 1..3 only know the first field; passing more would be E2BIG.
    missing = []
    if abi >= 4:
        attr.handled_access_net = _NET_BIND_TCP | _NET_CONNECT_TCP
        size = 16
    else:
        missing.append("TCP bind/connect")
    if abi >= 6:
        attr.scoped = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL
        size = 24
    else:
        missing.append("signal and abstract-unix scoping")
    fd = _syscall(
        _SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)
    )
    try:
        for path in readable_paths:
            _allow_read(fd, path)
    except BaseException:
        os.close(fd)
        raise
    reason = f"Landlock ABI {abi} cannot enforce: {', '.join(missing)}" if missing else ""
    return Ruleset(fd=fd, abi=abi, missing=reason)


def _allow_read(ruleset_fd: int, path: str) -> None:
    path_fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        # READ_DIR on a regular file is EINVAL: the kernel only accepts rights that make
        # sense for the object the rule is attached to.
        is_dir = stat.S_ISDIR(os.fstat(path_fd).st_mode)
        rule = _PathBeneathAttr(
            allowed_access=_FS_READ_FILE | (_FS_READ_DIR if is_dir else 0),
            parent_fd=path_fd,
        )
        _syscall(
            _SYS_ADD_RULE,
            ctypes.c_int(ruleset_fd),
            ctypes.c_int(_RULE_PATH_BENEATH),
            ctypes.byref(rule),
            ctypes.c_uint32(0),
        )
    finally:
        os.close(path_fd)


def restrict_self(ruleset: Ruleset) -> None:
    """Enforce ``ruleset`` on the calling thread and its future threads; closes its fd.

    The caller must have set ``NO_NEW_PRIVS`` (or hold CAP_SYS_ADMIN), as for seccomp.
    """
    try:
        _syscall(_SYS_RESTRICT_SELF, ctypes.c_int(ruleset.fd), ctypes.c_uint32(0))
    finally:
        os.close(ruleset.fd)
