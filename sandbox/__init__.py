"""tenantflow package (being built)."""
