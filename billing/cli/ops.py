"""Operator commands: `flask billing preflight|smoke_org|status|reconcile|config` and
`flask billing lock show|release`.

The checks print a table (or JSON with `--json`) on stdout and exit 1 when they fail closed;
usage errors (a bad flag value, an unknown organization) exit 2.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import click
import redis
from flask.cli import AppGroup, with_appcontext

from billing.accounts import UnknownOrganizationError
from billing.cli.core import emit, finish, json_option, operator_errors, runtime, show
from billing.masking import scrub
from billing.models import utcnow
from billing.ops.preflight import run_preflight
from billing.ops.smoke import DEFAULT_SETTLE_SECONDS, smoke_org
from billing.ops.state import OpsState, read_state
from billing.runtime import current_runtime
from billing.usage import history
from billing.usage.error_reports import reconcile_error_reports
from billing.usage.lock import ReleaseOutcome, inspect_lock, release_dead_holder
from billing.usage.reconcile import default_window, reconcile, reconcile_scheduled


@contextmanager
def ops_errors() -> Iterator[None]:
    """Operator and database errors as `operator_errors` does, and Redis errors as one line."""
    with operator_errors():
        try:
            yield
        except redis.RedisError as error:
            raise click.ClickException(scrub(f"Redis error: {error}")) from error


@click.command("status")
@with_appcontext
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a summary.")
def status_command(as_json: bool) -> None:
    """Last flush, last contract validation, backlog, outbox and webhook rows by status, and who
    holds the flush lock. Exit 1 when the database or Redis did not answer (with Redis down the
    rest is shown first)."""
    rt = runtime()
    with ops_errors():
        state = read_state(rt)
    if as_json:
        click.echo(json.dumps(state.to_dict(), indent=2, sort_keys=True, default=str))
    else:
        click.echo(status_text(state))
    if state.lock_error:
        raise click.ClickException(state.lock_error)


def status_text(state: OpsState) -> str:
    data = state.to_dict()
    backlog = data["backlog"]
    set_aside = {reason: n for reason, n in data["unbillable"].items() if n}
    lines = [
        f"backlog: {backlog['unclaimed_events']} unclaimed events, oldest "
        f"{backlog['oldest_unclaimed_event_at'] or '-'}; oldest unbilled usage "
        f"{backlog['oldest_unbilled_at'] or '-'} ({_age(backlog['oldest_unbilled_age_seconds'])})",
        "unbillable (set aside, pending): "
        + (
            f"{_counts(set_aside)}; list with `flask billing usage unbillable`"
            if set_aside
            else "none"
        ),
        "outbox (not sent): " + _counts(data["outbox_by_status"]),
        "webhooks (open): " + _counts(data["webhooks_by_status"]),
    ]
    flush = data["flush"]
    lines.append("last flush: " + _run(flush["last_run"]))
    lines.append("last successful flush: " + _run(flush["last_success"]))
    if flush["consecutive_lock_skips"]:
        lines.append(f"runs skipped by the lock in a row: {flush['consecutive_lock_skips']}")
    if flush["consecutive_lock_unavailable"]:
        lines.append(
            f"runs refused with Redis unreachable in a row: {flush['consecutive_lock_unavailable']}"
        )
    lines.append("last contract validation: " + _validation(data["contract_validation"]))
    lines.append("last reconciliation: " + _reconciliation(data["reconcile"]))
    lines.append("flush lock: " + _lock(data["lock"]))
    return "\n".join(lines)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{status} {n}" for status, n in sorted(counts.items()))


def _age(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds:.0f} s"


def _run(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "never"
    detail = f"{entry['at']} {entry['result']}"
    # Counts only of runs that did work: a skipped, refused or raising run has none to show.
    if "submissions_sent" in entry and entry["result"] in (history.OK, history.FAILED):
        detail += (
            f" (claimed {entry.get('events_claimed', 0)}, sent {entry['submissions_sent']}, "
            f"failed {entry.get('submissions_failed', 0)}, "
            f"pending {entry.get('submissions_pending', 0)})"
        )
    if entry.get("error"):
        detail += f": {entry['error']}"
    return detail


def _validation(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "never"
    verdict = "passed" if entry["ok"] else "FAILED " + ", ".join(entry["failed_checks"])
    return f"{entry['at']} {verdict} ({entry['source']}, {entry['lookback_days']} days)"


def _reconciliation(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "never"
    verdict = "ok" if entry["ok"] else "NEEDS A LOOK"
    return f"{entry['at']} {verdict} ({_counts(entry['groups'])}; {entry['source']})"


def _lock(lock: dict[str, Any]) -> str:
    if lock.get("error"):
        return f"unknown ({lock['error']})"
    if lock.get("held") is None:
        return f"{lock.get('backend')} backend (not inspectable)"
    if not lock["held"]:
        return "free"
    holder = lock["holder"]
    if "host" not in holder:
        return f"held by an unnamed token, expires in {lock['expires_in_seconds']} s"
    heartbeat = "alive" if lock["heartbeat_alive"] else "STOPPED"
    return (
        f"held by {holder['host']} pid {holder['pid']} task {holder['task_id'] or '-'} since "
        f"{holder['since']} ({_age(lock['held_seconds'])}); heartbeat {heartbeat} "
        f"({lock['heartbeat_age_seconds']} s ago); expires in {lock['expires_in_seconds']} s"
    )


@click.group("lock", cls=AppGroup)
def lock_cli() -> None:
    """The flush overlap lock (Redis)."""


@lock_cli.command("show")
def lock_show_command() -> None:
    """Print who holds the flush lock, since when, and whether its heartbeat is alive."""
    rt = runtime()
    with ops_errors():
        state = inspect_lock(rt.redis, rt.settings.flush_lock_key)
    emit(state.to_dict() if state else {"key": rt.settings.flush_lock_key, "held": False})


@lock_cli.command("release")
@click.option(
    "--if-holder-dead",
    is_flag=True,
    help="For scripts (e.g. ExecStartPre): exit 0 doing nothing when the holder is alive.",
)
def lock_release_command(if_holder_dead: bool) -> None:
    """Free a stale flush lock: its holder's heartbeat stopped, or its process on this host is
    gone. A lock whose heartbeat is alive is never freed (exit 1, or 0 with --if-holder-dead)."""
    rt = runtime()
    with ops_errors():
        state = inspect_lock(rt.redis, rt.settings.flush_lock_key)
        outcome = ReleaseOutcome.NOT_HELD if state is None else release_dead_holder(rt.redis, state)
    payload = {"key": rt.settings.flush_lock_key, "outcome": outcome.value}
    if state is not None:
        payload["lock"] = state.to_dict()
    emit(payload)
    refused = outcome in (ReleaseOutcome.HOLDER_ALIVE, ReleaseOutcome.CHANGED_HANDS)
    if refused and not if_holder_dead:
        click.echo(
            f"lock not released: {outcome.value} (a live holder's lock is never freed)", err=True
        )
        sys.exit(1)


# A person waits on smoke_org: an hour is the most a terminal session should.
MAX_SMOKE_SETTLE_SECONDS = 3600.0

ISO_FORMATS = ["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d"]


@click.command("reconcile")
@with_appcontext
@click.option(
    "--since",
    type=click.DateTime(ISO_FORMATS),
    default=None,
    help="Start (UTC, ISO 8601). Default: 48 h ago, or the oldest held row's hour.",
)
@click.option(
    "--until",
    type=click.DateTime(ISO_FORMATS),
    default=None,
    help="End, exclusive (UTC, ISO 8601). Default: the start of the last hour that ended "
    "STRIPE_BILLING_RECONCILE_SETTLE_SECONDS ago.",
)
@click.option(
    "--error-reports",
    is_flag=True,
    help="Instead of hours: the meter error reports whose summaries settled, each over its "
    "window (what beat runs every 5 minutes).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def reconcile_command(
    since: datetime | None, until: datetime | None, error_reports: bool, as_json: bool
) -> None:
    """Outbox vs Stripe's meter event summaries per customer, meter and hour; settles rows held
    past Stripe's 24-hour identifier window. Hours younger than the settle lag are not settled,
    never drift. Without --since/--until this is the scheduled run (recorded: `status` and the
    alerts see it). Exit 1 on drift or when Stripe could not answer (with --error-reports: when
    a report's missing rows could not be told exactly)."""
    rt = runtime()
    if error_reports:
        if since or until:
            raise click.BadParameter("--error-reports takes no --since/--until")
        _reconcile_error_reports(rt, as_json)
        return
    progress = _progress_bar("reconciling")
    with ops_errors():
        if since is None and until is None:
            report = reconcile_scheduled(rt, source="cli", progress=progress)
        else:
            start, end = default_window(rt, utcnow())
            start, end = _utc(since) or start, _utc(until) or end
            if start >= end:
                raise click.BadParameter("--since must be before --until")
            report = reconcile(rt, start, end, progress=progress)
    payload = report.to_dict()
    if as_json:
        click.echo(json.dumps(payload, indent=2, sort_keys=True, default=str))
    else:
        click.echo(reconcile_text(payload))
    if not report.ok:
        sys.exit(1)


def _reconcile_error_reports(rt: Any, as_json: bool) -> None:
    with ops_errors():
        results = [result.to_dict() for result in reconcile_error_reports(rt)]
    if as_json:
        click.echo(json.dumps({"reports": results}, indent=2, sort_keys=True, default=str))
    else:
        click.echo(f"meter error reports due: {len(results)}")
        for r in results:
            click.echo(
                f"{r['status']:<10} {r['event_id']} {r['meter']}: {r['detail']}"
                + (f" [rejected: {r['rejected']}]" if r["rejected"] else "")
                + (
                    f" [ambiguous: {'; '.join(r['ambiguous_hours'])}]"
                    if r["ambiguous_hours"]
                    else ""
                )
            )
    if any(r["status"] == "ambiguous" for r in results):
        sys.exit(1)


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _progress_bar(label: str) -> Any:
    """A progress bar on a terminal; silent otherwise (cron, logs, pipes)."""

    def wrap(items: Any) -> Any:
        items = list(items)
        if not sys.stderr.isatty():
            yield from items
            return
        with click.progressbar(items, label=label, file=sys.stderr) as bar:
            yield from bar

    return wrap


def reconcile_text(payload: dict[str, Any]) -> str:
    counts = payload["groups"]
    lines = [
        f"{payload['since']} .. {payload['until']}: "
        + ", ".join(f"{status} {n}" for status, n in counts.items())
        + f"; settled: delivered {payload['settled']['delivered']}, "
        f"reissued {payload['settled']['reissued']}; rows marked rejected "
        f"{payload['rejected_rows']}"
    ]
    for group in payload["problems"]:
        lines.append(
            f"{group['status']:<9} {group['stripe_customer_id']} {group['meter']} {group['hour']}"
            f" Stripe {group['stripe_total']} outbox sent {group['sent_total']}"
            + (f" ({group['detail']})" if group["detail"] else "")
            + (f" [settled: {group['settled']}]" if group["settled"] else "")
            + (f" [rejected: {group['rejected']}]" if group["rejected"] else "")
        )
        for row in group["rows"]:
            lines.append(
                f"    row {row['id']} {row['status']} value {row['value']} "
                f"identifier {row['identifier']}"
            )
    return "\n".join(lines)


@click.command("config")
@with_appcontext
def config_command() -> None:
    """Print the effective settings, secrets masked."""
    emit(runtime().settings.masked())


@click.command("preflight")
@with_appcontext
@click.option("--require-enabled", is_flag=True, help="Fail unless STRIPE_BILLING_ENABLED=1.")
@click.option("--fail-closed", is_flag=True, help="Exit 1 when any check fails.")
@json_option
def preflight_command(require_enabled: bool, fail_closed: bool, as_json: bool) -> None:
    """Check configuration, database, Redis, the Celery broker and Stripe before billing."""
    report = run_preflight(current_runtime, require_enabled=require_enabled)
    show(report, as_json)
    finish(report, fail_closed=fail_closed, what="preflight")


@click.command("smoke_org")
@with_appcontext
@click.option("--org-id", type=int, required=True, help="The organization to check.")
@click.option("--require-enabled", is_flag=True, help="Fail unless STRIPE_BILLING_ENABLED=1.")
@click.option(
    "--validate-contract", is_flag=True, help="Run the contract checks for this organization first."
)
@click.option("--fail-closed", is_flag=True, help="Exit 1 when any step fails (the default).")
@click.option("--skip-contract", is_flag=True, help="Skip the contract checks (diagnosis).")
@click.option(
    "--no-fail-closed",
    is_flag=True,
    help="Always exit 0 with the report (overrides --fail-closed).",
)
@click.option(
    "--refresh-period",
    is_flag=True,
    help="Sync the subscription's current period from Stripe first.",
)
@click.option(
    "--settle-seconds",
    type=click.FloatRange(0, MAX_SMOKE_SETTLE_SECONDS),
    default=DEFAULT_SETTLE_SECONDS,
    show_default=True,
    help="Longest wait for Stripe's meter event summaries to catch up with what was sent "
    "(progress on stderr); still short after it: `not settled after N s`.",
)
@json_option
def smoke_org_command(
    org_id: int,
    require_enabled: bool,
    validate_contract: bool,
    fail_closed: bool,
    skip_contract: bool,
    no_fail_closed: bool,
    refresh_period: bool,
    settle_seconds: float,
    as_json: bool,
) -> None:
    """End-to-end check of one organization in Stripe test mode: flush it, confirm in Stripe."""
    rt = runtime()
    with operator_errors():
        try:
            report = smoke_org(
                rt,
                org_id,
                require_enabled=require_enabled,
                validate_contract=validate_contract and not skip_contract,
                refresh_period=refresh_period,
                settle_seconds=settle_seconds,
                progress=lambda message: click.echo(message, err=True),
            )
        except UnknownOrganizationError as error:  # a usage error (exit 2), not an operator's
            raise click.BadParameter(str(error), param_hint="'--org-id'") from error
    show(report, as_json)
    # Failing closed is the default; --fail-closed only says so explicitly.
    finish(report, fail_closed=not no_fail_closed, what=f"smoke check of organization {org_id}")


COMMANDS = (
    preflight_command,
    smoke_org_command,
    status_command,
    lock_cli,
    reconcile_command,
    config_command,
)
