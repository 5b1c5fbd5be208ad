"""Engine and session construction, and the Alembic migration commands."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from alembic.config import Config

# Alembic (with Mako and Pygments) is imported where migrations are run or read, not with this
# module: it was 150 ms of every `flask billing` command's start, and the test suite starts
# hundreds of them.

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def normalize_database_url(database_url: str) -> str:
    """Plain `postgresql://` means psycopg2 here: SQLAlchemy 2.1 would pick psycopg 3 otherwise."""
    for plain in ("postgresql://", "postgres://"):
        if database_url.startswith(plain):
            return "postgresql+psycopg2://" + database_url[len(plain) :]
    return database_url


def with_search_path(database_url: str, schema: str) -> str:
    """The PostgreSQL URL with a search_path option, so every connection made from it (in any
    process) uses `schema`; a query string already in the URL is kept."""
    separator = "&" if "?" in database_url else "?"
    return f"{database_url}{separator}options=" + quote(f"-csearch_path={schema}")


def make_engine(database_url: str, **kwargs: object) -> Engine:
    database_url = normalize_database_url(database_url)
    if database_url.startswith("sqlite"):
        engine = create_engine(database_url, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(database_url, pool_pre_ping=True, **kwargs)


def make_autocommit_engine(engine: Engine) -> Engine:
    """An engine for single-statement writes on a hot path (the webhook insert), on `engine`'s
    database: autocommit from the connection's first use, so a checkout neither switches
    isolation levels nor rolls back on return, and no pre-ping (a round trip per checkout, a large
    share of an ingest's time): a dropped connection is invalidated by the failed statement and the
    caller retries on a new one. SQLite (one file, maybe in memory) shares `engine`'s pool."""
    if engine.dialect.name == "sqlite":
        return engine.execution_options(isolation_level="AUTOCOMMIT")
    return create_engine(engine.url, isolation_level="AUTOCOMMIT", pool_reset_on_return=None)


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    # WAL lets the CLI read while a flush writes; foreign keys are off by default in SQLite.
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(engine: Engine) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # env.py uses this connection (and its search_path) instead of opening its own.
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(engine), revision)


def upgrade_in(connection: Connection, revision: str = "head") -> None:
    """Upgrade inside the caller's transaction: it commits or rolls back the whole of it."""
    from alembic import command

    config = alembic_config(connection.engine)
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


def downgrade(engine: Engine, revision: str) -> None:
    from alembic import command

    command.downgrade(alembic_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return revision_of(connection)


def revision_of(connection: Connection) -> str | None:
    """The migration revision applied in the database of `connection` (None: none yet)."""
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(MIGRATIONS_DIR))
    return script.get_current_head()
