"""The RestrictedPython layer: compiling tenant files and running ordinary tenant code.

The escape payloads live in ``test_restricted_escapes.py``; this file checks that the
restrictions leave ordinary workflow code working and that errors are clear.
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import json
import types
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from sandbox._facades import ModuleFacade
from sandbox._policy import DEFAULT_ALLOWED_MODULES, DEFAULT_POLICY, SandboxPolicy
from sandbox._restricted import (
    CompiledTenant,
    PrintLimitError,
    TenantCompileError,
    TenantNamespace,
    compile_tenant,
    load_tenant,
)


def load(
    main: str,
    *,
    files: Mapping[str, str] | None = None,
    sdk: Mapping[str, object] | None = None,
    policy: SandboxPolicy = DEFAULT_POLICY,
) -> tuple[TenantNamespace, list[str]]:
    """Compile and load a tenant whose main.py is ``main``; return its names and prints."""
    printed: list[str] = []
    compiled = compile_tenant({"main.py": main, **(files or {})}, policy)
    namespace = load_tenant(compiled, sdk=sdk or {}, print_sink=printed.append, policy=policy)
    return namespace, printed


# --- compiling -------------------------------------------------------------------------


def test_compile_gives_one_code_object_per_py_file() -> None:
    compiled = compile_tenant(
        {"main.py": "x = 1\n", "helpers.py": "y = 2\n", "tenant.toml": "not python ["}
    )
    assert isinstance(compiled, CompiledTenant)
    assert sorted(compiled.modules) == ["helpers", "main"]
    assert all(isinstance(code, types.CodeType) for code in compiled.modules.values())
    assert compiled.modules["main"].co_filename == "main.py"


def test_compiled_tenant_is_immutable() -> None:
    compiled = compile_tenant({"main.py": "x = 1\n"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        compiled.modules = {}  # type: ignore[misc]
    with pytest.raises(TypeError):
        compiled.modules["main"] = compiled.modules["main"]  # type: ignore[index]


def test_main_py_is_required() -> None:
    with pytest.raises(TenantCompileError) as info:
        compile_tenant({"helpers.py": "x = 1\n"})
    assert info.value.file == "main.py"
    assert "main.py" in info.value.message


@pytest.mark.parametrize(
    ("filename", "fragment"),
    [
        pytest.param("pkg/util.py", "packages are not supported", id="nested"),
        pytest.param("my-util.py", "not a valid tenant module name", id="dash"),
        pytest.param("_private.py", "not a valid tenant module name", id="underscore"),
        pytest.param("class.py", "not a valid tenant module name", id="keyword"),
        pytest.param("tenantflow.py", "may not shadow the SDK", id="sdk-shadow"),
    ],
)
def test_bad_module_file_names_are_refused(filename: str, fragment: str) -> None:
    with pytest.raises(TenantCompileError, match=fragment) as info:
        compile_tenant({"main.py": "x = 1\n", filename: "y = 2\n"})
    assert info.value.file == filename


def test_compile_error_carries_file_line_and_message() -> None:
    source = "x = 1\ny = 2\nz = = 3\n"
    with pytest.raises(TenantCompileError) as info:
        compile_tenant({"main.py": "import helpers\n", "helpers.py": source})
    error = info.value
    assert (error.file, error.line) == ("helpers.py", 3)
    assert error.message.startswith("SyntaxError: invalid syntax")
    assert str(error).startswith("helpers.py:3: SyntaxError: invalid syntax")


@pytest.mark.parametrize(
    ("source", "line", "fragment"),
    [
        pytest.param("x = 1\nasync def f():\n    pass\n", 2, "AsyncFunctionDef", id="async-def"),
        pytest.param("def f():\n    await g()\n", 2, "Await statements", id="await"),
        pytest.param("x = 1\n_hidden = 2\n", 2, '"_hidden" is an invalid variable name', id="name"),
        pytest.param(
            "x = 1\ny = x._secret\n", 2, '"_secret" is an invalid attribute name', id="attr"
        ),
        pytest.param(
            "try:\n    pass\nexcept* ValueError:\n    pass\n", 1, "TryStar", id="except-star"
        ),
        pytest.param("x = 3\nmatch x:\n    case 3:\n        pass\n", 2, "Match", id="match"),
        pytest.param("x: int = 1\n", 1, "AnnAssign", id="annotated-assignment"),
        pytest.param(
            "class C:\n    def bump(self):\n        self.count += 1\n",
            3,
            "Augmented assignment of attributes is not allowed",
            id="augmented-attribute",
        ),
        pytest.param("x = 1\nreturn x\n", 2, "'return' outside function", id="return-outside"),
        pytest.param("x = (\n", 1, "SyntaxError", id="unclosed-paren"),
    ],
)
def test_forbidden_or_invalid_code_is_a_compile_error(
    source: str, line: int, fragment: str
) -> None:
    with pytest.raises(TenantCompileError) as info:
        compile_tenant({"main.py": source})
    assert info.value.file == "main.py"
    assert info.value.line == line
    assert fragment in info.value.message
    assert str(info.value).startswith(f"main.py:{line}: ")


def test_several_errors_are_counted_in_the_message() -> None:
    with pytest.raises(TenantCompileError) as info:
        compile_tenant({"main.py": "_a = 1\n_b = 2\n_c = 3\n"})
    assert info.value.line == 1
    assert info.value.message.endswith("(and 2 more)")


def test_source_size_is_capped_per_file() -> None:
    policy = DEFAULT_POLICY.with_max_source_bytes(64)
    at_limit = "x = 1\n" + "#" * 57 + "\n"
    assert len(at_limit.encode()) == 64
    compile_tenant({"main.py": at_limit}, policy)
    with pytest.raises(TenantCompileError, match="the limit is 64 bytes") as info:
        compile_tenant({"main.py": at_limit + "\n"}, policy)
    assert info.value.line is None
    assert str(info.value).startswith("main.py: file is 65 bytes")


def test_size_cap_counts_utf8_bytes() -> None:
    policy = DEFAULT_POLICY.with_max_source_bytes(20)
    with pytest.raises(TenantCompileError, match="limit is 20 bytes"):
        compile_tenant({"main.py": "s = '" + "é" * 8 + "'\n"}, policy)  # 14 chars, 22 bytes


def test_default_source_cap_is_256_kib() -> None:
    with pytest.raises(TenantCompileError, match="limit is 262144 bytes"):
        compile_tenant({"main.py": "#" * (256 * 1024 + 1)})


@pytest.mark.parametrize(
    "source",
    [
        pytest.param("x = " + "1+" * 100_000 + "1\n", id="recursion-error"),
        pytest.param("x = " + "-" * 100_000 + "1\n", id="memory-error"),
    ],
)
def test_pathological_input_becomes_a_compile_error(source: str) -> None:
    with pytest.raises(TenantCompileError, match="nested too deeply") as info:
        compile_tenant({"main.py": source})
    assert info.value.file == "main.py"


def test_null_byte_is_a_compile_error() -> None:
    with pytest.raises(TenantCompileError, match="null bytes"):
        compile_tenant({"main.py": "x = 1\0\n"})


def test_huge_syntax_error_message_is_clipped() -> None:
    with pytest.raises(TenantCompileError) as info:
        compile_tenant({"main.py": "x = [" + "1, " * 20_000 + "\n"})
    assert len(info.value.message) <= 300


def test_compiler_warnings_do_not_depend_on_host_filters() -> None:
    # pytest runs with filterwarnings=error; a SyntaxWarning must not fail the tenant.
    namespace, _ = load("a = 1 is 1\nb = '\\d'\n")
    assert namespace["b"] == "\\d"


# --- the policy ------------------------------------------------------------------------


def test_default_policy() -> None:
    assert DEFAULT_POLICY.allowed_modules == DEFAULT_ALLOWED_MODULES
    assert DEFAULT_POLICY.max_source_bytes == 256 * 1024
    assert DEFAULT_POLICY.max_print_bytes == 1024 * 1024
    for name in ("json", "math", "re", "datetime", "collections", "hashlib", "random"):
        assert name in DEFAULT_POLICY.allowed_modules
    for name in ("time", "operator", "copy", "enum", "os", "sys"):
        assert name not in DEFAULT_POLICY.allowed_modules


def test_policy_is_frozen_and_helpers_return_copies() -> None:
    policy = SandboxPolicy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.max_print_bytes = 1  # type: ignore[misc]
    smaller = policy.with_max_print_bytes(10).with_max_source_bytes(20)
    assert (smaller.max_print_bytes, smaller.max_source_bytes) == (10, 20)
    assert policy.max_print_bytes == 1024 * 1024
    more = policy.with_allowed_modules("heapq", "json", "bisect")
    assert more.allowed_modules == (*DEFAULT_ALLOWED_MODULES, "heapq", "bisect")
    fewer = policy.without_allowed_modules("json", "re")
    assert "json" not in fewer.allowed_modules
    assert "re" not in fewer.allowed_modules


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: SandboxPolicy(allowed_modules=("os",)), id="forbidden-os"),
        pytest.param(lambda: DEFAULT_POLICY.with_allowed_modules("operator"), id="operator"),
        pytest.param(lambda: DEFAULT_POLICY.with_allowed_modules("sys"), id="sys"),
        pytest.param(lambda: SandboxPolicy(allowed_modules=("os.path",)), id="dotted"),
        pytest.param(lambda: SandboxPolicy(allowed_modules=("_json",)), id="private"),
        pytest.param(lambda: SandboxPolicy(allowed_modules=("json", "json")), id="duplicate"),
        pytest.param(lambda: SandboxPolicy(max_source_bytes=0), id="zero-source"),
        pytest.param(lambda: SandboxPolicy(max_print_bytes=-1), id="negative-print"),
        pytest.param(lambda: SandboxPolicy(allowed_modules="json"), id="str-not-tuple"),  # type: ignore[arg-type]
    ],
)
def test_invalid_policies_are_refused(make: Callable[[], SandboxPolicy]) -> None:
    with pytest.raises((ValueError, TypeError)):
        make()


def test_a_module_left_out_of_the_policy_cannot_be_imported() -> None:
    policy = DEFAULT_POLICY.without_allowed_modules("json")
    with pytest.raises(ImportError, match="module 'json' is not allowed"):
        load("import json\n", policy=policy)


def test_an_extra_module_added_to_the_policy_is_a_facade() -> None:
    policy = DEFAULT_POLICY.with_allowed_modules("heapq")
    namespace, _ = load(
        "import heapq\nh = [3, 1, 2]\nheapq.heapify(h)\nresult = h[0]\n", policy=policy
    )
    assert namespace["result"] == 1
    assert isinstance(namespace["heapq"], ModuleFacade)


# --- ordinary tenant code --------------------------------------------------------------

ORDINARY_CODE = [
    pytest.param(
        """
