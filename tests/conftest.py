"""Shared fixtures: real PostgreSQL (a schema per test session), real Redis, the Stripe emulator.

Services are found at BILLING_TEST_DATABASE_URL / BILLING_TEST_REDIS_URL; `scripts/test.sh` starts
them when they do not answer. Each test that asks for `db_engine` starts from empty tables, and each
that asks for `redis_client` from no Redis keys: every key a test session writes starts with its own
prefix (`REDIS_PREFIX`), and the fixture deletes those, so two test runs on one Redis never
disturb each other (flushing the whole database would).
"""

from __future__ import annotations

import os
import urllib.parse
import uuid
from collections.abc import Iterator

import freezegun
import pytest

TEST_DATABASE_URL = os.environ.get(
    "BILLING_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
TEST_REDIS_URL = os.environ.get("BILLING_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
TEST_SCHEMA = f"billing_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
REDIS_PREFIX = f"{TEST_SCHEMA}:"


def _redis_db_url(url: str, db: int) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{db}"))


# The Celery broker gets its own Redis database: flushing the test database between tests must not
# wipe the broker's queues and bindings under a running worker. Set before billing.celery_app loads.
TEST_BROKER_URL = os.environ.get(
    "BILLING_TEST_BROKER_URL",
    _redis_db_url(
        TEST_REDIS_URL, int(urllib.parse.urlsplit(TEST_REDIS_URL).path.strip("/") or 0) - 1
    ),
)
os.environ["CELERY_BROKER_URL"] = TEST_BROKER_URL
os.environ["CELERY_RESULT_BACKEND"] = TEST_BROKER_URL
os.environ["STRIPE_BILLING_RETRY_BACKOFF_SECONDS"] = "0"
# Task routes are fixed when billing.celery_app loads; tests run their worker on this queue.
TEST_QUEUE = os.environ["STRIPE_BILLING_QUEUE"] = f"billing-tests-{os.getpid()}"
os.environ["STRIPE_BILLING_TASK_MAX_RETRIES"] = "3"

from billing import db  # noqa: E402
from billing.config import Settings  # noqa: E402
from billing.runtime import Runtime  # noqa: E402

# The session's emulator runs in this process (a thread with an asyncio loop): a test that
# freezes time (freezegun) must not freeze it too. A timer its loop set during a freeze (the
# 1 s tick that sends due error reports and renewals) would otherwise fall due only at the
# frozen date, decades away in monotonic time: no thin event was ever sent after such a test.
freezegun.configure(extend_ignore_list=["asyncio", "billing.emulator"])

# Fixtures more than one folder of tests uses: pytest loads them for every test.
pytest_plugins = ["tests.fixtures.processes", "tests.fixtures.saas", "tests.fixtures.webhooks"]

TABLES = (
    "billable_events, usage_submissions, billing_accounts, webhook_events, entitlements, "
    "invoice_adjustments, billing_adjustments, usage_dismissals, ops_records, "
    "meter_error_reports, usage_correction_cancels, billable_event_corrections, usage_corrections"
)
METERS = {"api_call": "api_call", "storage_gb_hour": "storage_gb_hour"}


@pytest.fixture(scope="session")
def database_url() -> str:
    return db.with_search_path(TEST_DATABASE_URL, TEST_SCHEMA)


@pytest.fixture(scope="session")
def migrated_engine(database_url: str) -> Iterator[object]:
    admin = db.make_engine(TEST_DATABASE_URL)
    with admin.begin() as connection:
        connection.exec_driver_sql(f'CREATE SCHEMA "{TEST_SCHEMA}"')
    engine = db.make_engine(database_url)
    db.upgrade(engine)
    yield engine
    engine.dispose()
    with admin.begin() as connection:
        connection.exec_driver_sql(f'DROP SCHEMA "{TEST_SCHEMA}" CASCADE')
    admin.dispose()


@pytest.fixture
def db_engine(migrated_engine):
    with migrated_engine.begin() as connection:
        connection.exec_driver_sql(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    return migrated_engine


@pytest.fixture
def redis_client():
    import redis

    client = redis.Redis.from_url(TEST_REDIS_URL)

    def delete_session_keys() -> None:
        keys = list(client.scan_iter(match=f"{REDIS_PREFIX}*", count=1000))
        if keys:
            client.delete(*keys)

    delete_session_keys()
    yield client
    delete_session_keys()
    client.close()


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(
        billing_enabled=True,
        stripe_secret_key="sk_test_billingtests0000",
        stripe_webhook_secret="whsec_billingtests0000",
        stripe_meters=dict(METERS),
        database_url=database_url,
        billing_queue=TEST_QUEUE,
        flush_lock_key=f"{REDIS_PREFIX}flush-lock",
        redis_url=TEST_REDIS_URL,
        celery_broker_url=TEST_BROKER_URL,
        celery_result_backend=TEST_BROKER_URL,
        validate_contract_before_flush=False,
        retry_backoff_seconds=0.001,
        retry_backoff_max_seconds=0.01,
        stripe_meter_event_rate_per_second=10_000,
        flush_lock_ttl_seconds=30,
    )


@pytest.fixture
def make_runtime(db_engine, redis_client):
    """Build runtimes sharing the session's engine (its pool) and the test Redis."""
    made: list[Runtime] = []

    def build(settings: Settings) -> Runtime:
        runtime = Runtime(settings)
        runtime.__dict__["engine"] = db_engine
        made.append(runtime)
        return runtime

    yield build
    for runtime in made:
        runtime.__dict__.pop("engine", None)
        runtime.close()


# A real Celery worker ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker():
    """A real worker (an in-process thread) consuming the session's queue on the Redis broker."""
    from celery.contrib.testing.worker import start_worker

    from billing.celery_app import celery_app

    celery_app.conf.result_backend_transport_options = {"retry_policy": {"max_retries": 1}}
    # Messages an earlier test queued with no worker running (and its runtime gone since) must
    # not reach this module's worker: they would run, or retry, against the wrong database.
    with celery_app.connection_for_write(TEST_BROKER_URL) as connection:
        connection.default_channel.queue_purge(TEST_QUEUE)
    with start_worker(
        celery_app, perform_ping_check=False, queues=[TEST_QUEUE], shutdown_timeout=5
    ) as w:
        yield w


@pytest.fixture
def retries():
    """The reasons of every task retry the worker schedules during the test."""
    from celery.signals import task_retry

    seen: list[str] = []

    def record(sender=None, request=None, reason=None, **_):
        seen.append(str(reason))

    task_retry.connect(record, weak=False)
    yield seen
    task_retry.disconnect(record)


# The Stripe emulator ---------------------------------------------------------------------------


class EmulatorHandle:
    """The running emulator plus its `/_emulator/` controls, for assertions."""

    def __init__(self, server) -> None:
        self.server = server
        self.url: str = server.url

    def control(self, method: str, path: str, body: dict | None = None) -> dict:
        import json
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.url}/_emulator/{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read().decode()
        return json.loads(text) if text else {}

    def reset(self) -> None:
        self.control("POST", "reset", {})

    def stats(self) -> dict:
        return self.control("GET", "stats")

    def wait_idle(self, timeout: float = 30) -> None:
        """Until every API request the emulator received is answered: a killed client's calls
        still run to their end there (a slowed cancel keeps its idempotency key in progress)."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            answered = {k: sum(v.values()) for k, v in stats["responses"].items()}
            busy = {
                key: count
                for key, count in stats["requests"].items()
                if not key.split(" ", 1)[-1].startswith("/_emulator/")
                and count > answered.get(key, 0)
            }
            if not busy:
                return
            assert time.monotonic() < deadline, f"emulator still busy: {busy}"
            time.sleep(0.02)

    def billed(self) -> dict[str, dict[str, int]]:
        """{customer id: {meter event name: sum of accepted values}}."""
        return self.stats()["billed"]

    def faults(self, body: dict) -> dict:
        return self.control("POST", "faults", body)

    def advance(self, seconds: int) -> dict:
        return self.control("POST", "clock", {"advance": seconds})

    def settings(self, **changes) -> dict:
        """`meter_validation`, `error_report_delay_seconds`, `summary_lag_seconds`, ... (see
        billing/emulator/README.md); a reset restores the server's own."""
        return self.control("POST", "settings", changes)


@pytest.fixture(scope="session")
def emulator_server() -> Iterator[EmulatorHandle]:
    from billing.emulator import EmulatorServer

    server = EmulatorServer(host="127.0.0.1", port=0)
    server.start()
    yield EmulatorHandle(server)
    server.stop()


@pytest.fixture
def emulator(emulator_server: EmulatorHandle) -> EmulatorHandle:
    """A reset emulator with the rate ceilings raised (tests that want 429s inject them)."""
    emulator_server.reset()
    emulator_server.control("POST", "limits", {"preset": "off"})
    return emulator_server


@pytest.fixture
def sync_meter_validation(emulator: EmulatorHandle) -> EmulatorHandle:
    """The emulator answering each failed meter-event check with a 400 at once (its `sync`
    mode), for the tests of the flush's synchronous per-row / per-customer / per-meter stops.
    Like live Stripe the session's emulator otherwise validates asynchronously: a 200, and a
    thin error report later."""
    emulator.settings(meter_validation="sync")
    return emulator


@pytest.fixture
def billing_settings(settings: Settings, emulator: EmulatorHandle) -> Settings:
    """Settings pointed at the emulator, with the test meters created there."""
    from billing.stripe_gateway import StripeGateway

    configured = settings.replace(stripe_api_base=emulator.url)
    gateway = StripeGateway.from_settings(configured)
    for event_name in sorted(set(METERS.values())):
        gateway.ensure_meter(event_name)
    return configured


@pytest.fixture
def billing_runtime(make_runtime, billing_settings: Settings) -> Runtime:
    return make_runtime(billing_settings)


@pytest.fixture
def sqlite_runtime(billing_settings, tmp_path):
    """The embedded default's database: a migrated SQLite file, same emulator."""
    runtime = Runtime(billing_settings.replace(database_url=f"sqlite:///{tmp_path / 'b.db'}"))
    db.upgrade(runtime.engine)
    yield runtime
    runtime.close()
