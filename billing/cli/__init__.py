"""`flask billing …`: one module per command family, each a thin adapter over its feature's
service. `core` holds the group and what they share and imports no feature; `COMMAND_MODULES`
is every family, in `--help` order, each listing its commands in `COMMANDS`."""

from __future__ import annotations

from billing.cli import (
    accounts,
    adjustments,
    checks,
    db,
    entitlements,
    flush,
    ops,
    outbox,
    usage,
    webhooks,
)
from billing.cli.core import billing_cli

COMMAND_MODULES = (
    flush,
    db,
    checks,
    ops,
    outbox,
    usage,
    accounts,
    webhooks,
    adjustments,
    entitlements,
)


def build_cli() -> None:
    """Add every family's commands to the group (again is harmless: a name maps to one command)."""
    for module in COMMAND_MODULES:
        for command in module.COMMANDS:
            billing_cli.add_command(command)


__all__ = ["billing_cli", "build_cli"]