class Cart:
    def __init__(self, owner):
        self.owner = owner
        self.items = []
        self.count = 0

    def add(self, item):
        self.items.append(item)
        self.count = self.count + 1
        return self

cart = Cart("ada").add("tea").add("milk")
result = (cart.owner, cart.items, cart.count)
""",
        ("ada", ["tea", "milk"], 2),
        id="class-with-attributes",
    ),
    pytest.param(
        "class Tally:\n    total = 0\nTally.total = Tally.total + 5\nresult = Tally.total\n",
        5,
        id="class-attribute-write",
    ),
    pytest.param(
        "total = 0\nfor i in range(5):\n    if i == 3:\n        continue\n    total += i\n"
        "n = 10\nwhile n > 0:\n    n -= 4\nresult = (total, n)\n",
        (7, -2),
        id="loops-and-augmented-names",
    ),
    pytest.param(
        "n = 2\nn *= 3\nn **= 2\nn //= 5\nn %= 4\nn <<= 2\nn |= 1\nn ^= 3\nn &= 14\nresult = n\n",
        14,
        id="every-inplace-operator",
    ),
    pytest.param(
        "words = ['a', 'bb', 'ccc']\nresult = ([len(w) for w in words if w != 'bb'],"
        " {w: len(w) for w in words}, {len(w) % 2 for w in words}, sum(len(w) for w in words))\n",
        ([1, 3], {"a": 1, "bb": 2, "ccc": 3}, {0, 1}, 6),
        id="comprehensions",
    ),
    pytest.param(
        "d = {'a': 1}\nd['b'] = 2\nd.update(c=3)\ndel d['a']\nl = [3, 1, 2]\nl[0] = 9\n"
        "l[1:2] = [7, 8]\nl.sort()\nresult = (d, l, d.get('z', 0), l[-1], l[::2])\n",
        ({"b": 2, "c": 3}, [2, 7, 8, 9], 0, 9, [2, 8]),
        id="dict-and-list-operations",
    ),
    pytest.param(
        "name = 'Ada'\nn = 3.14159\nresult = f'Hello, {name}! {n:.2f} {name!r} {n=:.1f}'\n",
        "Hello, Ada! 3.14 'Ada' n=3.1",
        id="f-strings",
    ),
    pytest.param(
        "a, b = 1, 2\n(c, (d, e)), f = (3, (4, 5)), 6\nfirst, *rest = [1, 2, 3]\n"
        "pairs = [(k, v) for k, v in {'x': 1}.items()]\n"
        "for i, (j, k) in enumerate([(1, 2)]):\n    g = i + j + k\n"
        "result = (a, b, c, d, e, f, first, rest, pairs, g)\n",
        (1, 2, 3, 4, 5, 6, 1, [2, 3], [("x", 1)], 3),
        id="tuple-unpacking",
    ),
    pytest.param(
        "def make_adder(n):\n    def add(x):\n        return x + n\n    return add\n"
        "double = lambda x, factor=2: x * factor\nresult = (make_adder(3)(4), double(5),"
        " sorted([3, 1, 2], key=lambda v: -v))\n",
        (7, 10, [3, 2, 1]),
        id="lambdas-and-closures",
    ),
    pytest.param(
        """
