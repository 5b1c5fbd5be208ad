"""`flask billing db upgrade|adopt|downgrade|current`: the database's migrations (Alembic)."""

from __future__ import annotations

from collections.abc import Callable

import click
from flask.cli import AppGroup
from sqlalchemy import Engine

from billing import db
from billing.checks.adopt import adopt_billable_events, upgrade_database
from billing.cli.core import emit, operator_errors, runtime


@click.group("db", cls=AppGroup)
def db_cli() -> None:
    """Database migrations (Alembic)."""


@db_cli.command("upgrade")
@click.argument("revision", default="head")
def db_upgrade_command(revision: str) -> None:
    """Apply migrations up to REVISION (default: head)."""
    migrate(upgrade_database, revision)


@db_cli.command("adopt")
def db_adopt_command() -> None:
    """Bring an existing billable_events table (with its rows) under billing's migrations."""
    rt = runtime()
    with operator_errors():
        report = adopt_billable_events(rt.engine)
    emit(
        report.to_dict(),
        f"adopted billable_events ({report.rows} rows kept); database at {report.revision}",
    )


@db_cli.command("downgrade")
@click.argument("revision")
def db_downgrade_command(revision: str) -> None:
    """Revert migrations down to REVISION (`base` removes every billing table)."""
    migrate(db.downgrade, revision)


def migrate(step: Callable[[Engine, str], None], revision: str) -> None:
    # An unknown revision, a branch point: the operator's (imported here: see `billing.db`).
    from alembic.util import CommandError

    rt = runtime()
    with operator_errors(CommandError):
        step(rt.engine, revision)
        click.echo(f"database at {db.current_revision(rt.engine)}")


@db_cli.command("current")
def db_current_command() -> None:
    """Print the applied and the head revision."""
    rt = runtime()
    with operator_errors():
        click.echo(f"current {db.current_revision(rt.engine)} head {db.head_revision()}")


COMMANDS = (db_cli,)
