"""Compile a tenant's modules with RestrictedPython and load them in guarded globals.

RestrictedPython is the first, cheap layer of the sandbox, never the boundary: it turns
most mistakes and the known escapes into clear errors before any OS mechanism is
involved, but the boundary is the OS layers around the sandbox process (rlimits,
namespaces, Landlock, seccomp; SPEC section 6). Both functions here run inside the
sandbox process, under its CPU and memory limits: compiling is superlinear on
pathological input (SANDBOX-NOTES 1.2).

::

    files ──compile_tenant──▶ CompiledTenant ──load_tenant(sdk, print_sink)──▶ TenantNamespace
                              (code per module)    exec main.py in guarded globals;
                                                   `import x` → facade, sibling or ImportError
"""

from __future__ import annotations

import importlib
import keyword
import re
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import CodeType, MappingProxyType, ModuleType
from typing import Final

from RestrictedPython.compile import compile_restricted_exec

from ._facades import ModuleFacade, stdlib_facade
from ._guards import (
    PrintBudget,
    PrintFactory,
    PrintLimitError,
    WriteGuard,
    apply,
    build_builtins,
    guarded_getattr,
    guarded_getitem,
    inplacevar,
    iter_unpack_sequence,
    make_tenant_metaclass,
    unpack_sequence,
)
from ._policy import DEFAULT_POLICY, SandboxPolicy

__all__ = [
    "DEFAULT_POLICY",
    "CompiledTenant",
    "PrintLimitError",
    "SandboxPolicy",
    "TenantCompileError",
    "TenantNamespace",
    "compile_tenant",
    "load_tenant",
]

ENTRY_MODULE: Final = "main"
SDK_MODULE: Final = "tenantflow"
_MAX_MESSAGE_CHARS: Final = 300
_ERROR_LINE = re.compile(r"Line (\d+|None): (.*)", re.DOTALL)


class TenantCompileError(Exception):
    """Raised when a tenant file cannot be compiled: a syntax error, a construct the
    restricted language forbids, a file over the size cap, or input that breaks the
    compiler (too deeply nested)."""

    def __init__(self, file: str, line: int | None, message: str) -> None:
        super().__init__(file, line, message)
        self.file = file
        """The tenant file name, such as ``"main.py"``."""
        self.line = line
        """The 1-based line of the first error, when known."""
        self.message = message
        """What is wrong, for the tenant's developer."""

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.file}: {self.message}"
        return f"{self.file}:{self.line}: {self.message}"


@dataclass(frozen=True)
class CompiledTenant:
    """A tenant's modules compiled by `compile_tenant`, ready for `load_tenant`."""

    modules: Mapping[str, CodeType]
    """Module name (the file stem, ``"main"`` for ``main.py``) to its restricted code."""


