"""Run billing as an operator would, in a separate process, with settings passed as environment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from billing import db
from billing.config import Settings

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# Variables of the test process that must not leak into the child's configuration.
_OWN_PREFIXES = ("STRIPE_", "BILLING_", "CELERY_", "DATABASE_URL", "REDIS_URL", "FLASK_")


def billing_env(settings: Settings, **overrides: str) -> dict[str, str]:
    """The environment that configures a billing process exactly as `settings`, plus overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OWN_PREFIXES)}
    values = {
        "STRIPE_BILLING_ENABLED": "1" if settings.billing_enabled else "0",
        "STRIPE_SECRET_KEY": settings.stripe_secret_key,
        "STRIPE_API_BASE": settings.stripe_api_base,
        "STRIPE_BILLING_METERS": ",".join(f"{k}={v}" for k, v in settings.stripe_meters.items()),
        "STRIPE_BILLING_QUEUE": settings.billing_queue,
        "STRIPE_USAGE_FLUSH_LOCK_KEY": settings.flush_lock_key,
        "STRIPE_USAGE_FLUSH_LOCK_TTL_SECONDS": str(settings.flush_lock_ttl_seconds),
        "STRIPE_BILLING_VALIDATE_CONTRACT_BEFORE_FLUSH": (
            "1" if settings.validate_contract_before_flush else "0"
        ),
        "STRIPE_METER_EVENT_RATE_PER_SECOND": str(settings.stripe_meter_event_rate_per_second),
        "STRIPE_BILLING_RETRY_BACKOFF_SECONDS": "0",
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "CELERY_BROKER_URL": settings.celery_broker_url,
    }
    env.update({k: v for k, v in values.items() if v is not None})
    env.update(overrides)
    return env


def run_flask(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`flask billing ARGS` from the project root, as the guide writes it (no --app)."""
    return subprocess.run(
        [str(BIN / "flask"), "billing", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class FlushChild:
    """`flask billing flush_now` in a child process, to be SIGKILLed mid-flight.

    What the killed child left running goes on without it: its calls in the emulator (a cancel
    slowed by a fault keeps its idempotency key "in progress", so the clean pass's repeat is
    refused and waits for a later pass), and its open transaction, whose row locks last until
    PostgreSQL's backend notices the closed socket (the clean pass skips them: SKIP LOCKED).
    `kill()` waits for both: the emulator idle, and no session left with the child's unique
    application_name."""

    def __init__(self, env: dict[str, str]) -> None:
        self.application_name = f"killed-flush-{uuid.uuid4().hex[:12]}"
        self.database_url = env["DATABASE_URL"]
        self.process = subprocess.Popen(
            [str(BIN / "flask"), "billing", "flush_now"],
            cwd=ROOT,
            env={**env, "PGAPPNAME": self.application_name},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def kill(self, emulator: Any, timeout: float = 30) -> None:
        """SIGKILL, then wait until the emulator has answered the calls the child had in flight
        (a repeat of one still running there is refused "in progress" and waits for the next
        pass) and PostgreSQL has ended the child's sessions."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=timeout)
        emulator.wait_idle(timeout)
        if not self.database_url.startswith("postgresql"):
            return
        engine = db.make_engine(self.database_url, poolclass=sa.pool.NullPool)
        query = sa.text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name")
        deadline = time.monotonic() + timeout
        try:
            with engine.connect() as connection:
                while connection.scalar(query, {"name": self.application_name}):
                    assert time.monotonic() < deadline, "the killed flush's sessions never ended"
                    time.sleep(0.02)
        finally:
            engine.dispose()
