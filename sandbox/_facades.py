"""Read-only stand-ins for modules: what ``import json`` or ``import tenantflow`` binds.

Tenant code never receives a real module object. A real module's attributes lead to
other modules (``json.decoder``, ``datetime.sys``), and its functions and classes carry
``__globals__`` full of them. A `ModuleFacade` holds only a vetted table of members:

- for an allowed standard-library module, the names listed in `_MEMBERS` (audited one by
  one: what each member's public attributes and behaviour reach), minus `_GADGETS`, minus
  any value that is itself a module;
- for ``tenantflow``, exactly the SDK mapping the host passes to `load_tenant`;
- for a tenant's own sibling module, that module's public globals, read live so that
  circular imports behave as in Python.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType, ModuleType
from typing import Final

__all__ = ["ModuleFacade", "stdlib_facade"]


class ModuleFacade:
    """A read-only object whose attributes are exactly the public keys of ``members``.

    The facade deliberately answers no ``_``-name, ``__name__`` included: when
    ``from json import decoder`` finds no ``decoder`` member, CPython's IMPORT_FROM falls
    back to ``sys.modules[f"{module.__name__}.decoder"]``, which would hand out the real
    ``json.decoder`` module.
    """

    __slots__ = ("_facade_label", "_facade_members")

    _facade_label: str
    _facade_members: Mapping[str, object]

    def __init__(self, label: str, members: Mapping[str, object]) -> None:
        object.__setattr__(self, "_facade_label", label)
        object.__setattr__(self, "_facade_members", members)

    def __getattr__(self, name: str) -> object:
        if not name.startswith("_"):
            try:
                return self._facade_members[name]
            except KeyError:
                pass
        raise AttributeError(f"module {self._facade_label!r} has no attribute {name!r}")

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"module {self._facade_label!r} is read-only in tenant code")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"module {self._facade_label!r} is read-only in tenant code")

    def __dir__(self) -> list[str]:
        return sorted(name for name in self._facade_members if not name.startswith("_"))

    def __repr__(self) -> str:
        return f"<module {self._facade_label!r} (tenant facade)>"


# Members that walk attributes or evaluate strings on the caller's behalf. A module added
# to a policy without an audited entry in _MEMBERS still never exposes these.
_GADGETS: Final = frozenset(
    {
        "Formatter",  # string: Formatter.get_field walks "{0.__class__}"
        "Template",  # string: Zope declares it private; f-strings cover the need
        "UserString",  # collections: .format() forwards to str.format
        "attrgetter",  # operator: unguarded attribute walk (SANDBOX-NOTES 1.6, PR #330)
        "methodcaller",
        "get_type_hints",  # typing: eval()s string annotations in the function's globals
        "singledispatch",  # functools: register() calls get_type_hints
        "singledispatchmethod",
        "update_wrapper",  # functools: updated=("__globals__",) merges a host function's
        "wraps",  # globals into the tenant module's globals
        "total_ordering",  # functools: setattr()s dunders on any class, host ones included
        "DEBUG",  # re: compiling with it prints to the process's real stdout
        "TEMPLATE",  # re: deprecated, warns
        "template",
    }
)

_ALL_PUBLIC: Final = ("*",)
"""`_MEMBERS` value for C modules made only of functions and numbers (math, itertools)."""

_MEMBERS: Final[Mapping[str, tuple[str, ...]]] = {
    "base64": (
        "a85decode",
        "a85encode",
        "b16decode",
        "b16encode",
        "b32decode",
        "b32encode",
        "b32hexdecode",
        "b32hexencode",
        "b64decode",
        "b64encode",
        "b85decode",
        "b85encode",
        "decodebytes",
        "encodebytes",
        "standard_b64decode",
        "standard_b64encode",
        "urlsafe_b64decode",
        "urlsafe_b64encode",
    ),
    "collections": (
        "ChainMap",
        "Counter",
        "OrderedDict",
        "UserDict",
        "UserList",
        "defaultdict",
        "deque",
        "namedtuple",
    ),
    "datetime": (
        "MAXYEAR",
        "MINYEAR",
        "UTC",
        "date",
        "datetime",
        "time",
        "timedelta",
        "timezone",
        "tzinfo",
    ),
    # No setcontext() or the shared *Context objects: they would change decimal
    # arithmetic for the host code of this process too.
    "decimal": (
        "Clamped",
        "Context",
        "ConversionSyntax",
        "Decimal",
        "DecimalException",
        "DecimalTuple",
        "DivisionByZero",
        "DivisionImpossible",
        "DivisionUndefined",
        "FloatOperation",
        "Inexact",
        "InvalidContext",
        "InvalidOperation",
        "MAX_EMAX",
        "MAX_PREC",
        "MIN_EMIN",
        "MIN_ETINY",
        "Overflow",
        "ROUND_05UP",
        "ROUND_CEILING",
        "ROUND_DOWN",
        "ROUND_FLOOR",
        "ROUND_HALF_DOWN",
        "ROUND_HALF_EVEN",
        "ROUND_HALF_UP",
        "ROUND_UP",
        "Rounded",
        "Subnormal",
        "Underflow",
        "getcontext",
        "localcontext",
    ),
    "fractions": ("Fraction",),
    "functools": (
        "cache",
        "cached_property",
        "cmp_to_key",
        "lru_cache",
        "partial",
        "partialmethod",
        "reduce",
    ),
    # No file_digest(): it reads from a file object.
    "hashlib": (
        "algorithms_available",
        "algorithms_guaranteed",
        "blake2b",
        "blake2s",
        "md5",
        "new",
        "pbkdf2_hmac",
        "sha1",
        "sha224",
        "sha256",
        "sha384",
        "sha3_224",
        "sha3_256",
        "sha3_384",
        "sha3_512",
        "sha512",
        "shake_128",
        "shake_256",
    ),
    "itertools": _ALL_PUBLIC,
    # No dump()/load(): they take file objects.
    "json": ("JSONDecodeError", "JSONDecoder", "JSONEncoder", "dumps", "loads"),
    "math": _ALL_PUBLIC,
    "random": (
        "Random",
        "SystemRandom",
        "betavariate",
        "choice",
        "choices",
        "expovariate",
        "gammavariate",
        "gauss",
        "getrandbits",
        "getstate",
        "lognormvariate",
        "normalvariate",
        "paretovariate",
        "randbytes",
        "randint",
        "random",
        "randrange",
        "sample",
        "seed",
        "setstate",
        "shuffle",
        "triangular",
        "uniform",
        "vonmisesvariate",
        "weibullvariate",
    ),
    "re": (
        "A",
        "ASCII",
        "DOTALL",
        "I",
        "IGNORECASE",
        "L",
        "LOCALE",
        "M",
        "MULTILINE",
        "Match",
        "NOFLAG",
        "Pattern",
        "RegexFlag",
        "S",
        "U",
        "UNICODE",
        "VERBOSE",
        "X",
        "compile",
        "error",
        "escape",
        "findall",
        "finditer",
        "fullmatch",
        "match",
        "purge",
        "search",
        "split",
        "sub",
        "subn",
    ),
    "statistics": (
        "NormalDist",
        "StatisticsError",
        "correlation",
        "covariance",
        "fmean",
        "geometric_mean",
        "harmonic_mean",
        "linear_regression",
        "mean",
        "median",
        "median_grouped",
        "median_high",
        "median_low",
        "mode",
        "multimode",
        "pstdev",
        "pvariance",
        "quantiles",
        "stdev",
        "variance",
    ),
    "string": (
        "ascii_letters",
        "ascii_lowercase",
        "ascii_uppercase",
        "capwords",
        "digits",
        "hexdigits",
        "octdigits",
        "printable",
        "punctuation",
        "whitespace",
    ),
    "textwrap": ("TextWrapper", "dedent", "fill", "indent", "shorten", "wrap"),
    # No uuid1()/getnode(): they may run ifconfig/ip in a subprocess to find a MAC address.
    "uuid": (
        "NAMESPACE_DNS",
        "NAMESPACE_OID",
        "NAMESPACE_URL",
        "NAMESPACE_X500",
        "SafeUUID",
        "UUID",
        "uuid3",
        "uuid4",
        "uuid5",
    ),
}

# Positional index of the ``flags`` parameter of each re function that takes one.
_RE_FLAGS_POSITION: Final[Mapping[str, int]] = {
    "compile": 1,
    "findall": 2,
    "finditer": 2,
    "fullmatch": 2,
    "match": 2,
    "search": 2,
    "split": 3,
    "sub": 4,
    "subn": 4,
}


def _refusing_re_debug(function: Callable[..., object], position: int) -> Callable[..., object]:
    # re.DEBUG can also be passed as the plain int 128, so the facade cannot just leave
    # the constant out: check the value on every call.
    @functools.wraps(function)
    def wrapper(*args: object, **kwargs: object) -> object:
        flags = (
            kwargs["flags"] if "flags" in kwargs else args[position] if len(args) > position else 0
        )
        if isinstance(flags, int) and int(flags) & re.DEBUG:
            raise ValueError("re.DEBUG is not allowed in tenant code")
        return function(*args, **kwargs)

    return wrapper


def _public_names(module: ModuleType) -> tuple[str, ...]:
    exported = getattr(module, "__all__", None)
    if exported is not None:
        return tuple(exported)
    # Without __all__, only what the module defines itself: its imports (uuid's os, sys,
    # platform) are not its API.
    return tuple(
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and getattr(value, "__module__", module.__name__) == module.__name__
    )


def _frozen(value: object) -> object:
    # Shared constants such as hashlib.algorithms_available are mutable; a tenant must not
    # change them under the host.
    if type(value) is set:
        return frozenset(value)
    if type(value) is list:
        return tuple(value)
    if type(value) is dict:
        return MappingProxyType(dict(value))
    return value


@functools.cache
def _stdlib_members(module_name: str) -> Mapping[str, object]:
    module = importlib.import_module(module_name)
    names = _MEMBERS.get(module_name)
    if names == _ALL_PUBLIC:
        names = tuple(name for name in dir(module) if not name.startswith("_"))
    elif names is None:
        names = _public_names(module)
    members: dict[str, object] = {}
    for name in names:
        if name.startswith("_") or name in _GADGETS:
            continue
        try:
            value = getattr(module, name)
        except AttributeError:
            continue  # build-dependent members (hashlib's OpenSSL extras)
        if isinstance(value, ModuleType):
            continue
        if module_name == "re" and name in _RE_FLAGS_POSITION and callable(value):
            value = _refusing_re_debug(value, _RE_FLAGS_POSITION[name])
        members[name] = _frozen(value)
    return MappingProxyType(members)


def stdlib_facade(module_name: str) -> ModuleFacade:
    """Return a facade of the standard-library module ``module_name`` (a top-level name
    the policy allows); unlisted modules expose their ``__all__`` minus `_GADGETS`."""
    return ModuleFacade(module_name, _stdlib_members(module_name))
