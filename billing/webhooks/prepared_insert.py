"""The webhook insert on PostgreSQL, as a prepared statement of each pooled connection's session.

Prepared once per connection, the insert is neither parsed nor planned again by PostgreSQL on
each delivery. Measured under load against the plain INSERT (two interleaved comparisons of 8
and 10 rounds): PostgreSQL's and Redis's CPU a delivery 0.433 → 0.392 and 0.425 → 0.377 ms;
deliveries per second within the machine's noise (median ratios 0.94 and 1.12).

A statement prepared with SQL `PREPARE` lives in the server session. A pooler between us and
PostgreSQL that hands each statement to whichever server session is free (PgBouncer in
transaction mode) can lose it, or find a name prepared already: a connection where preparing
fails, or where the statement went missing, uses the plain INSERT from then on. Either way the
delivery is stored by this call. The caller's connection must be in autocommit (a failed
statement would abort a transaction).
"""

from __future__ import annotations

import functools
from typing import Any

from psycopg2 import errors as pg_errors
from sqlalchemy import Insert
from sqlalchemy.dialects import postgresql

STATEMENT_NAME = "billing_webhook_insert"
# Key in the pooled connection's `info` (kept for the DBAPI connection's life): True once
# prepared in its session, False if that is not possible there.
_PREPARED = "billing_webhook_insert_prepared"


def insert(connection: Any, statement: Insert, row: dict[str, Any]) -> int:
    """Run `statement` with `row` (the same keys, in the same order, on every call) on a pooled
    psycopg2 `connection`; the number of rows it inserted."""
    columns = tuple(row)
    with connection.cursor() as cursor:
        prepared = connection.info.get(_PREPARED)
        if prepared is None:
            prepared = connection.info[_PREPARED] = _prepare(cursor, statement, columns)
        if prepared:
            try:
                cursor.execute(_execute_text(len(columns)), tuple(row.values()))
                return int(cursor.rowcount)
            except pg_errors.InvalidSqlStatementName:
                connection.info[_PREPARED] = False
        cursor.execute(_plain_text(statement, columns), row)
        return int(cursor.rowcount)


def _prepare(cursor: Any, statement: Insert, columns: tuple[str, ...]) -> bool:
    prepare = f"PREPARE {STATEMENT_NAME} AS {_numbered_text(statement, columns)}"
    try:
        try:
            cursor.execute(prepare)
        except pg_errors.DuplicatePreparedStatement:  # another client's, in a pooler's session
            cursor.execute(f"DEALLOCATE {STATEMENT_NAME}")
            cursor.execute(prepare)
    except (pg_errors.DuplicatePreparedStatement, pg_errors.InvalidSqlStatementName):
        return False
    return True


@functools.cache
def _numbered_text(statement: Insert, columns: tuple[str, ...]) -> str:
    """The statement with $1, $2… in the order of `columns` (PREPARE's parameters)."""
    dialect = postgresql.psycopg2.dialect(paramstyle="numeric_dollar")
    compiled = statement.compile(dialect=dialect, column_keys=columns)
    if tuple(compiled.positiontup or ()) != columns:
        raise ValueError(f"parameters {compiled.positiontup} are not in the order {columns}")
    return str(compiled)


@functools.cache
def _plain_text(statement: Insert, columns: tuple[str, ...]) -> str:
    return str(statement.compile(dialect=postgresql.psycopg2.dialect(), column_keys=columns))


@functools.cache
def _execute_text(count: int) -> str:
    return f"EXECUTE {STATEMENT_NAME} ({', '.join(['%s'] * count)})"
