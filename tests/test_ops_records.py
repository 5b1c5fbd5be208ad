"""The run records in the database (`ops_records`): written by every run, on PostgreSQL and on the
embedded SQLite default, never lost to a concurrent run, and never the reason a run fails."""

from __future__ import annotations

import logging
import threading

import pytest

from billing import create_app, db, ops_records
from billing.runtime import Runtime
from billing.usage import history as flush_record
from billing.usage.service import flush_guarded
from tests.fixtures.processes import recent_usage


@pytest.fixture(params=["postgresql", "sqlite"])
def runtime(request, billing_runtime, billing_settings, tmp_path):
    """billing's database on each backend; SQLite with the file lock, as the embedded default."""
    if request.param == "postgresql":
        yield billing_runtime
        return
    embedded = Runtime(
        billing_settings.replace(
            database_url=f"sqlite:///{tmp_path / 'billing.db'}", flush_lock_backend="file"
        )
    )
    db.upgrade(embedded.engine)
    yield embedded
    embedded.close()


def history(runtime: Runtime) -> flush_record.FlushHistory:
    with runtime.session_factory() as session:
        payload = ops_records.read_records(session, [ops_records.FLUSH]).get(ops_records.FLUSH)
    return flush_record.FlushHistory.from_payload(payload)


def test_runs_recording_at_once_lose_no_count(runtime):
    threads, runs = 4, 15

    def record() -> None:
        for _ in range(runs):
            assert flush_record.record_run(runtime.session_factory, flush_record.SKIPPED_LOCK)

    workers = [threading.Thread(target=record) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert history(runtime).consecutive_lock_skips == threads * runs


def test_status_reads_the_record_with_either_lock_backend(runtime, emulator):
    recent_usage(runtime)
    assert flush_guarded(runtime).ok
    result = create_app(runtime.settings).test_cli_runner().invoke(args=["billing", "status"])
    assert result.exit_code == 0, result.output
    assert "not recorded" not in result.stdout
    assert " ok (claimed 2, sent 2, failed 0, pending 0)" in result.stdout
    recorded = history(runtime)
    assert recorded.last_success == recorded.last_run and recorded.last_run["billed_value"] == {
        "api_call": 15
    }


def test_a_record_that_cannot_be_written_is_logged_and_the_flush_goes_on(
    billing_runtime, emulator, caplog
):
    recent_usage(billing_runtime)
    with billing_runtime.engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE ops_records RENAME TO ops_records_away")
    try:
        with caplog.at_level(logging.WARNING, logger="billing.ops_records"):
            result = flush_guarded(billing_runtime)
    finally:
        with billing_runtime.engine.begin() as connection:
            connection.exec_driver_sql("ALTER TABLE ops_records_away RENAME TO ops_records")
    assert result.ok and result.billed_value == {"api_call": 15}
    assert (
        emulator.billed()
        and sum(sum(per_meter.values()) for per_meter in emulator.billed().values()) == 15
    )
    [warning] = [r for r in caplog.records if r.getMessage() == "billing run record not written"]
    assert warning.record == ops_records.FLUSH
    assert warning.error.startswith("database error: (psycopg2.errors.UndefinedTable)")
    assert history(billing_runtime).last_run is None
