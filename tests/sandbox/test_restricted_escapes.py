"""Known RestrictedPython escapes, each pinned to the safe outcome this layer gives it.

One row per payload: either compiling refuses it (`Compile`) or running it raises a
specific exception (`Raises`). The reachability test at the end walks every attribute
chain tenant code can follow from its builtins and facades and checks that none ends
at a module, frame, code or traceback object, or at a module's globals.
"""

from __future__ import annotations

import json
import numbers
import string
import sys
import types
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import pytest

from sandbox._facades import stdlib_facade
from sandbox._guards import WriteGuard, build_builtins, guarded_getattr
from sandbox._policy import DEFAULT_POLICY
from sandbox._restricted import TenantCompileError, compile_tenant, load_tenant


class _Secret:
    token = "host-only"


class _HostProxy:
    """A host object that delegates attribute reads, like an SDK binding proxy."""

    def __init__(self, inner: object) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


class _WorkflowEntrypoint:
    def run(self) -> str:
        return "host"


SDK: Mapping[str, object] = {
    "WorkflowEntrypoint": _WorkflowEntrypoint,
    "proxy": _HostProxy(_Secret()),
    "formatter": string.Formatter(),
}


@dataclass(frozen=True)
class Compile:
    """Compiling must fail with a message containing ``fragment``."""

    fragment: str


@dataclass(frozen=True)
class Raises:
    """Loading must raise ``error`` with a message containing ``fragment``."""

    error: type[BaseException]
    fragment: str


@dataclass(frozen=True)
class Escape:
    source: str
    outcome: Compile | Raises
    files: Mapping[str, str] = field(default_factory=dict)


GENERATOR = "def g():\n    yield 1\n"
FAKE_STR = "class FakeStr(str):\n    def startswith(self, prefix):\n        return False\n"
CATCH_ATTRIBUTE_ERROR = (
    "from tenantflow import proxy\ntry:\n    proxy.missing\nexcept AttributeError as e:\n"
)

