"""`flask billing ...`: thin commands over the service layer; names and flags follow the guide."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click
import sqlalchemy as sa
from flask.cli import AppGroup
from sqlalchemy.exc import SQLAlchemyError

from billing import db, logs
from billing.adjustments.service import AdjustmentError
from billing.checks.adopt import AdoptionError, adopt_billable_events
from billing.config import ConfigError
from billing.entitlements.service import EntitlementError
from billing.errors import error_line, one_line
from billing.runtime import Runtime, current_runtime
from billing.stripe_gateway import StripeGatewayError
from billing.usage.lock import LockUnavailableError
from billing.usage.outbox import SubmissionActionError
from billing.usage.result import FlushResult, TransientFlushError
from billing.webhooks.service import ReplayRefused

# The group and its core commands; `Billing.init_app` adds every other command module's commands and
# groups to it (they import this module's helpers, never the other way round).
billing_cli = AppGroup("billing", help="Stripe usage billing: flush, checks, and maintenance.")

# Errors an operator can act on: shown as one line and a non-zero exit, not a traceback.
OPERATOR_ERRORS = (
    AdoptionError,
    ConfigError,
    EntitlementError,
    LockUnavailableError,
    StripeGatewayError,
    SubmissionActionError,
    TransientFlushError,
    AdjustmentError,
    ReplayRefused,
)


def runtime() -> Runtime:
    """The app's runtime, with logging configured; a config error becomes a clean exit 1."""
    try:
        rt = current_runtime()
        logs.configure_logging(rt.settings.log_level, rt.settings.log_format)
    except ConfigError as error:
        raise click.ClickException(one_line(f"configuration error: {error}")) from error
    return rt


@contextmanager
def operator_errors(*more: type[Exception]) -> Iterator[None]:
    """Errors an operator can act on (and `more`), database errors and a number too large for the
    database: one masked line (`billing.errors.error_line`: no SQL, no parameters), exit 1."""
    try:
        yield
    except (*OPERATOR_ERRORS, *more, SQLAlchemyError, OverflowError) as error:
        raise click.ClickException(error_line(error)) from error


def emit(payload: dict[str, Any], summary: str | None = None) -> None:
    """JSON on stdout for scripts; a one-line summary too when a person is watching."""
    click.echo(json.dumps(payload, indent=2, sort_keys=True, default=str))
    if summary and sys.stdout.isatty():
        click.echo(summary, err=True)


DISABLED = "billing disabled (STRIPE_BILLING_ENABLED is not 1): nothing sent"


def flush_summary(result: FlushResult) -> str:
    if not result.enabled:
        return ""  # attention_lines() says it, whoever is watching
    if result.skipped:
        return "skipped: another flush holds the lock"
    if result.blocked:
        return "blocked by the contract checks: " + ", ".join(
            f["check"] for f in result.contract_failures
        )
    return (
        f"claimed {result.events_claimed} events in {result.batches} batch(es); "
        f"sent {result.submissions_sent}, failed {result.submissions_failed}, "
        f"pending {result.submissions_pending}, held {result.submissions_held}, "
        f"stopped {result.submissions_stopped}; "
        f"billed {result.billed_value}; unbillable {result.unbillable}; "
        f"{result.duration_seconds:.2f}s"
    )


@contextmanager
def flush_progress(rt: Runtime, organization_id: int | None = None) -> Iterator[Any]:
    """A progress bar of events claimed against the backlog when the flush started, on a
    terminal; nothing (None) otherwise: cron and pipes get the JSON and the logs only."""
    if not sys.stderr.isatty():
        yield None
        return
    from billing.ops.state import count_unclaimed

    total = count_unclaimed(rt, organization_id)
    with click.progressbar(
        length=max(total, 1), label="flushing", file=sys.stderr, show_pos=True
    ) as bar:
        shown = 0

        def show(result: FlushResult) -> None:
            nonlocal shown
            bar.update(max(0, result.events_claimed - shown))
            shown = max(shown, result.events_claimed)

        yield show


@contextmanager
def flush_run(rt: Runtime, organization_id: int | None = None) -> Iterator[Any]:
    """A flush command's body: yields its progress callback. When the flush raises, the JSON
    result of what it got done (`ok` false, `error`) still goes to stdout, so cron always has a
    result to parse, before the one `Error:` line on stderr and exit 1 (or a bug's traceback)."""
    done = FlushResult()
    with flush_progress(rt, organization_id) as bar:

        def progress(result: FlushResult) -> None:
            nonlocal done
            done = result
            if bar is not None:
                bar(result)

        try:
            with operator_errors():
                yield progress
        except click.UsageError:  # a bad flag: no flush ran
            raise
        except click.ClickException as error:
            cause = error.__cause__
            failed = cause.result if isinstance(cause, TransientFlushError) else done
            emit_failed_flush(failed, error.message)
            raise
        except Exception as error:
            emit_failed_flush(done, error_line(error))
            raise


