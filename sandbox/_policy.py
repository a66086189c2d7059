"""The RestrictedPython policy for tenant code, as plain data.

`SandboxPolicy` says which standard-library modules tenant code may import (each one is
exposed as a read-only facade, never as the real module) and the size caps that the
restricted layer enforces. Change a policy with the ``with_*`` helpers, which return a
new frozen instance through `dataclasses.replace`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["DEFAULT_ALLOWED_MODULES", "DEFAULT_POLICY", "FORBIDDEN_MODULES", "SandboxPolicy"]

DEFAULT_ALLOWED_MODULES: tuple[str, ...] = (
    "base64",
    "collections",
    "datetime",
    "decimal",
    "fractions",
    "functools",
    "hashlib",
    "itertools",
    "json",
    "math",
    "random",
    "re",
    "statistics",
    "string",
    "textwrap",
    "uuid",
)
"""Pure standard-library modules tenants may import by default.

Left out on purpose: ``operator`` (``attrgetter``/``methodcaller`` walk attributes
unguarded), ``copy`` (reaches ``__reduce_ex__``), ``time`` (clocks and ``sleep`` belong to
the runtime, not to workflow code), ``enum``, ``typing`` and ``dataclasses`` (they
``eval``/``exec`` strings taken from tenant code).
"""

FORBIDDEN_MODULES: frozenset[str] = frozenset(
    {
        "builtins",
        "code",
        "codeop",
        "copy",
        "copyreg",
        "ctypes",
        "dataclasses",
        "gc",
        "importlib",
        "inspect",
        "io",
        "marshal",
        "multiprocessing",
        "operator",
        "os",
        "pickle",
        "pkgutil",
        "runpy",
        "shutil",
        "signal",
        "socket",
        "subprocess",
        "sys",
        "tenantflow",
        "threading",
        "traceback",
        "types",
        "typing",
    }
)
"""Modules a policy refuses to allow at all: each one is a known way out of the sandbox.

``tenantflow`` is here because the SDK facade is not a standard-library module: it is
always importable and always built from the host's SDK mapping.
"""


@dataclass(frozen=True, slots=True)
class SandboxPolicy:
    """What the RestrictedPython layer lets tenant code do.

    This layer is the first, cheap one; the OS layers (rlimits, namespaces, seccomp) are
    the boundary. The policy is validated when it is built, so a policy that names a
    module from `FORBIDDEN_MODULES` never reaches a sandbox.
    """

    allowed_modules: tuple[str, ...] = DEFAULT_ALLOWED_MODULES
    """Top-level standard-library modules importable by tenant code, each one as a facade
    of its public functions, classes and constants (never the module object itself)."""

    max_source_bytes: int = 256 * 1024
    """Largest accepted tenant source file, in UTF-8 bytes. Compiling is superlinear on
    pathological input, so this bounds the work done before any code runs."""

    max_print_bytes: int = 1024 * 1024
    """Most text (UTF-8 bytes) tenant code may ``print`` per activation; going beyond
    raises `PrintLimitError` in the tenant code that printed."""

    def __post_init__(self) -> None:
        modules: object = self.allowed_modules
        if not isinstance(modules, tuple):
            raise TypeError("allowed_modules must be a tuple of module names")
        for name in self.allowed_modules:
            if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
                raise ValueError(f"allowed_modules: {name!r} is not a public top-level module")
            if name in FORBIDDEN_MODULES:
                raise ValueError(f"allowed_modules: module {name!r} can never be allowed")
        if len(set(self.allowed_modules)) != len(self.allowed_modules):
            raise ValueError("allowed_modules: duplicate module names")
        for field_name in ("max_source_bytes", "max_print_bytes"):
            value = getattr(self, field_name)
            if type(value) is not int or value <= 0:
                raise ValueError(f"{field_name} must be a positive int, got {value!r}")

    def with_allowed_modules(self, *modules: str) -> SandboxPolicy:
        """Return a copy that also allows ``modules`` (existing entries keep their order)."""
        added = tuple(name for name in dict.fromkeys(modules) if name not in self.allowed_modules)
        return replace(self, allowed_modules=self.allowed_modules + added)

    def without_allowed_modules(self, *modules: str) -> SandboxPolicy:
        """Return a copy that no longer allows ``modules``."""
        removed = set(modules)
        kept = tuple(name for name in self.allowed_modules if name not in removed)
        return replace(self, allowed_modules=kept)

    def with_max_source_bytes(self, max_source_bytes: int) -> SandboxPolicy:
        """Return a copy with a different per-file source size cap."""
        return replace(self, max_source_bytes=max_source_bytes)

    def with_max_print_bytes(self, max_print_bytes: int) -> SandboxPolicy:
        """Return a copy with a different per-activation print cap."""
        return replace(self, max_print_bytes=max_print_bytes)


DEFAULT_POLICY = SandboxPolicy()
"""The policy used when none is given."""
