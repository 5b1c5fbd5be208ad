"""What a run record calls a successful flush."""

from billing.flush_record import outcome_of
from billing.flush_result import FlushResult


def test_rows_left_for_an_operator_by_earlier_runs_do_not_fail_a_healthy_run():
    result = FlushResult(submissions_sent=3, awaiting_operator={"held": 2, "failed": 0})
    assert not result.ok  # the CLI still exits 1 for them ...
    assert outcome_of(result) == "ok"  # ... but this run did all its own work


def test_work_this_run_left_undone_is_a_failed_run():
    assert outcome_of(FlushResult(stopped_meters={"api_call": "no such meter"})) == "failed"
    assert outcome_of(FlushResult(submissions_pending=1)) == "failed"
    assert outcome_of(FlushResult(lock_lost=True)) == "failed"


def test_runs_that_did_no_work():
    assert outcome_of(FlushResult(skipped=True)) == "skipped_lock"
    assert outcome_of(FlushResult(blocked=True)) == "blocked_contract"
    assert outcome_of(FlushResult(enabled=False)) == "disabled"