def emit_failed_flush(result: FlushResult, error: str) -> None:
    emit({**result.to_dict(), "ok": False, "error": error})
    for line in attention_lines(result):
        click.echo(line, err=True)


def attention_lines(result: FlushResult) -> list[str]:
    """What an operator must fix, one line each, on stderr whoever is watching."""
    lines = []
    if not result.enabled:  # cron runs this hourly: billing nothing must not go unnoticed
        lines.append(f"warning: {DISABLED}")
    if result.stop_error:
        lines.append(
            f"error: Stripe refused the account, flush stopped ({result.stop_error}); no row was "
            "marked failed and unsent usage stays pending: fix STRIPE_SECRET_KEY or the account, "
            "then flush again"
        )
    for event_name, error in result.stopped_meters.items():
        lines.append(
            f"error: meter event name {event_name!r} refused ({error}); its usage stays pending: "
            "fix STRIPE_BILLING_METERS or create the meter, then flush again"
        )
    for customer, error in result.stopped_customers.items():
        lines.append(
            f"error: customer {customer} refused ({error}); its usage stays pending: fix the "
            "organization's billing account, then flush again"
        )
    waiting = {s: n for s, n in result.awaiting_operator.items() if n}
    if waiting:
        counts = ", ".join(f"{n} {status}" for status, n in waiting.items())
        lines.append(
            f"error: usage submissions wait for an operator ({counts}): see "
            "`flask billing submissions list`, then retry or write them off"
        )
    return [one_line(line) for line in lines]


def finish_flush(result: FlushResult) -> None:
    emit(result.to_dict(), flush_summary(result))
    for line in attention_lines(result):
        click.echo(line, err=True)
    if not result.ok:
        sys.exit(1)


@billing_cli.command("flush_now")
@click.option("--org-id", type=int, default=None, help="Flush one organization only.")
def flush_now_command(org_id: int | None) -> None:
    """Run one flush pass immediately (no lock, no retries)."""
    from billing.usage.service import UnknownOrganizationError, flush_once

    rt = runtime()
    with flush_run(rt, org_id) as progress:
        try:
            result = flush_once(rt, organization_id=org_id, on_progress=progress)
        except UnknownOrganizationError as error:
            raise click.BadParameter(str(error), param_hint="'--org-id'") from error
    finish_flush(result)


@billing_cli.command("flush_hourly")
def flush_hourly_command() -> None:
    """The hourly flush: under the overlap lock, 3 attempts with exponential backoff."""
    from billing.usage.service import flush_with_retries

    rt = runtime()
    with flush_run(rt) as progress:
        result = flush_with_retries(rt, on_progress=progress)
    finish_flush(result)


@billing_cli.command("enqueue_hourly")
def enqueue_hourly_command() -> None:
    """Queue the hourly flush as a Celery task on STRIPE_BILLING_QUEUE; prints the task id."""
    from billing.usage.tasks import BrokerUnavailableError, enqueue_hourly_flush

    rt = runtime()
    with operator_errors(BrokerUnavailableError):
        task_id = enqueue_hourly_flush(rt.settings)
    emit({"task_id": task_id, "queue": rt.settings.billing_queue})


@billing_cli.command("seed_demo")
@click.option("--orgs", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--events", type=click.IntRange(min=0), default=100, show_default=True)
@click.option("--hours", type=click.IntRange(min=1, max=24 * 30), default=3, show_default=True)
@click.option("--seed", type=int, default=None, help="Random seed, for repeatable demos.")
def seed_demo_command(orgs: int, events: int, hours: int, seed: int | None) -> None:
    """Create demo meters, customers, billing accounts and random events (test mode only)."""
    from billing.usage.demo import seed_demo

    rt = runtime()
    with operator_errors():
        made = seed_demo(rt, orgs=orgs, events=events, hours=hours, seed=seed)
    emit(made, f"seeded {made['events']} events for {len(made['organizations'])} organizations")


@billing_cli.group("db")
def db_cli() -> None:
    """Database migrations (Alembic)."""


@db_cli.command("upgrade")
@click.argument("revision", default="head")
def db_upgrade_command(revision: str) -> None:
    """Apply migrations up to REVISION (default: head)."""
    rt = runtime()
    with operator_errors():
        unmanaged = db.current_revision(rt.engine) is None
        if unmanaged and sa.inspect(rt.engine).has_table("billable_events"):
            raise click.ClickException(
                "billable_events already exists and billing's migrations have never run here: "
                "adopt it with `flask billing db adopt` (keeps its rows)"
            )
    migrate(db.upgrade, revision)


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


def migrate(step: Callable[[Any, str], None], revision: str) -> None:
    from alembic.util import CommandError  # an unknown revision, a branch point: the operator's

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


@billing_cli.command("config")
def config_command() -> None:
    """Print the effective settings, secrets masked."""
    emit(runtime().settings.masked())
