"""What a run record calls a successful flush."""

from billing.usage.history import outcome_of
from billing.usage.result import FlushResult


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


def counts_after(*outcomes: str) -> tuple[int, int]:
    from billing.usage.history import FlushHistory

    history = FlushHistory()
    for outcome in outcomes:
        history = history.after(outcome, {"at": "2026-12-01T10:13:00+00:00", "result": outcome})
    return history.consecutive_lock_skips, history.consecutive_lock_unavailable


def test_runs_refused_with_redis_down_are_counted_in_a_row_until_one_reaches_it():
    assert counts_after("lock_unavailable", "lock_unavailable") == (0, 2)
    assert counts_after("lock_unavailable", "skipped_lock") == (1, 0)  # Redis answered
    assert counts_after("lock_unavailable", "error", "lock_unavailable") == (0, 1)
    assert counts_after("lock_unavailable", "ok") == (0, 0)


def test_redis_down_neither_ends_nor_extends_a_run_of_lock_skips():
    assert counts_after("skipped_lock", "skipped_lock", "lock_unavailable") == (2, 1)
    assert counts_after("skipped_lock", "lock_unavailable", "skipped_lock") == (2, 0)
    assert counts_after("skipped_lock", "failed") == (0, 0)


def test_only_an_ok_run_is_the_last_success():
    from billing.usage.history import FlushHistory

    ok = FlushHistory().after("ok", {"at": "1", "result": "ok"})
    later = ok.after("lock_unavailable", {"at": "2", "result": "lock_unavailable"})
    assert later.last_run == {"at": "2", "result": "lock_unavailable"}
    assert later.last_success == {"at": "1", "result": "ok"}


def test_a_recorded_error_is_one_line():
    from billing.usage.history import run_entry

    stripe_down = FlushResult(
        submissions_pending=2,
        last_error="APIConnectionError: Unexpected error.  If this persists,\nlet us know.\n\n"
        "(Network error: refused)",
    )
    entry = run_entry("failed", stripe_down, error=RuntimeError("one\ntwo"))
    assert entry["last_error"] == (
        "APIConnectionError: Unexpected error.  If this persists, let us know. "
        "(Network error: refused)"
    )
    assert entry["error"] == "RuntimeError: one two"
