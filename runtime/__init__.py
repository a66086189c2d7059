"""tenantflow's durable engine and supervisor.

General layout (each module one concern; the public names are re-exported here)::

    _engine.py        Engine: instance API, dispatcher, timers, recovery
      _activation.py    one running activation: commands -> durable records
      _writer.py        group commit: many units, one transaction, one fsync
      _storage.py       Store / StoreTxn ABCs and open_store(url)
        _storage_sqlite.py  embedded SQLite (WAL, synchronous=FULL)
      _runner.py        Runner / ActivationChannel ABCs: where workflow code runs
        _inprocess.py     InProcessRunner: threads in this process (tests, debugging)
      _clock.py         Clock, WallClock, MockClock: the engine's only source of time
    errors.py         the error tree with stable codes
    testing.py        helpers for tests: autojump on a MockClock

Tenant code never runs here: it runs in ``sandbox`` processes that speak
``sandbox.protocol``; the in-process runner exists for tests and debugging only.
"""

from ._clock import Clock as Clock
from ._clock import MockClock as MockClock
from ._clock import WallClock as WallClock
from ._engine import DEFAULT_WORKFLOW as DEFAULT_WORKFLOW
from ._engine import Engine as Engine
from ._engine import InstanceView as InstanceView
from ._engine import open_engine as open_engine
from ._inprocess import InProcessRunner as InProcessRunner
from ._models import FINISHED_STATUSES as FINISHED_STATUSES
from ._models import InstanceRecord as InstanceRecord
from ._models import InstanceStatus as InstanceStatus
from ._models import InstanceSummary as InstanceSummary
from ._models import LogRecord as LogRecord
from ._models import StepRecord as StepRecord
from ._runner import ActivationChannel as ActivationChannel
from ._runner import Runner as Runner
from ._runner import RunnerError as RunnerError
from ._runner import RunTarget as RunTarget
from ._storage import Store as Store
from ._storage import StoreTxn as StoreTxn
from ._storage import open_store as open_store

__all__ = [
    "DEFAULT_WORKFLOW",
    "FINISHED_STATUSES",
    "ActivationChannel",
    "Clock",
    "Engine",
    "InProcessRunner",
    "InstanceRecord",
    "InstanceStatus",
    "InstanceSummary",
    "InstanceView",
    "LogRecord",
    "MockClock",
    "RunTarget",
    "Runner",
    "RunnerError",
    "StepRecord",
    "Store",
    "StoreTxn",
    "WallClock",
    "open_engine",
    "open_store",
]
