"""Settings read from the environment: the only module that reads billing configuration.

Every variable of the operations guide is here with its documented default. A bad value raises one
`ConfigError` naming the variable and the value, so a misconfigured worker fails at start-up rather
than half-way through a flush.
"""

from __future__ import annotations

import dataclasses
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from billing.errors import OperatorError
from billing.masking import mask_secret, scrub, shown_url

DEFAULT_BOOKING_URL = "https://cal.com/andreas-duess-fd/fishdog-demo"
DEFAULT_DATABASE_URL = "sqlite:///billing.db"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_FLUSH_LOCK_KEY = "billing:stripe-usage-flush:lock"
# The lock: at most TTL seconds a run (STRIPE_USAGE_FLUSH_LOCK_TTL_SECONDS), on a key that lives
# a lease (STRIPE_USAGE_FLUSH_LOCK_LEASE_SECONDS) and that the holder's heartbeat re-arms.
DEFAULT_FLUSH_LOCK_TTL_SECONDS = 3300
DEFAULT_FLUSH_LOCK_LEASE_SECONDS = 60
DEFAULT_METRICS_PATH = "/metrics"
DEFAULT_WEBHOOK_PATH = "/stripe/webhook"

# Upper bounds shared by the settings, the CLI flags and preflight. Each keeps a value sane, not
# merely representable: past them a timer overflows or a crashed holder blocks the next run.
# A lock held an hour or more would outlive a crashed holder into the next hourly run.
MAX_FLUSH_LOCK_TTL_SECONDS = 3599
MAX_CONTRACT_LOOKBACK_DAYS = 3650
MAX_ZEITGEIST_AGE_HOURS = 24 * 365
MAX_VISIBILITY_TIMEOUT_SECONDS = 7 * 24 * 3600
MAX_NETWORK_RETRIES = 10
MAX_TASK_RETRIES = 20
MAX_FANOUT_TASKS = 64
# Rows per fan-out part: 4 processes share a 7,500-group hour in 15 parts, and a part's
# Redis bookkeeping (a lock, a read, one transaction: ~1 ms) stays far below its 500 calls.
DEFAULT_FANOUT_PART_ROWS = 500
MAX_METER_EVENT_RATE_PER_SECOND = 10_000.0
MAX_RETRY_BACKOFF_SECONDS = 3600.0
# Stripe publishes no bound on how far meter event summaries lag ("an eventually consistent
# view"). The default trusts a summary an hour on, by reasoning: Stripe finalizes an invoice an
# hour after its period by default and bills the usage it holds then, so it expects reported usage
# to be aggregated within that hour. A summary still moving after a day is an incident, not lag.
DEFAULT_RECONCILE_SETTLE_SECONDS = 3600
MAX_RECONCILE_SETTLE_SECONDS = 24 * 3600
# Stripe reports a meter's aggregated_value as a JSON number (a double): past 2**53 a total is no
# longer exact, so no ceiling may be set above it.
MAX_EXACT_QUANTITY = 2**53 - 1
# The quantity ceilings' defaults, far above any honest producer: a group (organization, event
# type, hour) at 10**13 for every hour of a 31-day period still sums exactly (744 x 10**13 =
# 7.4 x 10**15 < 2**53), and one event may be a tenth of a group's ceiling.
DEFAULT_MAX_GROUP_QUANTITY = 10**13
DEFAULT_MAX_EVENT_QUANTITY = 10**12

REDIS_SCHEMES = ("redis", "rediss", "unix")
HTTP_SCHEMES = ("http", "https")
# What billing ships drivers and migrations for (`postgresql://` and `postgres://` mean psycopg2).
DATABASE_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg2", "sqlite")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
SECRET_FIELDS = frozenset({"stripe_secret_key", "stripe_webhook_secret"})


class ConfigError(ValueError, OperatorError):
    """A configuration variable is missing or has a value that cannot be used."""


def config_error_line(error: ConfigError) -> str:
    """What every entry point prints for a bad setting, after click's `Error: `."""
    return scrub(f"configuration error: {error}")


