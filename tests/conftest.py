"""Shared fixtures: the real stack (fix_stack), seeded tenants, and a running gateway."""

pytest_plugins = ["tests.fix_stack", "tests.fix_gateway", "tests.fix_redis"]
