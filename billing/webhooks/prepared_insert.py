"""The webhook insert on PostgreSQL, as a prepared statement of each pooled connection's session.

Prepared once per connection, the insert is neither parsed nor planned again by PostgreSQL on
each delivery: that saves some of PostgreSQL's CPU a delivery, while deliveries per second stayed
within the machine's noise (figures in docs/performance.md).

A statement prepared with SQL `PREPARE` lives in the server session. A pooler between us and
PostgreSQL that hands each statement to whichever server session is free (PgBouncer in
transaction mode) can lose it, or bring a session where another process prepared it: its name
carries a hash of its text, so a name found prepared is this very statement (never another
version's, during a deploy) and is used; a connection whose statement went missing uses the
plain INSERT from then on. Either way the delivery is stored by this call. The caller's
connection must be in autocommit (a failed statement would abort a transaction).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from typing import Any

from psycopg2 import errors as pg_errors
from sqlalchemy import Insert
from sqlalchemy.dialects import postgresql

# Key in the pooled connection's `info` (kept for the DBAPI connection's life): True once
# prepared in its session, False once it went missing there.
_PREPARED = "billing_webhook_insert_prepared"


def insert(connection: Any, statement: Insert, row: dict[str, Any]) -> int:
    """Run `statement` with `row` (the same keys, in the same order, on every call) on a pooled
    psycopg2 `connection`; the number of rows it inserted."""
    columns = tuple(row)
    prepare, execute = _prepared_texts(statement, columns)
    with connection.cursor() as cursor:
        if connection.info.get(_PREPARED) is None:
            # A session that has it already has this very statement (the name is its hash).
            with contextlib.suppress(pg_errors.DuplicatePreparedStatement):
                cursor.execute(prepare)
            connection.info[_PREPARED] = True
        if connection.info[_PREPARED]:
            try:
                cursor.execute(execute, tuple(row.values()))
                return int(cursor.rowcount)
            except pg_errors.InvalidSqlStatementName:
                connection.info[_PREPARED] = False
        cursor.execute(_plain_text(statement, columns), row)
        return int(cursor.rowcount)


@functools.cache
def _prepared_texts(statement: Insert, columns: tuple[str, ...]) -> tuple[str, str]:
    """PREPARE (parameters $1, $2… in the order of `columns`) and EXECUTE with psycopg2's %s."""
    dialect = postgresql.psycopg2.dialect(paramstyle="numeric_dollar")
    compiled = statement.compile(dialect=dialect, column_keys=columns)
    if tuple(compiled.positiontup or ()) != columns:
        raise ValueError(f"parameters {compiled.positiontup} are not in the order {columns}")
    text = str(compiled)
    name = "billing_insert_" + hashlib.sha256(text.encode()).hexdigest()[:16]
    return (f"PREPARE {name} AS {text}", f"EXECUTE {name} ({', '.join(['%s'] * len(columns))})")


@functools.cache
def _plain_text(statement: Insert, columns: tuple[str, ...]) -> str:
    return str(statement.compile(dialect=postgresql.psycopg2.dialect(), column_keys=columns))
