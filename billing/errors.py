"""Errors an operator can act on, and how any error reads in one line: on an operator's terminal
(`Error: …`) and in the run records that `flask billing status` shows.

Every feature's error that a person can fix (bad input, configuration, Stripe refusing a key, a
lock backend down) subclasses `OperatorError`: a command prints it as one line and exits 1,
without the command layer knowing the feature.

SQLAlchemy's text of a database error carries the whole SQL statement, its parameters (customer
data, amounts) and a link, over several lines; the driver's own message says what went wrong.
Multi-line messages (Stripe's connection error) are joined, so a log or cron mail keeps one line
per failure and a script can read it.
"""

from __future__ import annotations

from sqlalchemy.exc import SQLAlchemyError, StatementError

from billing.masking import scrub


class OperatorError(Exception):
    """Something a person can act on: shown as one masked line and a non-zero exit."""


def one_line(text: str) -> str:
    """`text`'s non-blank lines joined by spaces, secrets masked."""
    return scrub(" ".join(part.strip() for part in text.splitlines() if part.strip()))


def error_line(error: BaseException) -> str:
    """What went wrong, in one masked line; a database error names the driver's error only."""
    if isinstance(error, SQLAlchemyError):
        return one_line(f"database error: {_database_message(error)}")
    if isinstance(error, OverflowError):  # SQLite's driver refusing an integer above 64 bits
        return one_line(f"value out of range: {error}")
    return one_line(str(error))


def _database_message(error: SQLAlchemyError) -> str:
    if isinstance(error, StatementError) and error.orig is not None:
        driver = type(error.orig)
        # The first line only: PostgreSQL's next lines point into the SQL ("LINE 2: FROM …").
        lines = [part for part in str(error.orig).splitlines() if part.strip()]
        first = lines[0] if lines else driver.__name__
        return f"({driver.__module__}.{driver.__name__}) {first}"
    return str(error.args[0]) if error.args else type(error).__name__
