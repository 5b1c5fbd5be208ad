"""`flask billing flush_now|flush_hourly|enqueue_hourly|seed_demo`: the flush, as the guide runs it.

A flush command always prints a JSON result on stdout (also when the run raised: `ok` false and
the error), the lines an operator must act on, and exits 1 unless the result is ok.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
from flask.cli import with_appcontext
from sqlalchemy.exc import SQLAlchemyError

from billing.accounts import UnknownOrganizationError
from billing.cli.core import emit, operator_errors, runtime
from billing.demo.seed import seed_demo
from billing.errors import OperatorError, error_line, one_line
from billing.ops.state import count_unclaimed
from billing.runtime import Runtime
from billing.usage.result import FlushResult, TransientFlushError
from billing.usage.service import flush_pass, flush_with_retries

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
            yield progress
        except click.UsageError:  # a bad flag: no flush ran
            raise
        except TransientFlushError as error:  # what the whole run got done, all its passes
            emit_failed_flush(error.result, error_line(error))
            raise click.ClickException(error_line(error)) from error
        except (OperatorError, SQLAlchemyError, OverflowError) as error:
            emit_failed_flush(done, error_line(error))
            raise click.ClickException(error_line(error)) from error
        except Exception as error:  # a bug: the JSON, then its traceback
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


@click.command("flush_now")
@with_appcontext
@click.option("--org-id", type=int, default=None, help="Flush one organization only.")
def flush_now_command(org_id: int | None) -> None:
    """Run one flush pass immediately (no lock, no retries)."""
    rt = runtime()
    with flush_run(rt, org_id) as progress:
        try:
            result = flush_pass(rt, organization_id=org_id, on_progress=progress)
        except UnknownOrganizationError as error:
            raise click.BadParameter(str(error), param_hint="'--org-id'") from error
    finish_flush(result)


@click.command("flush_hourly")
@with_appcontext
def flush_hourly_command() -> None:
    """The hourly flush: under the overlap lock, 3 attempts with exponential backoff."""
    rt = runtime()
    with flush_run(rt) as progress:
        result = flush_with_retries(rt, on_progress=progress)
    finish_flush(result)


@click.command("enqueue_hourly")
@with_appcontext
def enqueue_hourly_command() -> None:
    """Queue the hourly flush as a Celery task on STRIPE_BILLING_QUEUE; prints the task id."""
    # Celery is imported by the one command that queues (~100 ms of every other command's start).
    from billing.usage.tasks import enqueue_hourly_flush

    rt = runtime()
    with operator_errors():
        task_id = enqueue_hourly_flush(rt.settings)
    emit({"task_id": task_id, "queue": rt.settings.billing_queue})


@click.command("seed_demo")
@with_appcontext
@click.option("--orgs", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--events", type=click.IntRange(min=0), default=100, show_default=True)
@click.option("--hours", type=click.IntRange(min=1, max=24 * 30), default=3, show_default=True)
@click.option("--seed", type=int, default=None, help="Random seed, for repeatable demos.")
def seed_demo_command(orgs: int, events: int, hours: int, seed: int | None) -> None:
    """Create demo meters, customers, billing accounts and random events (test mode only)."""
    rt = runtime()
    with operator_errors():
        made = seed_demo(rt, orgs=orgs, events=events, hours=hours, seed=seed)
    emit(made, f"seeded {made['events']} events for {len(made['organizations'])} organizations")


COMMANDS = (
    flush_now_command,
    flush_hourly_command,
    enqueue_hourly_command,
    seed_demo_command,
)
