"""What the subcommands share: the config, read from the file and the environment."""

from __future__ import annotations

import os

from ..config import Settings, load_config

# The admin token `move` (without a control catalog) and `purge` send to the gateway's admin API.
ADMIN_TOKEN_ENV = "TENANT_PROXY_ADMIN_TOKEN"


def load(path: str) -> Settings:
    return load_config(path, os.environ)
