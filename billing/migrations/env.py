"""Alembic environment: runs migrations on the engine that `billing.db` hands over."""

from alembic import context
from sqlalchemy import Connection, create_engine

from billing.models import Base

config = context.config
engine = config.attributes.get("engine") or create_engine(config.get_main_option("sqlalchemy.url"))


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    context.run_migrations()


shared = config.attributes.get("connection")
if shared is not None:
    run_migrations(shared)  # inside the caller's transaction (`flask billing db adopt`)
else:
    with engine.begin() as connection:
        if connection.dialect.name == "sqlite":
            # pysqlite runs DDL outside any transaction unless one was begun explicitly: begin it,
            # so a migration that fails half-way (a refused downgrade) leaves nothing half-done.
            connection.exec_driver_sql("BEGIN")
        run_migrations(connection)
