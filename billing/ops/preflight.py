"""`flask billing preflight`: is this runtime fit to bill? Every check says pass or fail, and why.

The checks read and probe but never change billing state: the Redis lock is probed with its own
key (a real flush's lock is never touched) and Stripe is asked a cheap authenticated read.
Secrets are masked in every message.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from billing import db
from billing.checks.report import Status, StatusReport
from billing.config import (
    MAX_FLUSH_LOCK_TTL_SECONDS,
    ConfigError,
    Settings,
    mask_secret,
    scrub,
    secret_key_problem,
    webhook_secret_problem,
)
from billing.entitlements.checkout import upgrade_price_problems
from billing.runtime import Runtime
from billing.usage.lock import FileFlushLock
from billing.usage.outbox import awaiting_operator_counts

# Celery routes by name through the broker; keep to characters every transport accepts.
QUEUE_NAME_SHAPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,199}$")
PROBE_TTL_MS = 10_000
BROKER_TIMEOUT_SECONDS = 3
ACTIVE_METER = "active"

SettingsSource = Runtime | Settings | Callable[[], Runtime | Settings]


@dataclass
class PreflightCheck:
    check: str
    status: Status
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.check, "status": self.status.value, "detail": self.detail}


@dataclass
class PreflightReport(StatusReport):
    require_enabled: bool
    checks: list[PreflightCheck] = field(default_factory=list)

    def entries(self) -> list[PreflightCheck]:
        return self.checks

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "require_enabled": self.require_enabled,
            "checks": [c.to_dict() for c in self.checks],
        }


Outcome = tuple[Status, str]


class _Preflight:
    """One check per method, run in `ORDER`; a check that raises fails with the (masked) error."""

    ORDER = (
        "stripe_secret_key",
        "stripe_webhook_secret",
        "flush_lock_ttl",
        "billing_queue",
        "billing_enabled",
        "database",
        "usage_outbox",
        "flush_lock",
        "celery_broker",
        "stripe_access",
        "stripe_meters",
        "saas_upgrade",
    )

    def __init__(self, runtime: Runtime, require_enabled: bool) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.require_enabled = require_enabled
        self.passed: set[str] = set()

    def run(self, report: PreflightReport) -> None:
        for name in self.ORDER:
            try:
                status, detail = getattr(self, name)()
            except Exception as error:  # a probe failing is the finding, not a crash
                status, detail = Status.FAIL, f"{type(error).__name__}: {error}"
            if status is Status.PASS:
                self.passed.add(name)
            report.checks.append(PreflightCheck(name, status, scrub(detail)))

    # configuration

    def stripe_secret_key(self) -> Outcome:
        key = self.settings.stripe_secret_key
        if not key:
            return Status.FAIL, "STRIPE_SECRET_KEY is not set"
        problem = secret_key_problem(key)
        if problem:
            return Status.FAIL, problem
        mode = "live" if self.settings.stripe_live_mode else "test"
        return Status.PASS, f"{mask_secret(key)} ({mode} mode)"

    def stripe_webhook_secret(self) -> Outcome:
        secret = self.settings.stripe_webhook_secret
        if not secret:
            return Status.FAIL, "STRIPE_WEBHOOK_SECRET is not set"
        problem = webhook_secret_problem(secret)
        if problem:
            return Status.FAIL, problem
        secrets = self.settings.webhook_secrets
        shown = ", ".join(mask_secret(s) for s in secrets)
        return Status.PASS, shown if len(secrets) == 1 else f"{len(secrets)} secrets: {shown}"

    def flush_lock_ttl(self) -> Outcome:
        ttl = self.settings.flush_lock_ttl_seconds
        if 0 < ttl <= MAX_FLUSH_LOCK_TTL_SECONDS:
            return Status.PASS, f"{ttl} s"
        # The same bound as the configuration's (settings injected in code skip that check).
        return Status.FAIL, (
            f"STRIPE_USAGE_FLUSH_LOCK_TTL_SECONDS={ttl}: must be between 1 and "
            f"{MAX_FLUSH_LOCK_TTL_SECONDS}"
        )

    def billing_queue(self) -> Outcome:
        queue = self.settings.billing_queue
        if QUEUE_NAME_SHAPE.match(queue):
            return Status.PASS, queue
        return Status.FAIL, (
            f"STRIPE_BILLING_QUEUE={queue!r}: use letters, digits and _ . : @ - (max 200)"
        )

    def billing_enabled(self) -> Outcome:
        enabled = self.settings.billing_enabled
        value = f"STRIPE_BILLING_ENABLED={int(enabled)}"
        if not self.require_enabled:
            return Status.SKIP, f"{value} (not required; --require-enabled to enforce)"
        return (Status.PASS, value) if enabled else (Status.FAIL, f"{value}: billing is off")

    # services

    def database(self) -> Outcome:
        engine = self.runtime.engine
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        current, head = db.current_revision(engine), db.head_revision()
        where = f"{engine.dialect.name} reachable"
        if current != head:
            return Status.FAIL, (
                f"{where}; migrations at {current or 'none'}, head {head}: "
                "run `flask billing db upgrade`"
            )
        return Status.PASS, f"{where}; migrations at head ({head})"

    def usage_outbox(self) -> Outcome:
        if "database" not in self.passed:
            return Status.SKIP, "skipped: the database is not at head"
        counts = awaiting_operator_counts(self.runtime.session_factory)
        if any(counts.values()):
            return Status.FAIL, (
                f"{counts['failed']} failed, {counts['held']} held and {counts['rejected']} "
                "rejected usage submission(s) wait for an operator: `flask billing submissions "
                "list`, then retry or write off"
            )
        return Status.PASS, "no failed, held or rejected usage submissions"

    def flush_lock(self) -> Outcome:
        probe = f"{self.settings.flush_lock_key}:preflight:{uuid.uuid4().hex}"
        if self.settings.flush_lock_backend == "file":
            lock = FileFlushLock(probe)
            if not lock.acquire():
                return Status.FAIL, f"could not take the probe file lock {lock.path}"
            lock.release()
            return Status.PASS, "file lock backend: probe lock taken and released"
        client = self.runtime.redis
        client.ping()
        if not client.set(probe, uuid.uuid4().hex, nx=True, px=PROBE_TTL_MS):
            return Status.FAIL, f"could not set the probe key {probe}"
        if client.delete(probe) != 1:
            return Status.FAIL, f"set the probe key {probe} but could not remove it"
        held = "held by a running flush" if client.exists(self.settings.flush_lock_key) else "free"
        return Status.PASS, (
            f"Redis reachable; probe key set and removed; lock "
            f"{self.settings.flush_lock_key} is {held}"
        )

    def celery_broker(self) -> Outcome:
        from kombu import Connection

        url = self.settings.celery_broker_url
        options = {
            "socket_connect_timeout": BROKER_TIMEOUT_SECONDS,
            "socket_timeout": BROKER_TIMEOUT_SECONDS,
        }
        with Connection(
            url, connect_timeout=BROKER_TIMEOUT_SECONDS, transport_options=options
        ) as connection:
            connection.ensure_connection(
                max_retries=1, interval_start=0, interval_step=0, timeout=BROKER_TIMEOUT_SECONDS
            )
        return Status.PASS, f"{scrub(url)} reachable"

    def stripe_access(self) -> Outcome:
        if "stripe_secret_key" not in self.passed:
            return Status.SKIP, "skipped: STRIPE_SECRET_KEY is unusable"
        self.runtime.stripe.check_access()
        where = self.settings.stripe_api_base or "api.stripe.com"
        return Status.PASS, f"authenticated read at {where} succeeded"

    def stripe_meters(self) -> Outcome:
        if "stripe_access" not in self.passed:
            return Status.SKIP, "skipped: Stripe is not reachable with the key"
        wanted = sorted(set(self.settings.stripe_meters.values()))
        if not wanted:
            return Status.FAIL, "STRIPE_BILLING_METERS is empty: no event type can be billed"
        found = self.runtime.stripe.meter_by_event_name()
        missing = [name for name in wanted if name not in found]
        inactive = [n for n in wanted if n in found and found[n].status != ACTIVE_METER]
        problems = [
            f"{label}: {', '.join(names)}"
            for label, names in (("missing", missing), ("inactive", inactive))
            if names
        ]
        if problems:
            return Status.FAIL, "meters " + "; ".join(problems)
        return Status.PASS, f"{len(wanted)} meter(s) active: {', '.join(wanted)}"

    def saas_upgrade(self) -> Outcome:
        price_id = self.settings.saas_price_id
        if not price_id:
            return Status.PASS, (
                "booking mode (STRIPE_SAAS_PRICE_ID unset): gated organizations go to "
                f"{self.settings.saas_workspace_booking_url}"
            )
        if "stripe_access" not in self.passed:
            return Status.SKIP, "skipped: Stripe is not reachable with the key"
        problems = upgrade_price_problems(self.runtime, price_id)
        if problems:
            return Status.FAIL, "STRIPE_SAAS_PRICE_ID: " + "; ".join(problems)
        return Status.PASS, (
            f"upgrade mode: {price_id} is an active recurring price whose product grants saas"
        )


def _open(source: SettingsSource) -> tuple[Runtime, bool]:
    """The runtime to check, and whether this module built it (and so must close it)."""
    loaded = source() if callable(source) else source
    if isinstance(loaded, Runtime):
        return loaded, False
    return Runtime(loaded), True


def run_preflight(source: SettingsSource, *, require_enabled: bool) -> PreflightReport:
    """Run every check. `source` may be a Runtime, Settings, or a function loading either."""
    report = PreflightReport(require_enabled=require_enabled)
    try:
        runtime, owned = _open(source)
    except ConfigError as error:
        report.checks.append(PreflightCheck("config_parses", Status.FAIL, scrub(str(error))))
        report.checks += [
            PreflightCheck(name, Status.SKIP, "skipped: the configuration does not parse")
            for name in _Preflight.ORDER
        ]
        return report
    report.checks.append(PreflightCheck("config_parses", Status.PASS, "every variable parses"))
    try:
        _Preflight(runtime, require_enabled).run(report)
    finally:
        if owned:
            runtime.close()
    return report
