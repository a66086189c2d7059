"""The guard functions and builtins that RestrictedPython-compiled tenant code runs against.

`compile_restricted_exec` rewrites ``a.b`` into ``_getattr_(a, "b")``, ``a[k]`` into
``_getitem_(a, k)``, ``a.b = c`` into ``_write_(a).b = c``, ``print(...)`` into
``_print._call_print(...)`` and so on; this module supplies those names. Every guard
refuses by raising an ordinary exception (AttributeError, TypeError, NotImplementedError)
so that tenant code can catch and report it like any other error.

Everything here runs inside the sandbox process, once per `load_tenant` call.
"""

from __future__ import annotations

import builtins
import collections
import io
import operator
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import CodeType, FrameType, FunctionType, ModuleType, TracebackType
from typing import Any, Final, cast

from RestrictedPython import Guards as _rp_guards
from RestrictedPython.transformer import INSPECT_ATTRIBUTES

from ._facades import ModuleFacade

__all__ = [
    "PrintBudget",
    "PrintFactory",
    "PrintLimitError",
    "WriteGuard",
    "apply",
    "build_builtins",
    "guarded_getattr",
    "guarded_getitem",
    "inplacevar",
    "iter_unpack_sequence",
    "make_tenant_metaclass",
    "unpack_sequence",
]

# RestrictedPython's Guards are untyped; give them their real signatures once, here.
_safer_getattr_raise: Final = cast(Callable[[object, str], object], _rp_guards.safer_getattr_raise)
unpack_sequence: Final = cast(
    Callable[[object, Mapping[str, object], Callable[[object], Iterator[object]]], list[object]],
    _rp_guards.guarded_unpack_sequence,
)
iter_unpack_sequence: Final = cast(
    Callable[
        [object, Mapping[str, object], Callable[[object], Iterator[object]]],
        Iterator[list[object]],
    ],
    _rp_guards.guarded_iter_unpack_sequence,
)

_FORMAT_METHODS: Final = frozenset({"format", "format_map"})
# `mro()` hands out every base class of a host class (enum.Flag behind re.RegexFlag, for
# one), which widens what a tenant can walk for no legitimate use in workflow code.
_BLOCKED_ATTRIBUTES: Final = INSPECT_ATTRIBUTES | _FORMAT_METHODS | {"mro"}
# The interpreter fills these in from its own state: AttributeError.obj is the object
# whose lookup failed, which through a host proxy that delegates __getattr__ is the
# proxied host object (SANDBOX-NOTES 1.7). Other exceptions keep their attributes, so
# an SDK error may well have a readable `name`.
_EXCEPTION_LEAKS: Final = frozenset({"obj", "name", "path"})
_LEAKING_EXCEPTIONS: Final = (AttributeError, NameError, ImportError)
_OPAQUE_TYPES: Final = (ModuleType, FrameType, TracebackType, CodeType)


def guarded_getattr(obj: object, name: str) -> object:
    """``_getattr_``: `safer_getattr_raise` plus the extra refusals of SANDBOX-NOTES 1.8.

    Refuses ``_``-names, the frame/generator/traceback names, ``format``/``format_map`` on
    any object (``collections.UserString`` and friends forward them to `str.format`),
    ``mro``, ``obj``/``name``/``path`` of AttributeError, NameError and ImportError, and
    any read on or of a module, frame, traceback or code object.
    """
    # A str subclass can lie in startswith/__eq__; only an exact str is checked reliably.
    if type(name) is not str:
        raise TypeError("attribute name must be a str")
    if name.startswith("_"):
        raise AttributeError(f'"{name}" is an invalid attribute name because it starts with "_"')
    if name in _BLOCKED_ATTRIBUTES:
        if name in _FORMAT_METHODS:
            raise NotImplementedError(
                f"{name}() walks attributes unguarded and is not allowed in tenant code; "
                "use an f-string"
            )
        raise AttributeError(f'"{name}" is a restricted name in tenant code')
    if isinstance(obj, _OPAQUE_TYPES):
        raise AttributeError(f"tenant code may not read attributes of {type(obj).__name__} objects")
    if name in _EXCEPTION_LEAKS and isinstance(obj, _LEAKING_EXCEPTIONS):
        raise AttributeError(f'"{name}" of {type(obj).__name__} is not readable in tenant code')
    value = _safer_getattr_raise(obj, name)
    if isinstance(value, ModuleType):
        raise AttributeError(
            f'"{name}" is a module, and modules are not reachable from tenant code'
        )
    return value


