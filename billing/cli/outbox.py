"""`flask billing submissions list|retry|write-off`: thin commands over `billing.usage.outbox`."""

from __future__ import annotations

import json

import click
from flask.cli import AppGroup

from billing.checks.report import render_table
from billing.cli.core import ACTOR, emit, operator_errors, runtime
from billing.models import SubmissionStatus
from billing.usage.outbox import (
    DEFAULT_LIMIT,
    LISTED_BY_DEFAULT,
    RETRYABLE_STATUSES,
    list_submissions,
    retry_submissions,
    submission_ids,
    write_off_submissions,
)

STATUSES = [s.value for s in SubmissionStatus]
ORG_ID = click.option(
    "--org-id", type=click.IntRange(min=1), default=None, help="One organization only."
)
METER = click.option(
    "--meter", default=None, help="One meter only: the event name the rows were sent under."
)


@click.group("submissions", cls=AppGroup)
def submissions_cli() -> None:
    """The usage outbox: list rows, retry failed or rejected ones, write off what will never be
    billed."""


@submissions_cli.command("list")
@click.option(
    "--status",
    "statuses",
    type=click.Choice(STATUSES),
    multiple=True,
    help=f"Repeatable; default: {', '.join(LISTED_BY_DEFAULT)}.",
)
@ORG_ID
@METER
@click.option("--limit", type=click.IntRange(min=1, max=100_000), default=DEFAULT_LIMIT)
@click.option("--json", "as_json", is_flag=True, help="JSON with each row's audit trail.")
def list_command(
    statuses: tuple[str, ...], org_id: int | None, meter: str | None, limit: int, as_json: bool
) -> None:
    """List outbox rows, oldest first."""
    rt = runtime()
    with operator_errors():
        rows, total = list_submissions(
            rt,
            statuses=statuses or LISTED_BY_DEFAULT,
            organization_id=org_id,
            event_name=meter,
            limit=limit,
        )
    if as_json:
        listing = {"submissions": rows, "total": total}
        click.echo(json.dumps(listing, indent=2, sort_keys=True, default=str))
        return
    if total > len(rows):
        click.echo(f"showing the oldest {len(rows)} of {total} rows (--limit)", err=True)
    headers = ("id", "status", "org", "event_name", "value", "hour", "attempts", "last_error")
    click.echo(
        render_table(
            headers,
            [
                (
                    r["id"],
                    r["status"],
                    r["organization_id"],
                    r["event_name"],
                    r["value"],
                    f"{r['window_start']:%Y-%m-%d %H:%M}",
                    r["attempts"],
                    r["last_error"] or "",
                )
                for r in rows
            ],
        )
    )


@submissions_cli.command("retry")
@click.argument("ids", nargs=-1, type=click.IntRange(min=1))
@click.option(
    "--status",
    type=click.Choice(RETRYABLE_STATUSES),
    default=None,
    help="Every row in this status (with --org-id, --meter: theirs only). Rejected rows get a "
    "NEW identifier: Stripe refused the old one after accepting it, and may still dedupe it.",
)
@click.option("--all-failed", is_flag=True, help="Every failed row (as --status failed).")
@ORG_ID
@METER
@click.option(
    "--reissue-held",
    is_flag=True,
    help="Also re-send HELD rows, with a NEW identifier. Only after reconciling them against "
    "Stripe's meter event summaries: an earlier attempt may have been billed.",
)
@ACTOR
def retry_command(
    ids: tuple[int, ...],
    status: str | None,
    all_failed: bool,
    org_id: int | None,
    meter: str | None,
    reissue_held: bool,
    actor: str,
) -> None:
    """Put failed rows back to pending for the next flush (same identifier), and rejected rows
    (new identifier), once the cause is fixed."""
    if all_failed:
        if status not in (None, "failed"):
            raise click.UsageError("--all-failed is --status failed; give one of them")
        status = "failed"
    if bool(ids) == (status is not None):
        raise click.UsageError("give submission IDs or --status/--all-failed (not both)")
    if ids and (org_id is not None or meter is not None):
        raise click.UsageError("--org-id and --meter select rows by --status, not with IDs")
    rt = runtime()
    with operator_errors():
        chosen = list(ids) or submission_ids(
            rt, str(status), organization_id=org_id, event_name=meter
        )
        if not chosen:
            emit({"action": "retry", "submission_ids": [], "actor": actor}, f"no {status} rows")
            return
        result = retry_submissions(rt, chosen, actor=actor, reissue_held=reissue_held)
    emit(result.to_dict(), f"{len(result.submission_ids)} row(s) pending for the next flush")


@submissions_cli.command("write-off")
@click.argument("ids", nargs=-1, type=click.IntRange(min=1), required=True)
@click.option("--reason", required=True, help="Why this usage is never billed (kept).")
@ACTOR
def write_off_command(ids: tuple[int, ...], reason: str, actor: str) -> None:
    """Mark failed, held or rejected rows as never billed, with the reason."""
    rt = runtime()
    with operator_errors():
        result = write_off_submissions(rt, list(ids), reason=reason, actor=actor)
    emit(result.to_dict(), f"{len(result.submission_ids)} row(s) written off")


COMMANDS = (submissions_cli,)
