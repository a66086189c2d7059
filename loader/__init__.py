"""The Worker-Loader library: where tenant code comes from and how it is dispatched.

_envelope.py    {"__dispatcherMetadata": {...}, "params": ...}
_binding.py     wrap_workflow_binding / DynamicWorkflowBinding: env.WORKFLOWS, tenant-scoped
_dispatch.py    create_dynamic_workflow_entrypoint / dispatch_workflow: wake-up -> tenant code
_directory.py   tenants from a folder; code version = SHA-256 of the files
_registry.py    the live tenants, their current versions, limits and load errors
"""

from ._binding import BatchResult as BatchResult
from ._binding import DynamicWorkflowBinding as DynamicWorkflowBinding
from ._binding import InstanceHandle as InstanceHandle
from ._binding import wrap_workflow_binding as wrap_workflow_binding
from ._directory import TenantCode as TenantCode
from ._directory import code_version as code_version
from ._directory import read_tenant as read_tenant
from ._directory import scan_tenants as scan_tenants
from ._dispatch import LoadRunner as LoadRunner
from ._dispatch import create_dynamic_workflow_entrypoint as create_dynamic_workflow_entrypoint
from ._dispatch import dispatch_workflow as dispatch_workflow
from ._envelope import MissingDispatcherMetadataError as MissingDispatcherMetadataError
from ._envelope import unwrap_envelope as unwrap_envelope
from ._envelope import wrap_params as wrap_params
from ._registry import TenantLimits as TenantLimits
from ._registry import TenantRegistry as TenantRegistry
from ._registry import TenantState as TenantState

__all__ = [
    "BatchResult",
    "DynamicWorkflowBinding",
    "InstanceHandle",
    "LoadRunner",
    "MissingDispatcherMetadataError",
    "TenantCode",
    "TenantLimits",
    "TenantRegistry",
    "TenantState",
    "code_version",
    "create_dynamic_workflow_entrypoint",
    "dispatch_workflow",
    "read_tenant",
    "scan_tenants",
    "unwrap_envelope",
    "wrap_params",
    "wrap_workflow_binding",
]
