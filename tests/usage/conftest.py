"""Fixtures shared by the flush tests."""

from __future__ import annotations

import pytest

from billing import db
from billing.runtime import Runtime


@pytest.fixture
def sqlite_runtime(billing_settings, tmp_path):
    """The embedded default's database: a migrated SQLite file, same emulator."""
    runtime = Runtime(billing_settings.replace(database_url=f"sqlite:///{tmp_path / 'b.db'}"))
    db.upgrade(runtime.engine)
    yield runtime
    runtime.close()