def guarded_getitem(obj: Any, key: object) -> object:
    """``_getitem_``: a plain subscript that never hands out a module object."""
    value: object = obj[key]
    if isinstance(value, ModuleType):
        raise TypeError("this item is a module, and modules are not reachable from tenant code")
    return value


def tenant_getattr(obj: object, name: str, *default: object) -> object:
    """``getattr`` for tenant code: the same checks as attribute syntax."""
    if len(default) > 1:
        raise TypeError(f"getattr expected at most 3 arguments, got {2 + len(default)}")
    try:
        return guarded_getattr(obj, name)
    except AttributeError:
        if default:
            return default[0]
        raise


def tenant_hasattr(obj: object, name: str) -> bool:
    """``hasattr`` for tenant code: False for whatever ``getattr`` would refuse."""
    try:
        guarded_getattr(obj, name)
    except AttributeError:
        return False
    return True


def apply(func: Callable[..., object], /, *args: object, **kwargs: object) -> object:
    """``_apply_``: the call behind ``f(*args, **kwargs)``; arguments need no guarding here."""
    return func(*args, **kwargs)


_INPLACE_OPERATORS: Final[Mapping[str, Callable[[Any, Any], object]]] = {
    "+=": operator.iadd,
    "-=": operator.isub,
    "*=": operator.imul,
    "/=": operator.itruediv,
    "//=": operator.ifloordiv,
    "%=": operator.imod,
    "**=": operator.ipow,
    "<<=": operator.ilshift,
    ">>=": operator.irshift,
    "&=": operator.iand,
    "^=": operator.ixor,
    "|=": operator.ior,
    "@=": operator.imatmul,
}


def inplacevar(op: str, target: object, value: object) -> object:
    """``_inplacevar_``: ``n += 1`` on a plain name becomes ``n = _inplacevar_("+=", n, 1)``."""
    try:
        function = _INPLACE_OPERATORS[op]
    except KeyError:
        raise ValueError(f"unknown augmented assignment operator {op!r}") from None
    return function(target, value)


# Item and attribute writes on these only store tenant data; they are what ordinary code
# mutates (``counts[key] = ...`` on a defaultdict). Exact types only: a host subclass may
# attach behaviour to writes.
_WRITABLE_TYPES: Final[frozenset[type]] = frozenset(
    {
        dict,
        list,
        collections.ChainMap,
        collections.Counter,
        collections.OrderedDict,
        collections.UserDict,
        collections.UserList,
        collections.defaultdict,
        collections.deque,
    }
)


class _ReadOnly:
    """What `WriteGuard` returns for an object tenant code may not change."""

    __slots__ = ("_kind",)

    _kind: str

    def __init__(self, kind: str) -> None:
        object.__setattr__(self, "_kind", kind)

    def _refuse(self, what: str) -> TypeError:
        return TypeError(
            f"cannot {what} on {self._kind}: tenant code may only change objects of its "
            "own classes, dicts, lists and collections containers"
        )

    def __setattr__(self, name: str, value: object) -> None:
        raise self._refuse(f"assign attribute {name!r}")

    def __delattr__(self, name: str) -> None:
        raise self._refuse(f"delete attribute {name!r}")

    def __setitem__(self, key: object, value: object) -> None:
        raise self._refuse("assign an item")

    def __delitem__(self, key: object) -> None:
        raise self._refuse("delete an item")


class WriteGuard:
    """``_write_``: RestrictedPython's `full_write_guard` with an exact notion of "tenant object".

    `full_write_guard` lets through any object for which ``hasattr(ob, "_guarded_writes")``
    is true, which a host proxy with a catch-all ``__getattr__`` satisfies by accident.
    Here an object is writable only if its class (or the object itself, for class-level
    attributes) was created by this tenant's ``__metaclass__``, or if it is one of the
    plain containers above. Modules, facades and host objects are never writable.
    """

    __slots__ = ("_tenant_classes",)

    def __init__(self, tenant_classes: weakref.WeakSet[type]) -> None:
        self._tenant_classes = tenant_classes

    def __call__(self, ob: object) -> object:
        """Return ``ob`` if tenant code may change it, else a stand-in that refuses writes."""
        kind = type(ob)
        if kind in _WRITABLE_TYPES or kind in self._tenant_classes:
            return ob
        if isinstance(ob, type) and ob in self._tenant_classes:
            return ob
        return _ReadOnly(_describe(ob))


