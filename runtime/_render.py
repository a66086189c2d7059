"""Text for people: tables and the per-step checklist of ``tenantflow instances describe``.

Everything here turns the admin API's JSON (SPEC 8) into lines; nothing here does I/O
except `Checklist`, which writes to the stream it is given.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, TextIO

__all__ = [
    "Checklist",
    "compact",
    "error_text",
    "instance_lines",
    "instances_table",
    "step_key",
    "step_line",
    "table",
    "tenants_table",
]

#: One mark per step status (SPEC 8 step statuses; ``waiting`` is a pending sleep or event).
MARKS: Final = {
    "pending": "[ ]",
    "waiting": "[ ]",
    "running": "[~]",
    "retrying": "[!]",
    "complete": "[x]",
    "errored": "[E]",
}
_UNKNOWN_MARK: Final = "[?]"
_MAX_VALUE_CHARS: Final = 100


def compact(value: Any, limit: int = _MAX_VALUE_CHARS) -> str:
    """A JSON value on one line, clipped to ``limit`` characters."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = " ".join(text.split()) if "\n" in text else text
    return text if len(text) <= limit else text[: limit - 1] + "…"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces."""
    grid = [list(headers), *([str(cell) for cell in row] for row in rows)]
    widths = [max(len(row[i]) for row in grid) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in grid
    )


def error_text(error: Any) -> str:
    """``{"name", "message"}`` as ``Name: message``."""
    if isinstance(error, Mapping):
        name, message = error.get("name"), error.get("message")
        return f"{name}: {message}" if name and message else str(name or message or "error")
    return compact(error)


def step_key(step: Mapping[str, Any]) -> tuple[str, int]:
    """A step's identity, ``(name, count)`` (SPEC 3)."""
    count = step.get("count")
    return str(step.get("name", "?")), count if isinstance(count, int) else 1


def _label(step: Mapping[str, Any]) -> str:
    name, count = step_key(step)
    return name if count == 1 else f"{name} #{count}"


def step_line(step: Mapping[str, Any], width: int = 0) -> str:
    """``[x] load user   do  1 attempt  -> {"name": "Ada"}``: one checklist line."""
    status = str(step.get("status", ""))
    mark = MARKS.get(status, _UNKNOWN_MARK)
    attempts = step.get("attempts")
    tried = ""
    if isinstance(attempts, int) and attempts > 0:
        tried = f"{attempts} attempt" + ("s" if attempts != 1 else "")
    parts = [f"{mark} {_label(step).ljust(width)}", f"{step.get('type', '?'):<12}", f"{tried:<10}"]
    if step.get("error") is not None:
        detail = f"! {error_text(step['error'])}"
        if status == "retrying":
            detail += " (will retry)"
    elif status == "complete" and (step.get("type") == "do" or step.get("output") is not None):
        detail = f"-> {compact(step.get('output'))}"
    else:
        detail = status
    return "  ".join([*parts, detail]).rstrip()


def instance_lines(view: Mapping[str, Any], tenant: str) -> list[str]:
    """``GET .../instances/{id}`` as a header and the step checklist."""
    version = str(view.get("code_version") or "")
    rows = [
        ("instance", f"{view.get('id')}  (tenant {tenant})"),
        ("status", str(view.get("status"))),
        ("code", version[:12]),
        ("created", str(view.get("created_at"))),
        ("updated", str(view.get("updated_at"))),
        ("params", compact(view.get("params"))),
    ]
    if view.get("output") is not None:
        rows.append(("output", compact(view.get("output"))))
    if view.get("error") is not None:
        rows.append(("error", error_text(view.get("error"))))
    lines = [f"{key:<9} {value}" for key, value in rows]
    steps = view.get("steps") or []
    lines.append(f"steps     {len(steps)}")
    width = max((len(_label(s)) for s in steps), default=0)
    lines.extend(f"  {step_line(s, width)}" for s in steps)
    return lines


def instances_table(instances: Sequence[Mapping[str, Any]]) -> str:
    """``GET .../instances`` as a table."""
    rows = (
        [str(i.get("id")), str(i.get("status")), str(i.get("created_at")), str(i.get("updated_at"))]
        for i in instances
    )
    return table(["ID", "STATUS", "CREATED", "UPDATED"], rows)


def _counts(instances: Any) -> str:
    if not isinstance(instances, Mapping) or not instances:
        return "-"
    return " ".join(f"{status}={count}" for status, count in sorted(instances.items()))


def tenants_table(tenants: Sequence[Mapping[str, Any]]) -> str:
    """``GET /v1/tenants`` as a table; load errors on a line of their own."""
    lines = table(
        ["TENANT", "VERSION", "SANDBOX", "INSTANCES"],
        (
            [
                str(t.get("tenant")),
                str(t.get("code_version") or "-")[:12],
                str(t.get("sandbox", "-")),
                _counts(t.get("instances")),
            ]
            for t in tenants
        ),
    ).splitlines()
    for t in tenants:
        if t.get("load_error"):
            lines.append(f"! {t.get('tenant')}: {t.get('load_error')}")
    return "\n".join(lines)


class Checklist:
    """The live per-step checklist of ``instances describe --follow``.

    On a terminal it redraws itself in place, with log lines printed above it; anywhere
    else (a pipe, a test) it prints each changed step as a new line, so the output is a
    readable history.
    """

    def __init__(self, out: TextIO, *, redraw: bool) -> None:
        self.out = out
        self.redraw = redraw
        self.steps: dict[tuple[str, int], dict[str, Any]] = {}
        self._shown: dict[tuple[str, int], str] = {}
        self._drawn = 0  # lines of checklist currently on the terminal

    def update(self, step: Mapping[str, Any]) -> None:
        """A ``step`` event: merge it into the step it names and show the change."""
        key = step_key(step)
        merged = self.steps.setdefault(key, {})
        merged.update(step)
        if self.redraw:
            self._redraw()
            return
        line = step_line(merged)
        if self._shown.get(key) != line:
            self._shown[key] = line
            self._write([line])

    def log(self, text: str) -> None:
        """A line of the instance's log (or a status change), above the checklist."""
        if self.redraw:
            self._erase()
            self.out.write(text + "\n")
            self._draw()
        else:
            self._write([text])
        self.out.flush()

    def _lines(self) -> list[str]:
        width = max((len(_label(s)) for s in self.steps.values()), default=0)
        # A line that wraps would take two rows and spoil the count the redraw moves up by.
        columns = max(20, shutil.get_terminal_size().columns - 1)
        return [compact(step_line(s, width), columns) for s in self.steps.values()]

    def _write(self, lines: list[str]) -> None:
        self.out.write("".join(line + "\n" for line in lines))
        self.out.flush()

    def _erase(self) -> None:
        if self._drawn:
            # Up to the checklist's first line, then clear to the end of the screen.
            self.out.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _draw(self) -> None:
        lines = self._lines()
        self.out.write("".join(line + "\n" for line in lines))
        self._drawn = len(lines)

    def _redraw(self) -> None:
        self._erase()
        self._draw()
        self.out.flush()