ESCAPES: dict[str, Escape] = {
    # --- introspection walks -------------------------------------------------------------
    "subclasses-walk": Escape(
        "x = ().__class__.__base__.__subclasses__()",
        Compile('"__subclasses__" is an invalid attribute name'),
    ),
    "subclasses-walk-via-getattr": Escape(
        "x = getattr(getattr((), '__class__'), '__base__')",
        Raises(AttributeError, 'invalid attribute name because it starts with "_"'),
    ),
    "generator-gi-frame-syntax (CVE-2023-37271)": Escape(
        GENERATOR + "x = g().gi_frame", Compile('"gi_frame" is a restricted name')
    ),
    "frame-f-back-syntax": Escape(
        GENERATOR + "x = g().f_back.f_globals", Compile("is a restricted name")
    ),
    "generator-gi-frame-via-getattr": Escape(
        GENERATOR + "x = getattr(g(), 'gi_frame')",
        Raises(AttributeError, '"gi_frame" is a restricted name'),
    ),
    "genexpr-gi-frame-via-getattr": Escape(
        "x = getattr((i for i in [1]), 'gi' + '_frame')",
        Raises(AttributeError, '"gi_frame" is a restricted name'),
    ),
    "generator-gi-code-via-getattr": Escape(
        GENERATOR + "x = getattr(g(), 'gi_code')",
        Raises(AttributeError, '"gi_code" is a restricted name'),
    ),
    "nfkc-normalised-gi-frame": Escape(
        GENERATOR + "x = g().\uff47i_frame",  # the parser folds fullwidth g to "gi_frame"
        Compile('"gi_frame" is a restricted name'),
    ),
    "fullwidth-underscore-getattr": Escape(
        "x = getattr((), '\uff3f\uff3fclass\uff3f\uff3f')",  # getattr does not fold
        Raises(AttributeError, "'tuple' object has no attribute"),
    ),
    "function-globals": Escape("f = lambda: 1\nx = f.__globals__", Compile('"__globals__"')),
    "exception-traceback": Escape(
        "try:\n    1 / 0\nexcept Exception as e:\n    x = e.__traceback__",
        Compile('"__traceback__" is an invalid attribute name'),
    ),
    "fstring-dunder": Escape("x = f'{().__class__}'", Compile('"__class__" is an invalid')),
    "random-instance-class": Escape(
        "import random\nx = random.Random().__class__", Compile('"__class__" is an invalid')
    ),
    "random-instance-class-via-getattr": Escape(
        "import random\nx = getattr(random.Random(), '__class__')",
        Raises(AttributeError, "starts with"),
    ),
    "random-class-mro": Escape(
        "import random\nx = random.Random.mro()", Raises(AttributeError, '"mro" is a restricted')
    ),
    "str-mro": Escape("x = str.mro()", Raises(AttributeError, '"mro" is a restricted')),
    # --- format strings (CVE-2023-41039) ---------------------------------------------------
    "str-format-attribute-walk": Escape(
        "x = '{0.__class__}'.format(1)", Raises(NotImplementedError, "format() walks")
    ),
    "str-format-unbound": Escape(
        "x = str.format('{0.__class__}', 1)", Raises(NotImplementedError, "format() walks")
    ),
    "str-format-map": Escape(
        "x = '{a.__class__}'.format_map({'a': 1})",
        Raises(NotImplementedError, "format_map() walks"),
    ),
    "format-via-getattr": Escape(
        "f = getattr('{0.__class__}', 'format')", Raises(NotImplementedError, "format() walks")
    ),
    "string-formatter-facade": Escape(
        "import string\nf = string.Formatter()",
        Raises(AttributeError, "module 'string' has no attribute 'Formatter'"),
    ),
    "string-formatter-from-import": Escape(
        "from string import Formatter", Raises(ImportError, "cannot import name 'Formatter'")
    ),
    "string-formatter-get-field (CVE-2026-76825)": Escape(
        "from tenantflow import formatter\nx = formatter.get_field('0.__class__', (1,), {})",
        Raises(NotImplementedError, "string.Formatter methods"),
    ),
    "userstring-format": Escape(
        "from collections import UserString", Raises(ImportError, "cannot import name")
    ),
    # --- getattr bypasses ------------------------------------------------------------------
    "fake-str-getattr (PR #282)": Escape(
        FAKE_STR + "x = getattr(1, FakeStr('__class__'))",
        Raises(TypeError, "attribute name must be a str"),
    ),
    "fake-str-hasattr": Escape(
        FAKE_STR + "x = hasattr(1, FakeStr('__class__'))",
        Raises(TypeError, "attribute name must be a str"),
    ),
    "fake-str-setattr": Escape(
        FAKE_STR + "class C:\n    pass\nsetattr(C, FakeStr('__setattr__'), print)",
        Raises(TypeError, "attribute name must be a str"),
    ),
    "setattr-dunder-on-tenant-class": Escape(
        "class C:\n    pass\nsetattr(C, '__getattr__', lambda self, n: n)",
        Raises(AttributeError, '"__getattr__" is an invalid attribute name'),
    ),
    "delattr-dunder": Escape(
        "class C:\n    pass\ndelattr(C(), '__class__')", Raises(AttributeError, "starts with")
    ),
    # --- exception attribute leaks (CVE-2024-47532 and SANDBOX-NOTES 1.7) -------------------
    "attribute-error-obj": Escape(
        CATCH_ATTRIBUTE_ERROR + "    x = e.obj",
        Raises(AttributeError, '"obj" of AttributeError is not readable'),
    ),
    "attribute-error-obj-via-getattr": Escape(
        CATCH_ATTRIBUTE_ERROR + "    x = getattr(e, 'obj')",
        Raises(AttributeError, '"obj" of AttributeError is not readable'),
    ),
    "attribute-error-name": Escape(
        CATCH_ATTRIBUTE_ERROR + "    x = e.name",
        Raises(AttributeError, '"name" of AttributeError is not readable'),
    ),
    "name-error-name": Escape(
        "try:\n    undefined\nexcept NameError as e:\n    x = e.name",
        Raises(AttributeError, '"name" of NameError is not readable'),
    ),
    "import-error-path": Escape(
        "try:\n    import os\nexcept ImportError as e:\n    x = e.path",
        Raises(AttributeError, '"path" of ImportError is not readable'),
    ),
    # --- CVEs fixed by the compiler --------------------------------------------------------
    "try-except-star (CVE-2025-22153)": Escape(
        "try:\n    pass\nexcept* ValueError:\n    pass", Compile("TryStar statements")
    ),
    "posonly-getattr-shadow (CVE-2026-55830)": Escape(
        "def f(_getattr_, /):\n    return _getattr_", Compile('"_getattr_" is an invalid')
    ),
    "posonly-write-shadow (CVE-2026-55830)": Escape(
        "def f(_write_, /, x=1):\n    x.y = 1", Compile('"_write_" is an invalid')
    ),
    "lambda-guard-shadow": Escape("f = lambda _getiter_: 1", Compile('"_getiter_"')),
    "global-guard-rebind": Escape(
        "def f():\n    global _write_\n    _write_ = lambda o: o", Compile('"_write_"')
    ),
    "except-as-guard": Escape(
        "try:\n    pass\nexcept Exception as _getattr_:\n    pass", Compile('"_getattr_"')
    ),
    "import-as-guard": Escape("import json as _getattr_", Compile('"_getattr_"')),
    "metaclass-keyword": Escape(
        "class C(metaclass=object):\n    pass", Compile('"metaclass" is not allowed')
    ),
    "def-dunder-getattr": Escape(
        "class C:\n    def __getattr__(self, name):\n        return 1",
        Compile('"__getattr__" is an invalid variable name'),
    ),
    "async-def": Escape("async def f():\n    pass", Compile("AsyncFunctionDef")),
    "match-statement": Escape("match 1:\n    case 1:\n        pass", Compile("Match")),
    "exec-call": Escape("exec('import os')", Compile("Exec calls are not allowed")),
    "eval-call": Escape("eval('1')", Compile("Eval calls are not allowed")),
    "breakpoint": Escape("breakpoint()", Compile('"breakpoint" is a reserved name')),
    "builtins-name": Escape("x = builtins.open", Compile('"builtins" is a reserved name')),
    "dunder-builtins": Escape("x = __builtins__['open']", Compile('"__builtins__"')),
    "dunder-import-call": Escape("x = __import__('os')", Compile('"__import__" is an invalid')),
    "from-import-private-name": Escape(
        "from json import _default_encoder", Compile('"_default_encoder"')
    ),
    # --- imports -----------------------------------------------------------------------------
    "import-os": Escape("import os", Raises(ImportError, "module 'os' is not allowed")),
    "import-sys": Escape("import sys", Raises(ImportError, "module 'sys' is not allowed")),
    "import-os-path": Escape(
        "import os.path", Raises(ImportError, "module 'os.path' is not allowed")
    ),
    "from-os-import": Escape(
        "from os import system", Raises(ImportError, "module 'os' is not allowed")
    ),
    "import-operator (PR #330)": Escape(
        "import operator", Raises(ImportError, "module 'operator' is not allowed")
    ),
    "from-operator-attrgetter": Escape(
        "from operator import attrgetter", Raises(ImportError, "module 'operator' is not")
    ),
    "import-importlib": Escape(
        "import importlib", Raises(ImportError, "module 'importlib' is not allowed")
    ),
    "import-copy": Escape("import copy", Raises(ImportError, "module 'copy' is not allowed")),
    "import-time": Escape("import time", Raises(ImportError, "module 'time' is not allowed")),
    "import-c-accelerator": Escape(
        "from _io import open", Raises(ImportError, "module '_io' is not allowed")
    ),
    "relative-import": Escape(
        "from . import helpers", Raises(ImportError, "relative imports are not allowed")
    ),
    "relative-from-import": Escape(
        "from .helpers import x", Raises(ImportError, "relative imports are not allowed")
    ),
    "dotted-allowed-module": Escape(
        "import collections.abc", Raises(ImportError, "'collections.abc' is not allowed")
    ),
    "dotted-sdk": Escape(
        "import tenantflow.sdk", Raises(ImportError, "'tenantflow.sdk' is not allowed")
    ),
    # --- facades never lead to a module -------------------------------------------------------
    "json-submodule": Escape(
        "import json\nx = json.decoder", Raises(AttributeError, "has no attribute 'decoder'")
    ),
    "json-submodule-from-import": Escape(
        # IMPORT_FROM falls back to sys.modules[f"{module.__name__}.decoder"]
        "from json import decoder",
        Raises(ImportError, "cannot import name 'decoder'"),
    ),
    "collections-abc-from-import": Escape(
        "from collections import abc", Raises(ImportError, "cannot import name 'abc'")
    ),
    "re-internals": Escape(
        "import re\nx = re.sre_compile", Raises(AttributeError, "no attribute 'sre_compile'")
    ),
    "re-imported-module": Escape(
        "import re\nx = re.enum", Raises(AttributeError, "no attribute 'enum'")
    ),
    "datetime-sys": Escape(
        "import datetime\nx = datetime.sys", Raises(AttributeError, "no attribute 'sys'")
    ),
    "uuid-os": Escape("import uuid\nx = uuid.os", Raises(AttributeError, "no attribute 'os'")),
    "uuid-subprocess-getnode": Escape(
        "import uuid\nx = uuid.uuid1()", Raises(AttributeError, "no attribute 'uuid1'")
    ),
    "functools-update-wrapper": Escape(
        "from functools import update_wrapper", Raises(ImportError, "cannot import name")
    ),
    "functools-wraps": Escape(
        "import functools\nx = functools.wraps", Raises(AttributeError, "no attribute 'wraps'")
    ),
    "functools-singledispatch-eval": Escape(
        "import functools\nx = functools.singledispatch",
        Raises(AttributeError, "no attribute 'singledispatch'"),
    ),
    "functools-total-ordering": Escape(
        "import functools\nx = functools.total_ordering",
        Raises(AttributeError, "no attribute 'total_ordering'"),
    ),
    "decimal-setcontext": Escape(
        "import decimal\ndecimal.setcontext(decimal.Context(prec=1))",
        Raises(AttributeError, "no attribute 'setcontext'"),
    ),
    "re-debug-writes-real-stdout": Escape(
        "import re\nx = re.compile('a', 128)", Raises(ValueError, "re.DEBUG is not allowed")
    ),
    "re-debug-keyword": Escape(
        "import re\nx = re.search('a', 'a', flags=re.I | 128)",
        Raises(ValueError, "re.DEBUG is not allowed"),
    ),
    # --- writes to modules and host objects ----------------------------------------------------
    "module-poisoning": Escape(
        "import json\njson.dumps = len", Raises(TypeError, "cannot assign attribute 'dumps'")
    ),
    "module-poisoning-setattr": Escape(
        "import json\nsetattr(json, 'dumps', len)", Raises(TypeError, "module 'json'")
    ),
    "module-poisoning-del": Escape(
        "import json\ndel json.dumps", Raises(TypeError, "cannot delete attribute 'dumps'")
    ),
    "sdk-poisoning": Escape(
        "import tenantflow\ntenantflow.WorkflowEntrypoint = None",
        Raises(TypeError, "module 'tenantflow'"),
    ),
    "sdk-class-poisoning": Escape(
        "from tenantflow import WorkflowEntrypoint\nWorkflowEntrypoint.run = None",
        Raises(TypeError, "class '_WorkflowEntrypoint'"),
    ),
    "stdlib-class-poisoning": Escape(
        "import json\njson.JSONEncoder.default = None", Raises(TypeError, "class 'JSONEncoder'")
    ),
    "host-object-write": Escape(
        "from tenantflow import proxy\nproxy.token = 'x'",
        Raises(TypeError, "a '_HostProxy' object"),
    ),
    "shared-decimal-context-write": Escape(
        "import decimal\ndecimal.getcontext().prec = 1", Raises(TypeError, "'Context' object")
    ),
    "shared-constant-mutation": Escape(
        "import hashlib\nhashlib.algorithms_available.add('x')",
        Raises(AttributeError, "'frozenset' object has no attribute 'add'"),
    ),
    "sibling-module-write": Escape(
        "import helpers\nhelpers.value = 2",
        Raises(TypeError, "module 'helpers'"),
        files={"helpers.py": "value = 1\n"},
    ),
    "print-to-host-file": Escape(
        "from tenantflow import proxy\nprint('x', file=proxy)",
        Raises(TypeError, "print(file=...) is not supported"),
    ),
}

