"""The ingest insert runs as a statement prepared in each pooled connection's session; a session
that loses it, or already has it (a pooler's session another process prepared it in), still
stores every delivery."""

from __future__ import annotations

from typing import Any

from billing.webhooks import service
from tests.fixtures.webhooks import rows


def _event(n: int) -> dict[str, Any]:
    return {"id": f"evt_prepared_{n}", "type": "customer.updated", "object": "event"}


def _in_session(engine: Any, sql: str) -> list[tuple[Any, ...]]:
    """Run `sql` on the ingest pool's connection (serial calls share the one connection)."""
    connection = engine.raw_connection()
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchall() if cursor.description else []
    finally:
        connection.close()


def _prepared_statements(engine: Any) -> dict[str, tuple[str, int]]:
    """name → (statement, times executed) for the session's prepared statements."""
    found = _in_session(
        engine, "SELECT name, statement, generic_plans + custom_plans FROM pg_prepared_statements"
    )
    return {name: (statement, executions) for name, statement, executions in found}


def test_each_insert_runs_the_statement_prepared_in_the_session(webhook_runtime):
    engine = webhook_runtime.ingest_engine
    stored = [service.store_once(engine, _event(n)) for n in (1, 2, 3, 1)]
    assert stored == [True, True, True, False]  # the duplicate runs it too, inserting nothing
    ((statement, executions),) = _prepared_statements(engine).values()
    assert statement.startswith("PREPARE billing_insert_")
    assert " AS INSERT INTO webhook_events " in statement
    assert executions == 4
    assert sorted(row.stripe_event_id for row in rows(webhook_runtime)) == [
        "evt_prepared_1",
        "evt_prepared_2",
        "evt_prepared_3",
    ]


def test_a_session_that_lost_the_statement_still_stores_every_delivery(webhook_runtime):
    """As when a pooler hands the connection another server session: the plain INSERT then."""
    engine = webhook_runtime.ingest_engine
    assert service.store_once(engine, _event(1))
    _in_session(engine, "DEALLOCATE ALL")
    assert service.store_once(engine, _event(2))
    assert service.store_once(engine, _event(3))
    assert _prepared_statements(engine) == {}  # not prepared again on this connection
    assert len(rows(webhook_runtime)) == 3


def test_a_session_that_has_the_statement_already_uses_it(webhook_runtime):
    """As when a pooler hands the connection a server session another process prepared it in
    (the name is the statement's hash, so it is this very statement)."""
    engine = webhook_runtime.ingest_engine
    assert service.store_once(engine, _event(1))
    connection = engine.raw_connection()
    connection.info.clear()  # this client forgets that its session has it
    connection.close()
    assert service.store_once(engine, _event(2))
    assert [executions for _, executions in _prepared_statements(engine).values()] == [2]
    assert len(rows(webhook_runtime)) == 2
