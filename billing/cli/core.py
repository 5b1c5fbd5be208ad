"""The `flask billing` group and what every command module shares: the app's runtime, one error
line for what an operator can fix, JSON on stdout, the audit trail's actor. This module imports no
feature; `Billing.init_app` adds every command module's commands to the group."""

from __future__ import annotations

import getpass
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import click
from flask.cli import AppGroup
from sqlalchemy.exc import SQLAlchemyError

from billing import logs
from billing.config import ConfigError, config_error_line
from billing.errors import OperatorError, error_line
from billing.runtime import Runtime, current_runtime

billing_cli = AppGroup("billing", help="Stripe usage billing: flush, checks, and maintenance.")


def runtime() -> Runtime:
    """The app's runtime, with logging configured; a config error becomes a clean exit 1."""
    try:
        rt = current_runtime()
        logs.configure_logging(rt.settings.log_level, rt.settings.log_format)
    except ConfigError as error:
        raise click.ClickException(config_error_line(error)) from error
    return rt


@contextmanager
def operator_errors(*more: type[Exception]) -> Iterator[None]:
    """What an operator can act on (`OperatorError`, and `more`), database errors and a number
    too large for the database: one masked line (`billing.errors.error_line`: no SQL, no
    parameters), exit 1."""
    try:
        yield
    except (OperatorError, *more, SQLAlchemyError, OverflowError) as error:
        raise click.ClickException(error_line(error)) from error


def emit(payload: dict[str, Any], summary: str | None = None) -> None:
    """JSON on stdout for scripts; a one-line summary too when a person is watching."""
    click.echo(json.dumps(payload, indent=2, sort_keys=True, default=str))
    if summary and sys.stdout.isatty():
        click.echo(summary, err=True)


def _default_actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name (containers)
        return "unknown"


ACTOR = click.option(
    "--actor",
    default=lambda: _default_actor(),
    show_default="the current user",
    help="Who acts; kept in the audit trail.",
)


class Report(Protocol):
    @property
    def ok(self) -> bool: ...

    def to_dict(self) -> dict[str, Any]: ...

    def table(self) -> str: ...


def show(report: Report, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, sort_keys=True, default=str))
    else:
        click.echo(report.table())


def finish(report: Report, *, fail_closed: bool, what: str) -> None:
    if report.ok:
        return
    if fail_closed:
        sys.exit(1)
    click.echo(f"{what} failed; exiting 0 because it is not failing closed", err=True)


json_option = click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
