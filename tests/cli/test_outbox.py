"""`flask billing submissions retry --status failed|rejected [--org-id] [--meter]` and write-off of
rejected rows, over PostgreSQL and the emulator validating asynchronously, as live Stripe."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from billing import create_app
from billing.models import UsageSubmission
from billing.usage.service import flush_pass
from tests.factories import add_accounts, add_events, random_events, submission_statuses
from tests.fixtures.webhooks import wait_until


def invoke(runtime, *args):
    return create_app(runtime.settings).test_cli_runner().invoke(args=["billing", *args])


@pytest.fixture
def rejected(emulator, delivering, webhook_runtime) -> dict[int, set[int]]:
    """Two organizations whose customers Stripe deleted after their usage was sent, both meters:
    {organization: ids of its rejected rows}."""
    emulator.settings(error_report_delay_seconds=1, error_report_samples=100)
    customers = add_accounts(webhook_runtime, [1, 2, 3])
    add_events(webhook_runtime, random_events([1, 2, 3], ["api_call", "storage_gb_hour"], 30))
    for org in (1, 2):
        webhook_runtime.stripe.client.v1.customers.delete(customers[org])
    flush_pass(webhook_runtime)
    by_org = {org: {r.id for r in rows_of(webhook_runtime, org)} for org in (1, 2)}
    wait_until(
        lambda: submission_statuses(webhook_runtime)["rejected"] == sum(map(len, by_org.values())),
        what="the rejections",
    )
    return by_org


def rows_of(runtime, organization_id: int) -> list[UsageSubmission]:
    with runtime.session_factory() as session:
        return list(
            session.scalars(
                sa.select(UsageSubmission).where(UsageSubmission.organization_id == organization_id)
            )
        )


def retry(runtime, *args):
    result = invoke(runtime, "submissions", "retry", *args)
    return result, (json.loads(result.stdout) if result.exit_code == 0 else None)


def test_retry_by_status_takes_one_organization_or_one_meter(webhook_runtime, rejected):
    none, listed = retry(webhook_runtime, "--status", "failed")
    assert none.exit_code == 0 and listed["submission_ids"] == []
    api_call_of_2 = {r.id for r in rows_of(webhook_runtime, 2) if r.event_name == "api_call"}
    _, listed = retry(
        webhook_runtime, "--status", "rejected", "--org-id", "2", "--meter", "api_call"
    )
    assert set(listed["submission_ids"]) == api_call_of_2
    _, listed = retry(webhook_runtime, "--status", "rejected", "--org-id", "1")
    assert set(listed["submission_ids"]) == rejected[1]
    statuses = submission_statuses(webhook_runtime)
    assert statuses["rejected"] == len(rejected[2] - api_call_of_2)
    assert statuses["pending"] == len(rejected[1] | api_call_of_2)


def test_rejected_rows_can_be_written_off_instead(webhook_runtime, rejected):
    ids = sorted(rejected[1] | rejected[2])
    written = invoke(
        webhook_runtime, "submissions", "write-off", *map(str, ids), "--reason", "closed accounts"
    )
    assert written.exit_code == 0, written.output
    assert submission_statuses(webhook_runtime)["written_off"] == len(ids)
    assert flush_pass(webhook_runtime).ok  # nothing waits for an operator any more


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["1", "--status", "rejected"], "not both"),
        (["--all-failed", "--status", "rejected"], "--all-failed is --status failed"),
        (["1", "--org-id", "2"], "select rows by --status"),
        (["1", "--meter", "api_call"], "select rows by --status"),
        (["--org-id", "2"], "give submission IDs or --status"),
        (["--status", "held"], "Invalid value for '--status'"),
    ],
)
def test_retry_refuses_an_ambiguous_selection(billing_runtime, args, message):
    result = invoke(billing_runtime, "submissions", "retry", *args)
    assert result.exit_code == 2 and message in result.output
