"""Run billing as an operator would, in a separate process, with settings passed as environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