ABSENT_BUILTINS = [
    "type",
    "globals",
    "locals",
    "vars",
    "dir",
    "open",
    "compile",
    "input",
    "id",
    "memoryview",
    "super",
    "help",
    "exit",
    "quit",
    "ExceptionGroup",
    "BaseExceptionGroup",
]


def _load(source: str, files: Mapping[str, str] | None = None) -> Mapping[str, object]:
    compiled = compile_tenant({"main.py": source, **(files or {})})
    return load_tenant(compiled, sdk=SDK, print_sink=lambda text: None)


@pytest.mark.parametrize("escape", list(ESCAPES.values()), ids=list(ESCAPES))
def test_escape_is_blocked(escape: Escape) -> None:
    outcome = escape.outcome
    if isinstance(outcome, Compile):
        with pytest.raises(TenantCompileError) as compile_info:
            _load(escape.source, escape.files)
        assert outcome.fragment in compile_info.value.message
        assert compile_info.value.line is not None
    else:
        with pytest.raises(outcome.error) as runtime_info:
            _load(escape.source, escape.files)
        assert type(runtime_info.value) is outcome.error
        assert outcome.fragment in str(runtime_info.value)


@pytest.mark.parametrize("name", ABSENT_BUILTINS)
def test_dangerous_builtins_are_absent(name: str) -> None:
    with pytest.raises(NameError, match=f"name '{name}' is not defined"):
        _load(f"x = {name}")


