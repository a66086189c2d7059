"""Render measurements as the one table ``make bench`` prints."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ._core import Direction, Measurement

__all__ = ["format_number", "render_table", "status_of"]

_HEADERS = ("benchmark", "measurement", "target", "status")
_NONE = "-"


def format_number(value: float) -> str:
    """Three significant digits for small values, thousands separators for large ones."""
    if math.isinf(value) or math.isnan(value):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _with_unit(number: str, unit: str) -> str:
    if not unit:
        return number
    return f"{number}{unit}" if unit == "x" else f"{number} {unit}"


def _measurement_cell(m: Measurement) -> str:
    value = _NONE if m.value is None else _with_unit(format_number(m.value), m.unit)
    return f"{m.label} {value}" if m.label else value


def _target_cell(m: Measurement) -> str:
    if m.target is None or m.direction is None:
        return _NONE
    return f"{m.direction.value} {_with_unit(format_number(m.target), m.unit)}"


def status_of(m: Measurement) -> str:
    """``meets``, ``misses by 12%`` / ``misses by 3.4x``, ``skipped: …``, ``failed: …`` or ``-``."""
    if m.failed is not None:
        return f"failed: {m.failed}"
    if m.skipped is not None:
        return f"skipped: {m.skipped}"
    meets = m.meets
    if meets is None:
        return _NONE
    if meets:
        return "meets"
    factor = m.miss_factor
    assert factor is not None
    if factor >= 1.5:
        return f"misses by {format_number(factor)}x"
    # Under 1.5x, a percentage of the target: 4,000 for >= 5,000 is 20% short.
    shortfall = 1 - 1 / factor if m.direction is Direction.AT_LEAST else factor - 1
    return f"misses by {max(shortfall * 100, 1):.0f}%"


def render_table(measurements: Sequence[Measurement]) -> str:
    """The aligned table, then the rows' notes, as one string."""
    rows = [_HEADERS] + [
        (m.name, _measurement_cell(m), _target_cell(m), status_of(m)) for m in measurements
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADERS) - 1)]

    def line(row: Sequence[str]) -> str:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        return "  ".join([*cells, row[-1]]).rstrip()

    out = [line(rows[0]), line(["-" * w for w in widths] + ["-" * 6])]
    out += [line(row) for row in rows[1:]]
    notes = [
        f"  {m.name}{f' {m.label}' if m.label else ''}: {m.notes}" for m in measurements if m.notes
    ]
    if notes:
        out += ["", "notes:", *notes]
    return "\n".join(out)
