"""The Worker-Loader library: where tenant code comes from and how it is dispatched.

_directory.py   tenants from a folder; code version = SHA-256 of the files
"""

from ._directory import TenantCode as TenantCode
from ._directory import code_version as code_version
from ._directory import read_tenant as read_tenant
from ._directory import scan_tenants as scan_tenants

__all__ = ["TenantCode", "code_version", "read_tenant", "scan_tenants"]