def test_module_poisoning_leaves_the_real_module_intact() -> None:
    real_dumps = json.dumps
    with pytest.raises(TypeError):
        _load("import json\njson.dumps = len")
    assert json.dumps is real_dumps
    namespace = _load("import json\nresult = json.dumps([1])")
    assert namespace["result"] == "[1]"


def test_shadowed_write_guard_cannot_poison_a_module() -> None:
    # The full CVE-2026-55830 exploit: shadow _write_ inside a function, then write.
    with pytest.raises(TenantCompileError):
        _load("import json\ndef f(_write_, /):\n    json.dumps = len\nf(lambda o: o)")
    assert json.dumps("x") == '"x"'


def test_class_keywords_never_reach_host_init_subclass() -> None:
    seen: list[dict[str, object]] = []

    class Base:
        def __init_subclass__(cls, **kwargs: object) -> None:
            seen.append(kwargs)

    compiled = compile_tenant(
        {"main.py": "from tenantflow import Base\nclass C(Base, x=1):\n    pass"}
    )
    load_tenant(compiled, sdk={"Base": Base}, print_sink=lambda text: None)
    assert seen == [{}]


def test_tenant_printing_does_not_reach_real_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    lines: list[str] = []
    compiled = compile_tenant({"main.py": "print('to the sink')\nimport re\nx = re.compile('b')"})
    load_tenant(compiled, sdk={}, print_sink=lines.append)
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "")
    assert lines == ["to the sink"]


