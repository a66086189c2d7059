"""``GET /metrics``: the supervisor's counters in the Prometheus text exposition format 0.0.4."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from ._engine import LATENCY_BUCKETS
from ._models import InstanceStatus

if TYPE_CHECKING:
    from ._supervisor import Supervisor

__all__ = ["CONTENT_TYPE", "render_metrics"]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


def _number(value: float) -> str:
    if isinstance(value, int) or value.is_integer():
        return str(int(value))
    return repr(value)


class _Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, **labels: str) -> None:
        if labels:
            inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{inner}}} {_number(value)}")
        else:
            self.lines.append(f"{name} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


async def render_metrics(supervisor: Supervisor) -> str:
    """Every metric of the supervisor, engine and sandbox pool, now."""
    engine = supervisor.engine
    stats = engine.stats
    pool = supervisor.sandboxes.stats
    counts = await engine.count_by_status()
    out = _Exposition()

    out.family("tenantflow_instances", "gauge", "Workflow instances by status, all tenants.")
    statuses = [s.value for s in InstanceStatus if s is not InstanceStatus.UNKNOWN]
    statuses += sorted(set(counts) - set(statuses))
    for status in statuses:
        out.sample("tenantflow_instances", counts.get(status, 0), status=status)

    out.family("tenantflow_steps_total", "counter", "Step attempts finished, by outcome.")
    out.sample("tenantflow_steps_total", stats.steps_completed, outcome="completed")
    out.sample("tenantflow_steps_total", stats.steps_failed, outcome="failed")

    out.family("tenantflow_activations_total", "counter", "Instance activations started.")
    out.sample("tenantflow_activations_total", stats.activations)

    out.family("tenantflow_write_lag_seconds", "gauge", "Age of the oldest pending write.")
    out.sample("tenantflow_write_lag_seconds", round(engine.writer.lag(), 6))
    out.family("tenantflow_write_backlog", "gauge", "Writes queued for the next commit.")
    out.sample("tenantflow_write_backlog", engine.writer.backlog)
    out.family("tenantflow_busy_refusals_total", "counter", "API calls refused with storage.busy.")
    out.sample("tenantflow_busy_refusals_total", stats.busy_refusals)

    out.family("tenantflow_instances_running", "gauge", "Instances holding a concurrency slot.")
    out.sample("tenantflow_instances_running", engine.running_count)

    out.family("tenantflow_sandboxes_alive", "gauge", "Sandbox processes alive.")
    out.sample("tenantflow_sandboxes_alive", len(supervisor.sandboxes.live()))

    out.family("tenantflow_sandbox_cold_starts_total", "counter", "Sandbox processes spawned.")
    out.sample("tenantflow_sandbox_cold_starts_total", pool.cold_starts)

    out.family("tenantflow_sandbox_evictions_total", "counter", "Sandboxes evicted (idle, LRU).")
    out.sample("tenantflow_sandbox_evictions_total", pool.evictions)

    out.family("tenantflow_sandbox_crashes_total", "counter", "Sandboxes that died unasked.")
    out.sample("tenantflow_sandbox_crashes_total", pool.crashes)

    name = "tenantflow_step_latency_seconds"
    out.family(name, "histogram", "Duration of step attempts, from start to recorded result.")
    cumulative = 0
    for bound, count in zip(LATENCY_BUCKETS, stats.step_latency_buckets, strict=True):
        cumulative += count  # the engine counts each observation in one bucket only
        out.sample(f"{name}_bucket", cumulative, le=_number(bound))
    out.sample(f"{name}_bucket", stats.step_latency_count, le="+Inf")
    out.sample(f"{name}_sum", stats.step_latency_sum)
    out.sample(f"{name}_count", stats.step_latency_count)
    return out.text()
