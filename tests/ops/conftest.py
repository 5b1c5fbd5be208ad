"""Real Celery worker (and Flower) subprocesses for the ops tests, configured by environment."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from billing.config import Settings
from tests.conftest import TEST_BROKER_URL, TEST_QUEUE

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that makes a subprocess load `settings` (what an env file would hold)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STRIPE_", "BILLING_", "PROM"))}
    env.update(
        STRIPE_BILLING_ENABLED="1" if settings.billing_enabled else "0",
        STRIPE_SECRET_KEY=settings.stripe_secret_key or "",
        STRIPE_API_BASE=settings.stripe_api_base or "",
        STRIPE_BILLING_METERS=",".join(f"{k}={v}" for k, v in settings.stripe_meters.items()),
        STRIPE_BILLING_QUEUE=settings.billing_queue,
        STRIPE_USAGE_FLUSH_LOCK_KEY=settings.flush_lock_key,
        STRIPE_BILLING_VALIDATE_CONTRACT_BEFORE_FLUSH="0",
        STRIPE_BILLING_RETRY_BACKOFF_SECONDS="0",
        STRIPE_METER_EVENT_RATE_PER_SECOND="10000",
        DATABASE_URL=settings.database_url,
        REDIS_URL=settings.redis_url,
        CELERY_BROKER_URL=settings.celery_broker_url,
        CELERY_RESULT_BACKEND=settings.celery_result_backend or TEST_BROKER_URL,
        BILLING_LOG_FORMAT="json",
    )
    env.update(extra)
    return env


class Processes:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: list[subprocess.Popen] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
        process.log_path = self.log_dir / f"{name}.log"  # type: ignore[attr-defined]
        self.running.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.running:
            if process.poll() is None:
                process.terminate()
        for process in self.running:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    yield started
    started.stop_all()


def worker_queue() -> str:
    return f"{TEST_QUEUE}-{uuid.uuid4().hex[:6]}"


def celery_worker_args(queue: str, *extra: str) -> list[str]:
    return [
        str(BIN / "celery"),
        "-A",
        "billing.celery_app",
        "worker",
        "-Q",
        queue,
        "-n",
        f"{queue}-{uuid.uuid4().hex[:4]}@%h",
        "--without-mingle",
        "--without-gossip",
        "--loglevel",
        "INFO",
        *extra,
    ]


def wait_for_http(url: str, timeout: float = 30, auth: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url)
    if auth:
        import base64

        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(request, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def unit_command(unit: str, install_root: Path, substitutions: dict[str, str]) -> list[str]:
    """A systemd unit's ExecStart as argv, with the install root and variables filled in."""
    import shlex

    text = (Path(__file__).resolve().parents[2] / "ops" / "systemd" / unit).read_text()
    joined = text.replace("\\\n", " ")
    line = next(x for x in joined.splitlines() if x.startswith("ExecStart="))
    command = line.removeprefix("ExecStart=").replace("/opt/billing", str(install_root))
    for old, new in substitutions.items():
        command = command.replace(old, new)
    return shlex.split(command)


def venv_root() -> Path:
    return BIN.parent.parent


def recent_usage(runtime, orgs=(1, 2), minutes_ago: int = 20):
    """Billing accounts for `orgs` and one api_call event each (5 units per org id)."""
    from billing.models import utcnow
    from tests.usage.factories import add_accounts, add_events

    customers = add_accounts(runtime, list(orgs))
    rows = [
        {
            "organization_id": org,
            "event_type": "api_call",
            "quantity": 5 * org,
            "occurred_at": utcnow() - timedelta(minutes=minutes_ago),
        }
        for org in orgs
    ]
    add_events(runtime, rows)
    return customers, rows


CONTRACT_BREAKING_CHECKS = ("event_type_has_meter", "quantity_positive_integer")


def contract_breaking_usage(runtime) -> None:
    """An event type without a meter, and a negative quantity: two failed contract checks."""
    from billing.models import utcnow
    from tests.usage.factories import add_accounts, add_events

    add_accounts(runtime, [1])
    an_hour_ago = utcnow() - timedelta(hours=1)
    add_events(
        runtime,
        [
            {
                "organization_id": 1,
                "event_type": "unmetered",
                "quantity": 1,
                "occurred_at": an_hour_ago,
            },
            {
                "organization_id": 1,
                "event_type": "api_call",
                "quantity": -2,
                "occurred_at": an_hour_ago,
            },
        ],
    )
