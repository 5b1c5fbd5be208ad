"""`db.with_search_path`: every connection made from the URL uses the schema, and a query string
already in the URL (a Unix-socket host, say) is kept."""

from __future__ import annotations

import uuid

import pytest

from billing import db
from tests.conftest import TEST_DATABASE_URL


@pytest.mark.parametrize("query", ["", "?application_name=billing-search-path-test"])
def test_connections_from_the_url_use_the_schema_and_keep_its_query(query):
    if query and "?" in TEST_DATABASE_URL:
        pytest.skip("BILLING_TEST_DATABASE_URL has a query string of its own")
    schema = f"billing_search_path_{uuid.uuid4().hex[:8]}"
    admin = db.make_engine(TEST_DATABASE_URL)
    with admin.begin() as connection:
        connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    engine = db.make_engine(db.with_search_path(TEST_DATABASE_URL + query, schema))
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("SELECT current_schema()").scalar_one() == schema
            application = connection.exec_driver_sql("SHOW application_name").scalar_one()
        assert application == ("billing-search-path-test" if query else "")
    finally:
        engine.dispose()
        with admin.begin() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()