class Oops(Exception):
    pass

log = []
def risky(x):
    try:
        if x:
            raise Oops('bad ' + str(x))
        return 'fine'
    except Oops as e:
        log.append(str(e))
        return 'caught'
    finally:
        log.append('finally')

result = (risky(0), risky(1), log)
""",
        ("fine", "caught", ["finally", "bad 1", "finally"]),
        id="try-except-finally",
    ),
    pytest.param(
        "def countdown(n):\n    while n:\n        yield n\n        n -= 1\n"
        "result = (list(countdown(3)), next(iter([9])), list(x * 2 for x in range(3)))\n",
        ([3, 2, 1], 9, [0, 2, 4]),
        id="generators",
    ),
    pytest.param(
        "result = (sorted({3: 'a', 1: 'b'}), min(3, 1, 2), max([4, 5], key=lambda v: -v),"
        " sum([1, 2], 10), list(zip('ab', [1, 2])), list(enumerate('ab', 1)),"
        " list(reversed([1, 2, 3])), list(reversed(range(3))), any([0, 1]), all([]),"
        " list(map(str, [1, 2])), list(filter(None, [0, 1, 2])), max([], default=7),"
        " tuple([1]), set([1, 1]), frozenset([2]), dict([('k', 1)]), list('ab'))\n",
        (
            [1, 3],
            1,
            4,
            13,
            [("a", 1), ("b", 2)],
            [(1, "a"), (2, "b")],
            [3, 2, 1],
            [2, 1, 0],
            True,
            True,
            ["1", "2"],
            [1, 2],
            7,
            (1,),
            {1},
            frozenset({2}),
            {"k": 1},
            ["a", "b"],
        ),
        id="iterating-builtins",
    ),
    pytest.param(
        "class Box(object):\n    pass\nb = Box()\nsetattr(b, 'size', 3)\nb.color = 'red'\n"
        "delattr(b, 'color')\nresult = (getattr(b, 'size'), getattr(b, 'color', None),"
        " hasattr(b, 'size'), hasattr(b, 'color'), isinstance(b, Box), isinstance([], list))\n",
        (3, None, True, False, True, True),
        id="attribute-builtins",
    ),
    pytest.param(
        """