def test_c_internal_imports_hand_nothing_to_tenant_code() -> None:
    # datetime.strptime imports _strptime through the tenant's __import__ with a list
    # fromlist; the tenant's own import statement never gets that path.
    namespace = _load(
        "from datetime import datetime\nd = datetime.strptime('2024-05-06', '%Y-%m-%d')\n"
        "try:\n    from _strptime import TimeRE\nexcept ImportError as e:\n    result = str(e)\n"
    )
    assert namespace["result"] == "module '_strptime' is not allowed in tenant code"


# --- reachability ---------------------------------------------------------------------------

_FORBIDDEN_TYPES = (types.ModuleType, types.FrameType, types.CodeType, types.TracebackType)
# Their attributes are more values of the same kinds (``(1.5).imag`` is a new float and
# ``Fraction(1, 2).real`` a new Fraction on each read), never a way anywhere else.
_LEAF_TYPES = (numbers.Number, str, bytes, type(None))


def _tenant_roots() -> Iterator[tuple[str, object]]:
    """Everything tenant code can name without calling: builtins and facade members,
    plus one instance of each stateful stdlib class it can build."""
    write_guard = WriteGuard(weakref.WeakSet())
    builtins = build_builtins(import_=lambda *args: None, write_guard=write_guard)
    for name, value in builtins.items():
        if not name.startswith("_"):
            yield name, value
    for module_name in DEFAULT_POLICY.allowed_modules:
        facade = stdlib_facade(module_name)
        for name in dir(facade):
            yield f"{module_name}.{name}", getattr(facade, name)
    namespace = _load(
        "import json, random, re, datetime, decimal, textwrap, hashlib, statistics\n"
        "import functools, uuid, fractions, collections, itertools\n"
        "def gen():\n    yield 1\n"
        "instances = [json.JSONDecoder(), json.JSONEncoder(), random.Random(1),"
        " re.compile('(a)'), re.match('a', 'a'), datetime.datetime(2024, 1, 1),"
        " decimal.getcontext(), textwrap.TextWrapper(), hashlib.sha256(),"
        " statistics.NormalDist(), functools.partial(len), functools.lru_cache(len),"
        " uuid.UUID(int=1), fractions.Fraction(1, 2), collections.deque(), gen(),"
        " itertools.count(), ValueError('x'), print, json.JSONDecoder().scan_once]\n"
    )
    instances = namespace["instances"]
    assert isinstance(instances, list)
    for index, instance in enumerate(instances):
        yield f"instances[{index}]", instance


