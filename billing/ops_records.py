"""Run records: the last outcome of each kind of run, one `ops_records` row per kind.

A CLI process that cron starts dies with its in-memory counters, and a record kept beside the lock
in Redis is lost exactly when Redis is what failed. The database is what every run needs anyway
and every scrape reads, so `flask billing status` and the scrape-time gauges see each run
whichever process made it (a Celery worker, cron, a person), on PostgreSQL and SQLite alike.

Each run rewrites its kind's JSON payload with one upsert (PostgreSQL and SQLite `ON CONFLICT`),
under the row's write lock and compare-and-set on the `updated_at` it read, so two runs recording
at once cannot lose each other's count. A record that cannot be written is logged and never fails
the run it describes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from billing.errors import error_line
from billing.logs import get_logger
from billing.models import OpsRecord, utcnow

log = get_logger("billing.ops_records")

FLUSH = "flush_hourly"  # billing.usage.history
CONTRACT_VALIDATION = "contract_validation"
RECONCILE = "reconcile"  # billing.usage.reconcile: the last scheduled (default window) run

Payload = dict[str, Any]
# Runs of one kind racing to record: each lost compare-and-set means another run's write landed.
_WRITE_ATTEMPTS = 5


def update_record(
    session_factory: sessionmaker[Session], name: str, change: Callable[[Payload | None], Payload]
) -> bool:
    """Replace record `name` with `change(its current payload)`; False (logged) if not written."""
    try:
        for _ in range(_WRITE_ATTEMPTS):
            with session_factory.begin() as session:
                _lock_for_write(session, name)
                row = session.execute(
                    sa.select(OpsRecord.payload, OpsRecord.updated_at).where(OpsRecord.name == name)
                ).first()
                current, seen = (row.payload, row.updated_at) if row else (None, None)
                if _compare_and_set(session, name, _json_safe(change(current)), seen):
                    return True
        reason = f"changed by other runs {_WRITE_ATTEMPTS} times in a row"
    except Exception as error:  # whatever it is, the run it describes must not fail for it
        reason = error_line(error)
    log.warning("billing run record not written", extra={"record": name, "error": reason})
    return False


def _json_safe(payload: Payload) -> Payload:
    # A value JSON cannot hold (a Decimal, a datetime) is kept as text, not the reason the
    # record is lost.
    return json.loads(json.dumps(payload, default=str))


def _lock_for_write(session: Session, name: str) -> None:
    """A no-op update first: it takes the row's lock on PostgreSQL and the database's write lock
    on SQLite (where a plain read starts no transaction), so concurrent writers wait their turn
    instead of losing compare-and-sets until they give up."""
    session.execute(
        sa.update(OpsRecord)
        .where(OpsRecord.name == name)
        .values(updated_at=OpsRecord.updated_at)  # itself: no `onupdate` stamp
    )


def _compare_and_set(session: Session, name: str, payload: Payload, seen: datetime | None) -> bool:
    dialect = session.get_bind().dialect.name
    insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[dialect](OpsRecord)
    values = insert.values(name=name, payload=payload, updated_at=utcnow())
    statement = values.on_conflict_do_update(
        index_elements=[OpsRecord.name],
        set_={"payload": insert.excluded.payload, "updated_at": insert.excluded.updated_at},
        # Only over the version this run read; a row that appeared meanwhile is read again.
        where=OpsRecord.updated_at == seen if seen is not None else sa.false(),
    )
    return session.execute(statement).rowcount == 1


def read_records(session: Session, names: Iterable[str]) -> dict[str, Payload]:
    rows = session.execute(
        sa.select(OpsRecord.name, OpsRecord.payload).where(OpsRecord.name.in_(list(names)))
    )
    return {name: payload for name, payload in rows}