class Registry(dict):
    pass

class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y
    def __eq__(self, other):
        return (self.x, self.y) == (other.x, other.y)
    @property
    def norm1(self):
        return abs(self.x) + abs(self.y)
    @staticmethod
    def origin():
        return Point(0, 0)
    @classmethod
    def unit(cls):
        return cls(1, 0)

r = Registry()
r['a'] = 1
result = (r, Point(1, 2) == Point(1, 2), Point(-1, 2).norm1, Point.origin().x, Point.unit().x)
""",
        ({"a": 1}, True, 3, 0, 1),
        id="subclasses-and-decorators",
    ),
    pytest.param(
        "x = [1, 2]\nx += [3]\ns = 'ab'\ns += 'c'\nif (n := len(x)) > 2:\n    big = True\n"
        "result = (x, s, n, big, '%s-%03d' % ('id', 7), 'a,b'.split(','), b'ab'.hex())\n",
        ([1, 2, 3], "abc", 3, True, "id-007", ["a", "b"], "6162"),
        id="misc-expressions",
    ),
]


@pytest.mark.parametrize(("source", "expected"), ORDINARY_CODE)
def test_ordinary_code_works(source: str, expected: object) -> None:
    namespace, _ = load(source)
    assert namespace["result"] == expected


STDLIB_USAGE = [
    pytest.param(
        "import json\nresult = json.loads(json.dumps({'a': [1, 2.5, None]}, sort_keys=True))\n",
        {"a": [1, 2.5, None]},
        id="json",
    ),
    pytest.param(
        "import json\nclass Enc(json.JSONEncoder):\n    def default(self, o):\n"
        "        return 'custom'\nresult = json.dumps({'a': object()}, cls=Enc)\n",
        '{"a": "custom"}',
        id="json-encoder-subclass",
    ),
    pytest.param(
        "from datetime import datetime, timedelta, timezone\n"
        "start = datetime(2024, 1, 31, 12, tzinfo=timezone.utc)\n"
        "result = ((start + timedelta(days=1)).isoformat(), start.strftime('%Y/%m/%d'),"
        " datetime.strptime('2024-02-03', '%Y-%m-%d').day)\n",
        ("2024-02-01T12:00:00+00:00", "2024/01/31", 3),
        id="datetime",
    ),
    pytest.param(
        "import math\nresult = (math.sqrt(16), math.floor(2.7), round(math.pi, 2), math.inf > 1)\n",
        (4.0, 2, 3.14, True),
        id="math",
    ),
    pytest.param(
        "import re\nm = re.match(r'(?P<user>\\w+)@(\\w+)', 'ada@example')\n"
        "result = (m.group('user'), m.groups(), re.findall(r'\\d+', 'a1b22'),"
        " re.sub(r'(a)', r'<\\1>', 'banana'), re.compile('x', re.I).pattern,"
        " re.split(r',\\s*', 'a, b,c'))\n",
        ("ada", ("ada", "example"), ["1", "22"], "b<a>n<a>n<a>", "x", ["a", "b", "c"]),
        id="re",
    ),
    pytest.param(
        "from collections import defaultdict, Counter, OrderedDict, deque, namedtuple\n"
        "counts = defaultdict(int)\nfor w in 'a b a'.split():\n    counts[w] = counts[w] + 1\n"
        "c = Counter('aab')\nc['z'] = 4\nq = deque([1])\nq.appendleft(0)\nq[1] = 5\n"
        "o = OrderedDict()\no['k'] = 1\nP = namedtuple('P', 'x y')\n"
        "result = (dict(counts), c.most_common(1), list(q), list(o), P(1, 2).y)\n",
        ({"a": 2, "b": 1}, [("z", 4)], [0, 5], ["k"], 2),
        id="collections",
    ),
    pytest.param(
        "import hashlib, base64\nresult = (hashlib.sha256(b'abc').hexdigest()[:12],"
        " base64.b64encode(b'hi'), base64.b64decode('aGk='), 'sha256' in"
        " hashlib.algorithms_guaranteed)\n",
        ("ba7816bf8f01", b"aGk=", b"hi", True),
        id="hashlib-base64",
    ),
    pytest.param(
        "from decimal import Decimal, localcontext\nwith localcontext(prec=3):\n"
        "    third = str(Decimal(1) / Decimal(3))\nfrom fractions import Fraction\n"
        "import statistics\nresult = (third, str(Decimal('1.10') + Decimal('2.20')),"
        " str(Fraction(1, 3) * 3), statistics.mean([1, 2, 3]), statistics.median([3, 1, 2]))\n",
        ("0.333", "3.30", "1", 2, 2),
        id="decimal-fractions-statistics",
    ),
    pytest.param(
        "import itertools, functools, string, textwrap, uuid, random\n"
        "@functools.lru_cache(maxsize=None)\ndef fib(n):\n"
        "    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
        "rng = random.Random(7)\nresult = (list(itertools.chain([1], [2])), fib(20),"
        " functools.reduce(lambda a, b: a * b, [1, 2, 3, 4]), string.ascii_lowercase[:3],"
        " textwrap.dedent('  x\\n  y'), len(str(uuid.uuid4())),"
        " str(uuid.uuid5(uuid.NAMESPACE_DNS, 'a'))[:8],"
        " rng.randint(1, 1000) == random.Random(7).randint(1, 1000))\n",
        ([1, 2], 6765, 24, "abc", "x\ny", 36, "4f3f2898", True),
        id="itertools-functools-string-textwrap-uuid-random",
    ),
]


@pytest.mark.parametrize(("source", "expected"), STDLIB_USAGE)
def test_allowed_stdlib_modules_work(source: str, expected: object) -> None:
    namespace, _ = load(source)
    assert namespace["result"] == expected


def test_imported_modules_are_facades_not_modules() -> None:
    namespace, _ = load("import json\nfrom collections import defaultdict\n")
    facade = namespace["json"]
    assert not isinstance(facade, types.ModuleType)
    assert isinstance(facade, ModuleFacade)
    assert sorted(dir(facade)) == [
        "JSONDecodeError",
        "JSONDecoder",
        "JSONEncoder",
        "dumps",
        "loads",
    ]
    assert namespace["defaultdict"] is __import__("collections").defaultdict


# --- print ---------------------------------------------------------------------------------


def test_print_calls_the_sink_once_per_call() -> None:
    source = (
        "print('hello', 42)\nprint('a', 'b', sep='-', end='!')\nprint()\n"
        "def later(x):\n    print('later', x)\n"
    )
    namespace, printed = load(source)
    assert printed == ["hello 42", "a-b!", ""]
    later = namespace["later"]
    assert callable(later)
    later({"k": 1})
    assert printed[-1] == "later {'k': 1}"


def test_printed_returns_the_text_of_the_current_scope() -> None:
    namespace, printed = load("def f():\n    print('x')\n    print('y')\n    return printed\n")
    f = namespace["f"]
    assert callable(f)
    assert f() == "x\ny\n"
    assert printed == ["x", "y"]


def test_print_is_capped_per_activation_and_reset_by_the_host() -> None:
    policy = DEFAULT_POLICY.with_max_print_bytes(10)
    namespace, printed = load("def say(text):\n    print(text)\n", policy=policy)
    say = namespace["say"]
    assert callable(say)
    say("12345678")  # 9 bytes with its newline
    assert namespace.print_bytes_used == 9
    with pytest.raises(PrintLimitError, match="at most 10 bytes per activation"):
        say("é")  # 3 bytes: over the cap
    assert printed == ["12345678"]
    namespace.reset_print_budget()
    say("é")
    assert printed == ["12345678", "é"]


def test_print_at_import_time_is_capped_too() -> None:
    policy = DEFAULT_POLICY.with_max_print_bytes(1000)
    with pytest.raises(PrintLimitError):
        load("for i in range(100):\n    print('0123456789')\n", policy=policy)


# --- imports: siblings and the SDK ------------------------------------------------------


def test_sibling_modules_are_executed_once_and_lazily() -> None:
    files = {
        "helpers.py": (
            "print('helpers loaded')\nGREETING = 'hi'\ndef shout(s):\n    return s.upper()\n"
        ),
        "other.py": "import helpers\nVALUE = helpers.shout('x')\n",
        "unused.py": "print('never')\n",
    }
    source = (
        "import helpers\nfrom helpers import GREETING, shout\nimport other\nimport helpers\n"
        "result = (GREETING, shout('a'), other.VALUE)\n"
    )
    namespace, printed = load(source, files=files)
    assert namespace["result"] == ("hi", "A", "X")
    assert printed == ["helpers loaded"]


def test_each_load_executes_modules_again() -> None:
    compiled = compile_tenant({"main.py": "import helpers\n", "helpers.py": "print('run')\n"})
    printed: list[str] = []
    load_tenant(compiled, sdk={}, print_sink=printed.append)
    load_tenant(compiled, sdk={}, print_sink=printed.append)
    assert printed == ["run", "run"]


def test_circular_imports_see_the_partly_initialised_module() -> None:
    files = {
        "a.py": "import b\nA = 'a'\ndef get_b():\n    return b.B\n",
        "b.py": "import a\nB = 'b'\n",
    }
    namespace, _ = load("import a\nresult = (a.A, a.get_b())\n", files=files)
    assert namespace["result"] == ("a", "b")


def test_a_sibling_module_shadows_a_stdlib_module() -> None:
    namespace, _ = load(
        "import json\nresult = json.dumps(1)\n",
        files={"json.py": "def dumps(x):\n    return 'mine'\n"},
    )
    assert namespace["result"] == "mine"


def test_tenantflow_is_a_facade_over_exactly_the_sdk_mapping() -> None:
    class WorkflowEntrypoint:
        pass

    def helper() -> str:
        return "sdk"

    sdk = {"WorkflowEntrypoint": WorkflowEntrypoint, "helper": helper}
    source = (
        "import tenantflow\nfrom tenantflow import WorkflowEntrypoint, helper\n"
        "class Mine(WorkflowEntrypoint):\n    pass\n"
        "result = (helper(), tenantflow.helper is helper)\n"
    )
    namespace, _ = load(source, sdk=sdk)
    assert namespace["result"] == ("sdk", True)
    facade = namespace["tenantflow"]
    assert isinstance(facade, ModuleFacade)
    assert sorted(dir(facade)) == ["WorkflowEntrypoint", "helper"]
    mine = namespace["Mine"]
    assert isinstance(mine, type)
    assert issubclass(mine, WorkflowEntrypoint)


def test_unknown_sdk_name_is_an_import_error() -> None:
    with pytest.raises(ImportError, match="cannot import name 'missing'"):
        load("from tenantflow import missing\n", sdk={"present": 1})


@pytest.mark.parametrize(
    "sdk",
    [
        pytest.param({"_private": 1}, id="private-name"),
        pytest.param({"json": json}, id="module-value"),
        pytest.param({"not an identifier": 1}, id="bad-name"),
    ],
)
def test_bad_sdk_mappings_are_refused(sdk: Mapping[str, object]) -> None:
    with pytest.raises(ValueError, match="sdk"):
        load("x = 1\n", sdk=sdk)


def test_sdk_exception_attributes_stay_readable() -> None:
    class StepError(Exception):
        def __init__(self, name: str, message: str) -> None:
            super().__init__(message)
            self.name = name
            self.message = message

    def fail() -> None:
        raise StepError("ValueError", "bad input")

    source = (
        "from tenantflow import StepError, fail\ntry:\n    fail()\nexcept StepError as e:\n"
        "    result = (e.name, e.message)\n"
    )
    namespace, _ = load(source, sdk={"StepError": StepError, "fail": fail})
    assert namespace["result"] == ("ValueError", "bad input")


# --- what load_tenant returns ---------------------------------------------------------------


def test_namespace_holds_main_public_names_only() -> None:
    namespace, _ = load("import json\nvalue = 1\ndef fetch(request, env):\n    return value\n")
    assert isinstance(namespace, Mapping)
    assert sorted(namespace) == ["fetch", "json", "value"]
    assert len(namespace) == 3
    assert "__builtins__" not in namespace
    assert "_getattr_" not in namespace
    with pytest.raises(TypeError):
        namespace["value"] = 2  # type: ignore[index]
    assert "fetch" in repr(namespace)


def test_tenant_errors_at_import_time_propagate() -> None:
    with pytest.raises(ZeroDivisionError):
        load("x = 1 / 0\n")
    with pytest.raises(NameError, match="undefined_thing"):
        load("undefined_thing\n")


def test_a_failed_sibling_import_is_retried() -> None:
    files = {
        "flaky.py": (
            "import state\nstate.hits.append(1)\n"
            "if len(state.hits) == 1:\n    raise ValueError('first')\n"
        ),
        "state.py": "hits = []\n",
    }
    source = (
        "try:\n    import flaky\nexcept ValueError:\n    pass\n"
        "import flaky\nimport state\nresult = len(state.hits)\n"
    )
    namespace, _ = load(source, files=files)
    assert namespace["result"] == 2


# --- SPEC section 3 ---------------------------------------------------------------------------

SPEC_EXAMPLE = """\
from tenantflow import WorkflowEntrypoint, NonRetryableError

