"""The envelope every dynamic instance's params travel in.

``{"__dispatcherMetadata": {"tenant_id": T, "code_version": V}, "params": <params>}``

The metadata is a routing hint for the dispatch entrypoint, never authorization:
nothing secret goes in it, and tenant scoping is enforced from the instance's own
columns and the caller's channel, not from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

__all__ = ["METADATA_KEY", "MissingDispatcherMetadataError", "unwrap_envelope", "wrap_params"]

METADATA_KEY: Final = "__dispatcherMetadata"


class MissingDispatcherMetadataError(Exception):
    """A payload reached the dispatch entrypoint without the dispatcher envelope."""

    code = "dispatch.missing_metadata"


def wrap_params(metadata: Mapping[str, Any], params: Any) -> dict[str, Any]:
    """Put ``params`` in the envelope with ``metadata``."""
    return {METADATA_KEY: dict(metadata), "params": params}


def unwrap_envelope(payload: Any) -> tuple[dict[str, Any], Any]:
    """Split an envelope into (metadata, params); raise if it is not one."""
    if not isinstance(payload, dict) or not isinstance(payload.get(METADATA_KEY), dict):
        raise MissingDispatcherMetadataError(
            "the workflow payload has no __dispatcherMetadata envelope: it was not created "
            "through a wrapped binding"
        )
    return dict(payload[METADATA_KEY]), payload.get("params")