class TenantNamespace(Mapping[str, object]):
    """What `load_tenant` returns: the public names of the tenant's ``main.py``.

    It is also the handle on the tenant's print allowance: call `reset_print_budget` at
    the start of each activation.
    """

    __slots__ = ("_budget", "_names")

    def __init__(self, names: Mapping[str, object], budget: PrintBudget) -> None:
        self._names = MappingProxyType(dict(names))
        self._budget = budget

    def __getitem__(self, name: str) -> object:
        return self._names[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"TenantNamespace({sorted(self._names)!r})"

    @property
    def print_bytes_used(self) -> int:
        """Bytes printed since the last `reset_print_budget` (or since loading)."""
        return self._budget.used

    def reset_print_budget(self) -> None:
        """Give the tenant its whole `SandboxPolicy.max_print_bytes` again."""
        self._budget.reset()


def compile_tenant(
    files: Mapping[str, str], policy: SandboxPolicy = DEFAULT_POLICY
) -> CompiledTenant:
    """Compile every ``*.py`` file of a tenant with RestrictedPython.

    ``files`` maps file names (``"main.py"``, ``"helpers.py"``) to source text; other
    files (``tenant.toml``) are ignored. Each ``*.py`` file is a module named by its stem.
    Raises `TenantCompileError` for the first file that does not compile.
    """
    if f"{ENTRY_MODULE}.py" not in files:
        raise TenantCompileError(f"{ENTRY_MODULE}.py", None, "a tenant needs a main.py module")
    modules: dict[str, CodeType] = {}
    for filename in sorted(files):
        if filename.endswith(".py"):
            modules[_module_name(filename)] = _compile_file(filename, files[filename], policy)
    return CompiledTenant(modules=MappingProxyType(modules))


def _module_name(filename: str) -> str:
    if "/" in filename or "\\" in filename:
        raise TenantCompileError(
            filename, None, "tenant modules are top-level files; packages are not supported"
        )
    stem = filename.removesuffix(".py")
    if not stem.isidentifier() or keyword.iskeyword(stem) or stem.startswith("_"):
        raise TenantCompileError(filename, None, f"{stem!r} is not a valid tenant module name")
    if stem == SDK_MODULE:
        raise TenantCompileError(filename, None, "a tenant module may not shadow the SDK")
    return stem


def _compile_file(filename: str, source: str, policy: SandboxPolicy) -> CodeType:
    if not isinstance(source, str):
        raise TenantCompileError(filename, None, "source must be text")
    size = len(source.encode("utf-8", "surrogatepass"))
    if size > policy.max_source_bytes:
        raise TenantCompileError(
            filename, None, f"file is {size} bytes; the limit is {policy.max_source_bytes} bytes"
        )
    try:
        # Warnings about tenant code ("is" with a literal) must not depend on the host's
        # warning filters: under `-W error` they would turn into compile failures.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = compile_restricted_exec(source, filename=filename)
    except (KeyboardInterrupt, SystemExit):
        raise
    except SyntaxError as exc:
        # Raised (not collected) by the final compile() step: `return` outside a function.
        raise TenantCompileError(filename, exc.lineno, f"SyntaxError: {exc.msg}") from None
    except RecursionError:
        raise TenantCompileError(filename, None, "code is nested too deeply to compile") from None
    except MemoryError:
        raise TenantCompileError(filename, None, "code is nested too deeply to compile") from None
    except BaseException as exc:
        raise TenantCompileError(
            filename, None, _clip(f"the compiler failed: {type(exc).__name__}: {exc}")
        ) from exc
    if result.errors:
        raise _first_error(filename, result.errors)
    if result.code is None:  # errors and code are exclusive; never trust that blindly
        raise TenantCompileError(filename, None, "the compiler returned no code")
    return result.code


def _first_error(filename: str, errors: Sequence[str]) -> TenantCompileError:
    match = _ERROR_LINE.fullmatch(errors[0])
    line: int | None = None
    message = errors[0]
    if match is not None:
        line = None if match[1] == "None" else int(match[1])
        message = match[2]
    if len(errors) > 1:
        message = f"{_clip(message)} (and {len(errors) - 1} more)"
    return TenantCompileError(filename, line, _clip(message))


def _clip(text: str) -> str:
    # SyntaxError reports quote the whole statement, which may be megabytes of one line.
    if len(text) <= _MAX_MESSAGE_CHARS:
        return text
    return text[: _MAX_MESSAGE_CHARS - 1] + "…"


def load_tenant(
    compiled: CompiledTenant,
    *,
    sdk: Mapping[str, object],
    print_sink: Callable[[str], None],
    policy: SandboxPolicy = DEFAULT_POLICY,
) -> TenantNamespace:
    """Execute the tenant's ``main`` module in guarded globals and return its public names.

    ``import tenantflow`` gives a facade exposing exactly ``sdk``; sibling modules are
    executed on first import, once per call; the policy's allowed modules are facades;
    any other import raises ImportError. ``print()`` in tenant code calls ``print_sink``
    once per call with the printed text, without its trailing newline. Exceptions raised
    by the tenant's module code propagate unchanged.
    """
    loader = _TenantLoader(compiled, sdk=sdk, print_sink=print_sink, policy=policy)
    main_globals = loader.load(ENTRY_MODULE)
    public = {name: value for name, value in main_globals.items() if not name.startswith("_")}
    return TenantNamespace(public, loader.budget)


def _checked_sdk(sdk: Mapping[str, object]) -> dict[str, object]:
    members = dict(sdk)
    for name, value in members.items():
        if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
            raise ValueError(f"sdk: {name!r} is not a public attribute name")
        if isinstance(value, ModuleType):
            raise ValueError(f"sdk: {name!r} is a module; expose its functions instead")
    return members


class _TenantLoader:
    """The import system of one `load_tenant` call."""

    def __init__(
        self,
        compiled: CompiledTenant,
        *,
        sdk: Mapping[str, object],
        print_sink: Callable[[str], None],
        policy: SandboxPolicy,
    ) -> None:
        self._code = compiled.modules
        self._allowed = frozenset(policy.allowed_modules)
        self._sdk = ModuleFacade(SDK_MODULE, MappingProxyType(_checked_sdk(sdk)))
        self._stdlib: dict[str, ModuleFacade] = {}
        self._modules: dict[str, tuple[ModuleFacade, dict[str, object]]] = {}
        self.budget = PrintBudget(policy.max_print_bytes, print_sink)
        tenant_classes: weakref.WeakSet[type] = weakref.WeakSet()
        write_guard = WriteGuard(tenant_classes)
        self._builtins = build_builtins(import_=self._import, write_guard=write_guard)
        self._guards: dict[str, object] = {
            "__metaclass__": make_tenant_metaclass(tenant_classes),
            "_apply_": apply,
            "_getattr_": guarded_getattr,
            "_getitem_": guarded_getitem,
            "_getiter_": iter,
            "_inplacevar_": inplacevar,
            "_iter_unpack_sequence_": iter_unpack_sequence,
            "_print_": PrintFactory(self.budget),
            "_unpack_sequence_": unpack_sequence,
            "_write_": write_guard,
        }

    def load(self, name: str) -> dict[str, object]:
        """Execute tenant module ``name`` (once) and return its globals."""
        if name not in self._modules:
            self._execute(name)
        return self._modules[name][1]

    def _execute(self, name: str) -> None:
        module_globals: dict[str, object] = {
            "__builtins__": self._builtins,
            "__name__": name,
            **self._guards,
        }
        # Registered before running, as sys.modules is, so that a circular import sees
        # the partly initialised module instead of running it twice.
        self._modules[name] = (ModuleFacade(name, module_globals), module_globals)
        try:
            exec(self._code[name], module_globals)
        except BaseException:
            del self._modules[name]
            raise

    def _import(
        self,
        name: str,
        module_globals: object = None,
        module_locals: object = None,
        fromlist: object = None,
        level: int = 0,
    ) -> object:
        if type(name) is not str:
            raise ImportError("module name must be a str")
        if type(fromlist) is list:
            # Only C code calls __import__ with a list: PyImport_Import (datetime.strptime
            # importing _strptime, re.sub importing re) passes [] and the frame's globals,
            # uses the call only for its side effect and then reads sys.modules itself.
            # The import statement always passes a tuple or None.
            importlib.import_module(name)
            return None
        if level != 0:
            raise ImportError(
                "relative imports are not allowed in tenant code; import sibling modules by name"
            )
        if name == SDK_MODULE:
            return self._sdk
        if name in self._code:
            if name not in self._modules:
                self._execute(name)
            return self._modules[name][0]
        if name in self._allowed:
            facade = self._stdlib.get(name)
            if facade is None:
                facade = self._stdlib[name] = stdlib_facade(name)
            return facade
        raise ImportError(f"module {name!r} is not allowed in tenant code")
