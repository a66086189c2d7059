"""tenantflow's benchmarks: ``python -m bench`` (``make bench``) prints one table and
writes ``bench/results.json``. See ``bench/README.md``; the registry is ``bench/_registry.py``.
"""

from ._core import BenchContext as BenchContext
from ._core import Benchmark as Benchmark
from ._core import Direction as Direction
from ._core import Measurement as Measurement
from ._core import benchmark as benchmark
from ._core import percentile as percentile

__all__ = ["BenchContext", "Benchmark", "Direction", "Measurement", "benchmark", "percentile"]
