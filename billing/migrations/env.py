"""Alembic environment: runs migrations on the engine that `billing.db` hands over."""

from alembic import context
from sqlalchemy import create_engine

from billing.models import Base

config = context.config
engine = config.attributes.get("engine") or create_engine(config.get_main_option("sqlalchemy.url"))

with engine.begin() as connection:
    if connection.dialect.name == "sqlite":
        # pysqlite runs DDL outside any transaction unless one was begun explicitly: begin it, so
        # a migration that fails half-way (a refused downgrade) leaves nothing half-done.
        connection.exec_driver_sql("BEGIN")
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    context.run_migrations()