# Stripe's secret and restricted keys: `sk_` or `rk_`, the mode, then letters and digits (24 and
# more in the keys Stripe issues; 8 here, which still catches a key cut off or pasted with a
# space, a quote or a comment). Signing secrets: `whsec_`, then a tail that Stripe's dashboard
# (letters, digits) and CLI (hex) and test tools (`_`) fill differently; only what no secret holds
# is refused.
KEY_MODES = ("test", "live")
KEY_KINDS = {"sk": "a secret key", "rk": "a restricted key"}
MIN_SECRET_TAIL = 8
_KEY_TAIL = re.compile(r"[A-Za-z0-9]")
_SIGNING_SECRET_TAIL = re.compile(r"[A-Za-z0-9_+/=-]")


def _tail_problem(tail: str, prefix: str, allowed: re.Pattern[str], alphabet: str) -> str | None:
    refused = sorted({c for c in tail if not allowed.fullmatch(c)})
    if refused:
        return f"after {prefix} only {alphabet} may follow, found {', '.join(map(repr, refused))}"
    if len(tail) < MIN_SECRET_TAIL:
        return f"{len(tail)} characters after {prefix}, want at least {MIN_SECRET_TAIL}"
    return None


def secret_key_problem(key: str) -> str | None:
    """What keeps `key` from being shaped like a Stripe secret or restricted key, or None: the
    one rule of the settings (so of every process configured by the environment: the flush, the
    worker, the web command) and of preflight (which also checks settings built in code; the
    gateway leaves those to Stripe, whose refusal stops the run with usage left pending). Shows
    the key masked only."""
    kind, _, rest = key.partition("_")
    mode, _, tail = rest.partition("_")
    if kind not in KEY_KINDS:
        hint = "; pk_ is a publishable key, which cannot bill" if kind == "pk" else ""
        problem = f"must start with sk_ or rk_ (a secret or restricted key){hint}"
    elif mode not in KEY_MODES or not rest.startswith(f"{mode}_"):
        problem = f"after {kind}_ comes test_ or live_"
    else:
        problem = _tail_problem(tail, f"{kind}_{mode}_", _KEY_TAIL, "letters and digits")
    return None if problem is None else f"STRIPE_SECRET_KEY {mask_secret(key)}: {problem}"


def webhook_secret_problem(value: str) -> str | None:
    """What is wrong with the first bad entry of `STRIPE_WEBHOOK_SECRET` (comma-separated during a
    rotation), or None."""
    secrets = _split_secrets(value)
    for number, secret in enumerate(secrets, 1):
        if not secret.startswith("whsec_"):
            problem: str | None = "must start with whsec_ (the endpoint's signing secret)"
        else:
            tail = secret.removeprefix("whsec_")
            problem = _tail_problem(
                tail, "whsec_", _SIGNING_SECRET_TAIL, "letters, digits and _ + / = -"
            )
        if problem:
            return (
                f"STRIPE_WEBHOOK_SECRET entry {number} of {len(secrets)} "
                f"({mask_secret(secret)}): {problem}"
            )
    return None


def _split_secrets(value: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (value or "").split(",") if part.strip())


