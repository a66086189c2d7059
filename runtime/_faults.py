"""Named crash points for recovery tests, in the spirit of DBOS's debug triggers.

Off unless the environment variable ``TENANTFLOW_CRASH_AT`` names a point, as
``point`` or ``point:detail`` (for example ``step.before_record:charge``). When the
engine reaches that point it SIGKILLs its own process: a real, unclean death at an
exact place, which an outside ``kill`` could only hit by luck.

Points: ``step.before_record`` (a step ran, its result is not yet committed),
``step.after_record`` (committed, the workflow not yet told), ``sleep.after_record``,
``event.after_record``, ``instance.before_finish``.
"""

from __future__ import annotations

import os
import signal

__all__ = ["crash_point"]

_TARGET = os.environ.get("TENANTFLOW_CRASH_AT", "")


def crash_point(point: str, detail: str = "") -> None:
    """Die with SIGKILL here if the environment asks for this point."""
    if not _TARGET:
        return
    name, _, wanted = _TARGET.partition(":")
    if name == point and (not wanted or wanted == detail):
        os.kill(os.getpid(), signal.SIGKILL)