def _describe(ob: object) -> str:
    if isinstance(ob, type):
        return f"class {ob.__qualname__!r}"
    if isinstance(ob, ModuleFacade):
        return repr(ob)
    return f"a {type(ob).__name__!r} object"


def _check_write_name(name: object) -> str:
    if type(name) is not str:
        raise TypeError("attribute name must be a str")
    if name.startswith("_"):
        raise AttributeError(f'"{name}" is an invalid attribute name because it starts with "_"')
    return name


def make_tenant_metaclass(tenant_classes: weakref.WeakSet[type]) -> Callable[..., type]:
    """Build ``__metaclass__``: every tenant ``class`` statement is rewritten to use it.

    It creates the class normally, records it as writable for `WriteGuard` and marks it
    with ``_guarded_writes`` (the RestrictedPython convention, for helpers that check it).
    """

    def tenant_class(
        name: str, bases: tuple[type, ...], namespace: dict[str, object], **keywords: object
    ) -> type:
        # RestrictedPython drops class keywords when it rewrites the class statement; if a
        # release stops doing so, they must still not reach a host __init_subclass__.
        if keywords:
            raise TypeError(f"class {name}: class keyword arguments are not allowed")
        cls = type(name, bases, namespace)
        cls._guarded_writes = True  # type: ignore[attr-defined]
        tenant_classes.add(cls)
        return cls

    return tenant_class


class PrintLimitError(Exception):
    """Raised in tenant code that prints more than `SandboxPolicy.max_print_bytes` in one
    activation."""


class PrintBudget:
    """The per-activation print allowance shared by every ``print`` in one loaded tenant."""

    __slots__ = ("_limit", "_sink", "used")

    def __init__(self, limit: int, sink: Callable[[str], None]) -> None:
        self._limit = limit
        self._sink = sink
        self.used = 0
        """UTF-8 bytes printed since the last `reset`."""

    def reset(self) -> None:
        """Start a new activation with the whole allowance available."""
        self.used = 0

    def emit(self, text: str) -> None:
        """Charge ``text`` and forward it to the sink without its trailing newline."""
        size = len(text.encode("utf-8", "surrogatepass"))
        if self.used + size > self._limit:
            raise PrintLimitError(
                f"print output limit exceeded: at most {self._limit} bytes per activation"
            )
        self.used += size
        self._sink(text.removesuffix("\n"))


class TenantPrinter:
    """What ``_print_`` returns: RestrictedPython makes one per function call.

    ``print(...)`` becomes ``_print._call_print(...)`` and ``printed`` becomes
    ``_print()``, the text this function has printed so far.
    """

    __slots__ = ("_budget", "_parts")

    def __init__(self, budget: PrintBudget) -> None:
        self._budget = budget
        self._parts: list[str] = []

    def _call_print(
        self, *objects: object, sep: str | None = " ", end: str | None = "\n", **kwargs: object
    ) -> None:
        if kwargs.get("file") is not None:
            raise TypeError("print(file=...) is not supported in tenant code")
        unknown = set(kwargs) - {"file", "flush"}
        if unknown:
            raise TypeError(f"print() got an unexpected keyword argument {sorted(unknown)[0]!r}")
        buffer = io.StringIO()
        builtins.print(*objects, sep=sep, end=end, file=buffer)
        text = buffer.getvalue()
        self._budget.emit(text)
        self._parts.append(text)

    def __call__(self) -> str:
        return "".join(self._parts)


class PrintFactory:
    """``_print_``: called as ``_print_(_getattr_)`` at the top of every function."""

    __slots__ = ("_budget",)

    def __init__(self, budget: PrintBudget) -> None:
        self._budget = budget

    def __call__(self, getattr_: object = None) -> TenantPrinter:
        return TenantPrinter(self._budget)


# The wrappers below take the iterator with iter() themselves: the C implementations of
# sorted(), sum() and the like iterate without going through ``_getiter_``
# (RestrictedPython #335). ``_getiter_`` is plain ``iter`` today, so this only keeps
# one iteration path for the day it becomes a real guard.
def _sorted(
    iterable: Iterable[Any], /, *, key: Callable[[Any], Any] | None = None, reverse: bool = False
) -> list[Any]:
    return builtins.sorted(iter(iterable), key=key, reverse=reverse)


_REVERSIBLE_TYPES: Final = (list, tuple, str, bytes, range, dict)