class _Env:
    """Typed reads of one environment mapping; every error names the variable and its value."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ

    def raw(self, name: str) -> str | None:
        value = self.environ.get(name)
        return None if value is None or value.strip() == "" else value.strip()

    def str(self, name: str, default: str | None = None) -> str | None:
        value = self.raw(name)
        return default if value is None else value

    def bool(self, name: str, default: bool) -> bool:
        # Blank means unset: a stray `VAR=" "` must not turn a safety check off.
        value = self.raw(name)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"{name} must be one of 1/0/true/false/yes/no, got {value!r}")

    def int(self, name: str, default: int, *, minimum: int = 1, maximum: int) -> int:
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"{name} must be a whole number, got {value!r}") from None
        if not minimum <= number <= maximum:
            raise ConfigError(f"{name} must be between {minimum} and {maximum}, got {value!r}")
        return number

    def float(self, name: str, default: float, *, minimum: float = 0.0, maximum: float) -> float:
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
        if not minimum <= number <= maximum:  # also refuses nan, inf and 1e400 (= inf)
            raise ConfigError(f"{name} must be between {minimum:g} and {maximum:g}, got {value!r}")
        return number

    def url(
        self, name: str, default: str | None, schemes: tuple[str, ...] = (), kind: str = "a URL"
    ) -> str | None:
        """A URL with a scheme and a place (`redis://host`, `sqlite:///file`): checked here,
        so a typo is one line naming the variable instead of a traceback in a client library."""
        value = self.str(name, default)
        if value is None:
            return None
        parts = urllib.parse.urlsplit(value)
        scheme = parts.scheme.lower()
        if "://" not in value or not scheme or (schemes and scheme not in schemes):
            want = f" ({', '.join(schemes)})" if schemes else ""
            shown = shown_url(value)
            raise ConfigError(f"{name} must be {kind} like scheme://host{want}, got {shown!r}")
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.raw(name) or default
        if value.lower() not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        return value.lower()


def parse_webhook_secrets(name: str, value: str | None) -> tuple[str, ...]:
    """`whsec_new,whsec_old`: every listed secret verifies, so a rotation never drops events."""
    problem = webhook_secret_problem(value or "")
    if problem:
        raise ConfigError(problem)
    return _split_secrets(value)


def _secret_key(value: str | None) -> str | None:
    problem = value and secret_key_problem(value)
    if problem:
        raise ConfigError(problem)
    return value


def webhook_path_from_env(environ: Mapping[str, str] | None = None) -> str:
    """The webhook route, read alone: Flask needs it when the app is built, before any other
    setting is (so `flask billing --help` still works with a bad environment)."""
    value = _Env(os.environ if environ is None else environ).str(
        "STRIPE_WEBHOOK_PATH", DEFAULT_WEBHOOK_PATH
    )
    path = value or DEFAULT_WEBHOOK_PATH
    if not path.startswith("/") or any(c.isspace() for c in path):
        raise ConfigError(f"STRIPE_WEBHOOK_PATH must be a URL path starting with /, got {value!r}")
    return path


def parse_meter_map(name: str, value: str | None) -> dict[str, str]:
    """`api_call,storage=storage_gb_hours` → {event_type: Stripe meter event_name}."""
    meters: dict[str, str] = {}
    for item in (value or "").split(","):
        item = item.strip()
        if not item:
            continue
        event_type, _, event_name = (part.strip() for part in item.partition("="))
        event_name = event_name or event_type
        if not event_type or "=" in event_name or len(event_name) > 100 or " " in event_name:
            raise ConfigError(
                f"{name} has an invalid entry {item!r} (want type or type=event_name, one =)"
            )
        if event_type in meters:  # the later entry would silently win
            raise ConfigError(
                f"{name} lists event type {event_type!r} twice ({value!r}): one meter each"
            )
        meters[event_type] = event_name
    return meters


def _url(name: str, value: str) -> str:
    if not re.match(r"^https?://[^/\s]+", value):
        raise ConfigError(f"{name} must be an http(s) URL, got {shown_url(value)!r}")
    return value


def _optional_url(name: str, value: str | None) -> str | None:
    return None if value is None else _url(name, value).rstrip("/")


def _price_id(name: str, value: str | None) -> str | None:
    # A product id (prod_…) here is the usual slip; Checkout would refuse it only at click time.
    if value is not None and not value.startswith("price_"):
        raise ConfigError(f"{name} must be a Stripe price id (price_…), got {value!r}")
    return value


@dataclass(frozen=True)
class Settings:
    """Billing configuration. Build it with `Settings.from_env()`; tests use `.replace(...)`."""

    billing_enabled: bool = False
    stripe_secret_key: str | None = field(default=None, repr=False)
    stripe_webhook_secret: str | None = field(default=None, repr=False)
    stripe_api_base: str | None = None
    stripe_max_network_retries: int = 2
    stripe_meter_event_rate_per_second: float = 20.0
    stripe_meters: dict[str, str] = field(default_factory=dict)

    webhook_path: str = DEFAULT_WEBHOOK_PATH
    webhook_tolerance_seconds: int = 300
    webhook_max_body_bytes: int = 512 * 1024
    webhook_requeue_after_seconds: int = 120
    webhook_processing_timeout_seconds: int = 900
    webhook_sweep_interval_seconds: int = 60

    billing_queue: str = "default"
    flush_lock_key: str = DEFAULT_FLUSH_LOCK_KEY
    flush_lock_ttl_seconds: int = DEFAULT_FLUSH_LOCK_TTL_SECONDS
    flush_lock_lease_seconds: int = DEFAULT_FLUSH_LOCK_LEASE_SECONDS
    flush_lock_backend: str = "redis"
    flush_batch_size: int = 5000
    submit_concurrency: int = 8
    # The hourly task's submit tasks beside itself (`billing.usage.fanout`); 0: it sends alone.
    submit_fanout_tasks: int = 0
    submit_fanout_part_rows: int = DEFAULT_FANOUT_PART_ROWS  # an organization is never split
    resend_window_hours: int = 23
    # Quantities past these are set aside as unbillable (never sent, never stopping the rest).
    max_event_quantity: int = DEFAULT_MAX_EVENT_QUANTITY
    max_group_quantity: int = DEFAULT_MAX_GROUP_QUANTITY

    validate_contract_before_flush: bool = True
    contract_lookback_days: int = 30
    contract_require_zeitgeist: bool = False
    contract_fail_closed: bool = False
    contract_zeitgeist_max_age_hours: int = 24

    saas_workspace_booking_url: str = DEFAULT_BOOKING_URL
    # Set: gated organizations get the self-service upgrade (Checkout); unset: the booking page.
    saas_price_id: str | None = None
    saas_public_base_url: str | None = None
    saas_unlock_wait_seconds: int = 60

    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str = DEFAULT_REDIS_URL
    celery_broker_url: str = DEFAULT_REDIS_URL
    celery_result_backend: str | None = None
    broker_visibility_timeout_seconds: int = 7200

    retry_backoff_seconds: float = 2.0
    retry_backoff_max_seconds: float = 600.0
    task_max_retries: int = 5

    log_level: str = "INFO"
    log_format: str = "auto"

    metrics_path: str | None = DEFAULT_METRICS_PATH
    worker_metrics_port: int = 0
    worker_metrics_address: str = "127.0.0.1"
    prometheus_multiproc_dir: str | None = None

    # v1: one POST /v1/billing/meter_events per outbox row; v2: the meter event stream (a session
    # token, up to 100 events per request).
    stripe_meter_event_api: str = "v1"
    # Reconciliation trusts Stripe's summary of an hour this long after the hour ended and after
    # its last row was sent; younger hours are reported not settled, never as drift.
    reconcile_settle_seconds: int = DEFAULT_RECONCILE_SETTLE_SECONDS

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = _Env(os.environ if environ is None else environ)
        secret_key = _secret_key(env.str("STRIPE_SECRET_KEY"))
        redis_url = env.url("REDIS_URL", DEFAULT_REDIS_URL, REDIS_SCHEMES) or DEFAULT_REDIS_URL
        lock_ttl = env.int(
            "STRIPE_USAGE_FLUSH_LOCK_TTL_SECONDS",
            DEFAULT_FLUSH_LOCK_TTL_SECONDS,
            maximum=MAX_FLUSH_LOCK_TTL_SECONDS,
        )
        settings = cls(
            billing_enabled=env.bool("STRIPE_BILLING_ENABLED", False),
            stripe_secret_key=secret_key,
            stripe_webhook_secret=env.str("STRIPE_WEBHOOK_SECRET"),
            stripe_api_base=env.url("STRIPE_API_BASE", None, HTTP_SCHEMES),
            stripe_max_network_retries=env.int(
                "STRIPE_MAX_NETWORK_RETRIES", 2, minimum=0, maximum=MAX_NETWORK_RETRIES
            ),
            # Test mode allows 25 requests/s for all calls, live 1,000 meter events/s: stay below.
            stripe_meter_event_rate_per_second=env.float(
                "STRIPE_METER_EVENT_RATE_PER_SECOND",
                900.0 if (secret_key or "").startswith(("sk_live_", "rk_live_")) else 20.0,
                minimum=0.1,
                maximum=MAX_METER_EVENT_RATE_PER_SECOND,
            ),
            stripe_meter_event_api=env.choice("STRIPE_METER_EVENT_API", "v1", ("v1", "v2")),
            stripe_meters=parse_meter_map(
                "STRIPE_BILLING_METERS", env.str("STRIPE_BILLING_METERS")
            ),
            webhook_path=webhook_path_from_env(env.environ),
            webhook_tolerance_seconds=env.int(
                "STRIPE_WEBHOOK_TOLERANCE_SECONDS", 300, maximum=3600
            ),
            webhook_max_body_bytes=env.int(
                "STRIPE_WEBHOOK_MAX_BODY_BYTES", 512 * 1024, minimum=1024, maximum=64 * 1024 * 1024
            ),
            webhook_requeue_after_seconds=env.int(
                "STRIPE_WEBHOOK_REQUEUE_AFTER_SECONDS", 120, maximum=24 * 3600
            ),
            webhook_processing_timeout_seconds=env.int(
                "STRIPE_WEBHOOK_PROCESSING_TIMEOUT_SECONDS", 900, minimum=30, maximum=24 * 3600
            ),
            webhook_sweep_interval_seconds=env.int(
                "STRIPE_WEBHOOK_SWEEP_INTERVAL_SECONDS", 60, maximum=3600
            ),
            billing_queue=env.str("STRIPE_BILLING_QUEUE", "default") or "default",
            flush_lock_key=env.str("STRIPE_USAGE_FLUSH_LOCK_KEY", DEFAULT_FLUSH_LOCK_KEY)
            or DEFAULT_FLUSH_LOCK_KEY,
            flush_lock_ttl_seconds=lock_ttl,
            # The key's TTL, re-armed by the holder's heartbeat: how long a killed holder blocks.
            flush_lock_lease_seconds=env.int(
                "STRIPE_USAGE_FLUSH_LOCK_LEASE_SECONDS",
                DEFAULT_FLUSH_LOCK_LEASE_SECONDS,
                minimum=3,
                maximum=3600,
            ),
            flush_lock_backend=env.choice(
                "STRIPE_USAGE_FLUSH_LOCK_BACKEND", "redis", ("redis", "file")
            ),
            flush_batch_size=env.int("STRIPE_USAGE_FLUSH_BATCH_SIZE", 5000, maximum=100_000),
            submit_concurrency=env.int("STRIPE_USAGE_SUBMIT_CONCURRENCY", 8, maximum=256),
            submit_fanout_tasks=env.int(
                "STRIPE_USAGE_FANOUT_TASKS", 0, minimum=0, maximum=MAX_FANOUT_TASKS
            ),
            submit_fanout_part_rows=env.int(
                "STRIPE_USAGE_FANOUT_PART_ROWS", DEFAULT_FANOUT_PART_ROWS, maximum=1_000_000
            ),
            resend_window_hours=env.int("STRIPE_USAGE_RESEND_WINDOW_HOURS", 23, maximum=23),
            max_event_quantity=env.int(
                "STRIPE_USAGE_MAX_EVENT_QUANTITY",
                DEFAULT_MAX_EVENT_QUANTITY,
                maximum=MAX_EXACT_QUANTITY,
            ),
            max_group_quantity=env.int(
                "STRIPE_USAGE_MAX_GROUP_QUANTITY",
                DEFAULT_MAX_GROUP_QUANTITY,
                maximum=MAX_EXACT_QUANTITY,
            ),
            validate_contract_before_flush=env.bool(
                "STRIPE_BILLING_VALIDATE_CONTRACT_BEFORE_FLUSH", True
            ),
            contract_lookback_days=env.int(
                "STRIPE_BILLING_CONTRACT_LOOKBACK_DAYS", 30, maximum=MAX_CONTRACT_LOOKBACK_DAYS
            ),
            contract_require_zeitgeist=env.bool("STRIPE_BILLING_CONTRACT_REQUIRE_ZEITGEIST", False),
            contract_fail_closed=env.bool("STRIPE_BILLING_CONTRACT_FAIL_CLOSED", False),
            contract_zeitgeist_max_age_hours=env.int(
                "STRIPE_BILLING_CONTRACT_ZEITGEIST_MAX_AGE_HOURS",
                24,
                maximum=MAX_ZEITGEIST_AGE_HOURS,
            ),
            saas_workspace_booking_url=_url(
                "SAAS_WORKSPACE_BOOKING_URL",
                env.str("SAAS_WORKSPACE_BOOKING_URL", DEFAULT_BOOKING_URL) or DEFAULT_BOOKING_URL,
            ),
            saas_price_id=_price_id("STRIPE_SAAS_PRICE_ID", env.str("STRIPE_SAAS_PRICE_ID")),
            saas_public_base_url=_optional_url(
                "SAAS_PUBLIC_BASE_URL", env.str("SAAS_PUBLIC_BASE_URL")
            ),
            saas_unlock_wait_seconds=env.int("SAAS_UNLOCK_WAIT_SECONDS", 60, maximum=3600),
            database_url=env.url(
                "DATABASE_URL", DEFAULT_DATABASE_URL, DATABASE_SCHEMES, "a PostgreSQL or SQLite URL"
            )
            or DEFAULT_DATABASE_URL,
            redis_url=redis_url,
            celery_broker_url=env.url("CELERY_BROKER_URL", redis_url) or redis_url,
            celery_result_backend=env.url("CELERY_RESULT_BACKEND", None),
            # Redis redelivers an unacked (acks_late) task after this: it must outlast the lock
            # TTL and the longest flush, or a second worker starts the same flush.
            broker_visibility_timeout_seconds=env.int(
                "CELERY_BROKER_VISIBILITY_TIMEOUT_SECONDS",
                max(7200, lock_ttl + 3600),
                maximum=MAX_VISIBILITY_TIMEOUT_SECONDS,
            ),
            retry_backoff_seconds=env.float(
                "STRIPE_BILLING_RETRY_BACKOFF_SECONDS", 2.0, maximum=MAX_RETRY_BACKOFF_SECONDS
            ),
            retry_backoff_max_seconds=env.float(
                "STRIPE_BILLING_RETRY_BACKOFF_MAX_SECONDS", 600.0, maximum=MAX_RETRY_BACKOFF_SECONDS
            ),
            task_max_retries=env.int(
                "STRIPE_BILLING_TASK_MAX_RETRIES", 5, minimum=0, maximum=MAX_TASK_RETRIES
            ),
            log_level=env.choice(
                "BILLING_LOG_LEVEL", "info", ("debug", "info", "warning", "error")
            ).upper(),
            log_format=env.choice("BILLING_LOG_FORMAT", "auto", ("auto", "json", "text")),
            metrics_path=metrics_path_from_env(env.environ),
            worker_metrics_port=env.int("BILLING_WORKER_METRICS_PORT", 0, minimum=0, maximum=65535),
            worker_metrics_address=env.str("BILLING_WORKER_METRICS_ADDRESS", "127.0.0.1")
            or "127.0.0.1",
            # Read by prometheus-client itself at import; here to check it before a worker starts.
            prometheus_multiproc_dir=_multiproc_dir(env.environ.get("PROMETHEUS_MULTIPROC_DIR")),
            reconcile_settle_seconds=env.int(
                "STRIPE_BILLING_RECONCILE_SETTLE_SECONDS",
                DEFAULT_RECONCILE_SETTLE_SECONDS,
                minimum=0,
                maximum=MAX_RECONCILE_SETTLE_SECONDS,
            ),
        )
        parse_webhook_secrets("STRIPE_WEBHOOK_SECRET", settings.stripe_webhook_secret)
        if settings.worker_metrics_port and not settings.prometheus_multiproc_dir:
            raise ConfigError(
                "BILLING_WORKER_METRICS_PORT needs PROMETHEUS_MULTIPROC_DIR (a directory), or the "
                "counts of Celery's prefork children are lost"
            )
        if settings.max_event_quantity > settings.max_group_quantity:
            raise ConfigError(
                "STRIPE_USAGE_MAX_EVENT_QUANTITY must not exceed STRIPE_USAGE_MAX_GROUP_QUANTITY "
                f"({settings.max_group_quantity}), got {settings.max_event_quantity!r}"
            )
        if settings.submit_fanout_tasks and settings.flush_lock_backend != "redis":
            raise ConfigError(
                "STRIPE_USAGE_FANOUT_TASKS needs STRIPE_USAGE_FLUSH_LOCK_BACKEND=redis: the "
                "submit tasks share their parts and their rate limit through Redis"
            )
        if settings.broker_visibility_timeout_seconds <= settings.flush_lock_ttl_seconds:
            raise ConfigError(
                "CELERY_BROKER_VISIBILITY_TIMEOUT_SECONDS must exceed "
                f"STRIPE_USAGE_FLUSH_LOCK_TTL_SECONDS ({settings.flush_lock_ttl_seconds}), got "
                f"{settings.broker_visibility_timeout_seconds!r}"
            )
        return settings

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @property
    def saas_gate_mode(self) -> str:
        """`upgrade` (self-service Checkout) when a price is configured, else `booking`."""
        return "upgrade" if self.saas_price_id else "booking"

    @cached_property  # read on every webhook delivery
    def webhook_secrets(self) -> tuple[str, ...]:
        """Every accepted signing secret (`STRIPE_WEBHOOK_SECRET` is comma-separated)."""
        return parse_webhook_secrets("STRIPE_WEBHOOK_SECRET", self.stripe_webhook_secret)

    @property
    def stripe_live_mode(self) -> bool:
        return (self.stripe_secret_key or "").startswith(("sk_live_", "rk_live_"))

    def masked(self) -> dict[str, Any]:
        """The settings as a dict safe to print or log."""
        shown: dict[str, Any] = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.name in SECRET_FIELDS:
                # Comma-separated lists (webhook secret rotation) are masked one by one.
                value = ",".join(mask_secret(part.strip()) for part in (value or "").split(","))
            elif isinstance(value, str):  # any URL may carry a password (STRIPE_API_BASE too)
                value = scrub(value)
            shown[item.name] = value
        return shown

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, value in self.masked().items())
        return f"Settings({fields})"

    __str__ = __repr__


def metrics_path_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """`BILLING_METRICS_PATH`, read alone like the webhook path: `/metrics` when unset, None
    (no endpoint) when blank, else a URL path."""
    value = (os.environ if environ is None else environ).get("BILLING_METRICS_PATH")
    if value is None:
        return DEFAULT_METRICS_PATH
    value = value.strip()
    if not value:
        return None
    if not value.startswith("/") or any(c.isspace() for c in value):
        raise ConfigError(f"BILLING_METRICS_PATH must be a URL path starting with /, got {value!r}")
    return value


def _multiproc_dir(value: str | None) -> str | None:
    # Set but blank or missing, prometheus-client would write its files into the cwd.
    if value is not None and not os.path.isdir(value):
        raise ConfigError(f"PROMETHEUS_MULTIPROC_DIR must be an existing directory, got {value!r}")
    return value


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    return Settings.from_env(environ)