def test_no_attribute_chain_from_tenant_reach_leads_to_a_module() -> None:
    module_globals = {
        id(vars(module)) for module in list(sys.modules.values()) if module is not None
    }
    seen: dict[int, object] = {}
    reached: list[str] = []
    frontier = list(_tenant_roots())
    for _depth in range(6):
        following: list[tuple[str, object]] = []
        for path, obj in frontier:
            if id(obj) in seen:
                continue
            seen[id(obj)] = obj
            if isinstance(obj, _FORBIDDEN_TYPES) or id(obj) in module_globals:
                reached.append(path)
                continue
            if isinstance(obj, _LEAF_TYPES):
                continue
            for name in dir(obj):
                if name.startswith("_"):
                    continue
                try:
                    following.append((f"{path}.{name}", guarded_getattr(obj, name)))
                except Exception:  # refused, or a property that fails on this object
                    continue
        frontier = following
    assert not frontier, "the walk should have run out of new objects"
    assert reached == []
    assert len(seen) > 1000  # the walk really covered the facades


def test_every_facade_member_is_checked_against_gadgets() -> None:
    gadgets = {"Formatter", "Template", "UserString", "update_wrapper", "wraps", "DEBUG"}
    for module_name in DEFAULT_POLICY.allowed_modules:
        members = set(dir(stdlib_facade(module_name)))
        assert not members & gadgets, module_name
        assert all(not name.startswith("_") for name in members)