def _reversed(sequence: Any, /) -> Iterator[Any]:
    # reversed() needs a sequence, not an iterator; builtin sequences are taken as they are
    # so that reversed(range(n)) stays lazy.
    items: Any = sequence if type(sequence) in _REVERSIBLE_TYPES else list(iter(sequence))
    result: Iterator[Any] = builtins.reversed(items)
    return result


def _zip(*iterables: Iterable[Any], strict: bool = False) -> Iterator[tuple[Any, ...]]:
    return builtins.zip(*[iter(each) for each in iterables], strict=strict)


def _enumerate(iterable: Iterable[Any], start: int = 0) -> Iterator[tuple[int, Any]]:
    return builtins.enumerate(iter(iterable), start)


def _min(*args: Any, **kwargs: Any) -> Any:
    if len(args) == 1:
        return builtins.min(iter(args[0]), **kwargs)
    return builtins.min(*args, **kwargs)


def _max(*args: Any, **kwargs: Any) -> Any:
    if len(args) == 1:
        return builtins.max(iter(args[0]), **kwargs)
    return builtins.max(*args, **kwargs)


def _sum(iterable: Iterable[Any], /, start: Any = 0) -> Any:
    return builtins.sum(iter(iterable), start)


def _any(iterable: Iterable[object], /) -> bool:
    return builtins.any(iter(iterable))


def _all(iterable: Iterable[object], /) -> bool:
    return builtins.all(iter(iterable))


def _map(function: Callable[..., Any], iterable: Iterable[Any], /, *more: Iterable[Any]) -> Any:
    return builtins.map(function, iter(iterable), *[iter(each) for each in more])


def _filter(function: Callable[[Any], Any] | None, iterable: Iterable[Any], /) -> Any:
    return builtins.filter(function, iter(iterable))


_ITERATING_WRAPPERS: Final[Mapping[str, Callable[..., object]]] = {
    "all": _all,
    "any": _any,
    "enumerate": _enumerate,
    "filter": _filter,
    "map": _map,
    "max": _max,
    "min": _min,
    "reversed": _reversed,
    "sorted": _sorted,
    "sum": _sum,
    "zip": _zip,
}
for _name, _function in _ITERATING_WRAPPERS.items():
    _wrapper = cast(FunctionType, _function)
    _wrapper.__name__ = _wrapper.__qualname__ = _name
    _wrapper.__doc__ = getattr(builtins, _name).__doc__
del _name, _function, _wrapper

# Real types, not iterating wrappers: tenant code needs ``isinstance(x, list)`` and
# ``class Registry(dict)``, and with ``_getiter_ = iter`` a wrapper would add nothing.
_PLAIN_BUILTINS: Final[Mapping[str, object]] = {
    "NotImplemented": NotImplemented,
    "bin": bin,
    "bytes": bytes,
    "classmethod": classmethod,
    "dict": dict,
    "frozenset": frozenset,
    "iter": iter,
    "list": list,
    "next": next,
    "object": object,
    "property": property,
    "set": set,
    "staticmethod": staticmethod,
    "tuple": tuple,
}

# safe_builtins minus these: `id` leaks heap addresses; the guard names belong in the
# globals, where the compiled code looks them up; setattr/delattr are replaced with
# versions that check the attribute name.
_DROPPED_SAFE_BUILTINS: Final = frozenset({"id", "_getattr_", "setattr", "delattr"})


def build_builtins(*, import_: Callable[..., object], write_guard: WriteGuard) -> dict[str, object]:
    """Return the ``__builtins__`` mapping for one loaded tenant."""

    def setattr(obj: object, name: str, value: object, /) -> None:
        builtins.setattr(write_guard(obj), _check_write_name(name), value)

    def delattr(obj: object, name: str, /) -> None:
        builtins.delattr(write_guard(obj), _check_write_name(name))

    safe = cast(dict[str, object], _rp_guards.safe_builtins)
    tenant_builtins = {
        name: value for name, value in safe.items() if name not in _DROPPED_SAFE_BUILTINS
    }
    tenant_builtins.update(_PLAIN_BUILTINS)
    tenant_builtins.update(_ITERATING_WRAPPERS)
    tenant_builtins.update(
        getattr=tenant_getattr,
        hasattr=tenant_hasattr,
        setattr=setattr,
        delattr=delattr,
        __import__=import_,
    )
    return tenant_builtins