def charge(user, approval, attempt):
    if not approval.get("ok"):
        raise NonRetryableError("not approved")   # no retry, the instance errors
    return {"charged": user["name"], "attempt": attempt}

class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
        user = step.do("load user", lambda: {"name": event.payload["name"]})
        step.sleep("cool off", "2 seconds")
        approval = step.wait_for_event("approval", type="approval", timeout="1 hour")
        receipt = step.do(
            "charge",
            lambda ctx: charge(user, approval["payload"], attempt=ctx.attempt),
            retries={"limit": 3, "delay": "1 second", "backoff": "exponential"},
            timeout="30 seconds",
        )
        return {"greeting": f"Hello, {user['name']}!", "receipt": receipt}

def fetch(request, env):
    instance = env.WORKFLOWS.create(params=request.json())
    return {"id": instance.id}
"""


class _WorkflowEntrypoint:
    def __init__(self, env: object = None) -> None:
        self.env = env


class _NonRetryableError(Exception):
    pass


class _FakeStep:
    """Runs each callback at once, as a first attempt that is the second try."""

    def __init__(self, approved: bool) -> None:
        self.approved = approved
        self.calls: list[str] = []

    def do(self, name: str, callback: Callable[..., Any], **options: object) -> object:
        self.calls.append(name)
        if len(inspect.signature(callback).parameters) == 1:
            return callback(types.SimpleNamespace(attempt=2))
        return callback()

    def sleep(self, name: str, duration: object) -> None:
        self.calls.append(name)

    def wait_for_event(self, name: str, *, type: str, timeout: str) -> dict[str, object]:
        self.calls.append(name)
        return {
            "type": type,
            "payload": {"ok": self.approved},
            "timestamp": datetime.datetime.now(),
        }


def _spec_tenant() -> TenantNamespace:
    sdk = {"WorkflowEntrypoint": _WorkflowEntrypoint, "NonRetryableError": _NonRetryableError}
    namespace, _ = load(SPEC_EXAMPLE, sdk=sdk)
    return namespace


def test_spec_example_compiles_loads_and_runs() -> None:
    namespace = _spec_tenant()
    assert {"TenantWorkflow", "fetch", "charge"} <= set(namespace)
    workflow_class = namespace["TenantWorkflow"]
    assert isinstance(workflow_class, type)
    assert issubclass(workflow_class, _WorkflowEntrypoint)
    workflow: Any = workflow_class(env="the env")
    step = _FakeStep(approved=True)
    event = types.SimpleNamespace(payload={"name": "Ada"})
    assert workflow.run(event, step) == {
        "greeting": "Hello, Ada!",
        "receipt": {"charged": "Ada", "attempt": 2},
    }
    assert step.calls == ["load user", "cool off", "approval", "charge"]


def test_spec_example_non_retryable_error_reaches_the_host() -> None:
    workflow_class = _spec_tenant()["TenantWorkflow"]
    assert isinstance(workflow_class, type)
    with pytest.raises(_NonRetryableError, match="not approved"):
        workflow_class().run(
            types.SimpleNamespace(payload={"name": "Ada"}), _FakeStep(approved=False)
        )


def test_spec_example_fetch() -> None:
    fetch = _spec_tenant()["fetch"]
    assert callable(fetch)
    created: list[object] = []

    def create(*, params: object) -> types.SimpleNamespace:
        created.append(params)
        return types.SimpleNamespace(id="inst-1")

    env = types.SimpleNamespace(WORKFLOWS=types.SimpleNamespace(create=create))
    request = types.SimpleNamespace(json=lambda: {"name": "Ada"})
    assert fetch(request, env) == {"id": "inst-1"}
    assert created == [{"name": "Ada"}]
