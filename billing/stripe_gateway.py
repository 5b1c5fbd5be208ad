"""The only module that calls Stripe.

It owns the `StripeClient` (pointed at `STRIPE_API_BASE` when set, e.g. the local emulator), a
client-side rate limit under Stripe's, and the one translation of Stripe's errors into what the rest
of billing acts on: transient or permanent (may the same request succeed later?) and the error's
scope (what it is about: the whole account, one meter, one customer, or this one request).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

import requests
import requests.utils
import stripe

from billing import metrics
from billing.config import Settings
from billing.errors import OperatorError
from billing.rate_limits import RateLimit, SharedRateLimit, TokenBucket

DUPLICATE_IDENTIFIER_MESSAGE = "An event already exists with identifier"
METER_EVENTS_PATH = "/v1/billing/meter_events"
METER_EVENT_STREAM_PATH = "/v2/billing/meter_event_stream"
MAX_STREAM_EVENTS = 100  # Stripe's ceiling per v2 meter event stream request
LIVE_STREAM_RATE_PER_SECOND = 9000.0  # under Stripe's 10,000 stream requests/s in live mode


class ErrorScope(StrEnum):
    """What a Stripe error is about, so one bad setting never fails rows it says nothing about."""

    RUN = "run"  # the key, its permissions or the account: no call can succeed; stop the run
    METER = "meter"  # Stripe has no active meter for the event name: stop sending for that meter
    CUSTOMER = "customer"  # the customer is missing or deleted: stop sending for that customer
    ROW = "row"  # this request alone


# Refusals about a name a fixed configuration changes: such a row's next send follows the fixed
# meter mapping or customer link (`usage.submitting.Submitter._repoint`).
REPOINTED_SCOPES = frozenset({ErrorScope.METER.value, ErrorScope.CUSTOMER.value})


class StripeGatewayError(OperatorError):
    """A Stripe call failed; `transient` says whether repeating the same request may succeed."""

    transient = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        scope: ErrorScope = ErrorScope.ROW,
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.scope = scope


class TransientStripeError(StripeGatewayError):
    transient = True


class PermanentStripeError(StripeGatewayError):
    transient = False


class LiveKeyRefusedError(PermanentStripeError):
    """A test-mode-only operation (seeding, smoke checks) was given a live key."""


class MeterEventOutcome(StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"  # Stripe already has this identifier: delivered earlier


@dataclass(frozen=True)
class MeterEvent:
    event_name: str
    stripe_customer_id: str
    value: int
    timestamp: datetime
    identifier: str
    idempotency_key: str

    @classmethod
    def of_row(cls, row: Any) -> MeterEvent:
        """The meter event of an outbox row (a `UsageSubmission` or a plain row of its columns)."""
        return cls(
            event_name=row.event_name,
            stripe_customer_id=row.stripe_customer_id,
            value=row.value,
            timestamp=row.window_start,
            identifier=row.identifier,
            idempotency_key=row.idempotency_key,
        )


@dataclass(frozen=True)
class MeterErrorSample:
    """One sampled error of a meter error report: Stripe's code and message, and the request's
    `identifier` (documented as the request's idempotency key; see `usage.rejections`)."""

    code: str
    message: str
    request_identifier: str | None


@dataclass(frozen=True)
class MeterErrorReportEvent:
    """A meter error report as fetched from `GET /v2/core/events/{id}`: the thin delivery has no
    `data`. `error_count` counts every error in the window; `samples` are at most a few per code.
    """

    event_id: str
    type: str
    meter_id: str | None  # `v1.billing.meter.no_meter_found` has no related object
    event_name: str | None  # the related meter's event name
    error_count: int
    validation_start: datetime | None
    validation_end: datetime | None
    summary: str | None
    samples: tuple[MeterErrorSample, ...]


@dataclass(frozen=True)
class SubscriptionCheckout:
    """A Checkout Session that subscribes one organization to one price."""

    organization_id: int
    price_id: str
    success_url: str
    cancel_url: str
    customer_id: str | None = None  # reused when the organization already has one


# Account-level refusals: every call with this key would get the same answer.
ACCOUNT_ERROR_CODES = frozenset(
    {
        "account_invalid",
        "api_key_expired",
        "livemode_mismatch",
        "platform_api_key_expired",
        "secret_key_required",
        "testmode_charges_only",
    }
)
# Stripe's codes for an event name without an active meter (sync answers and error reports).
METER_ERROR_CODES = frozenset({"no_meter", "archived_meter", "meter_inactive"})
CUSTOMER_ERROR_CODES = frozenset({"meter_event_customer_not_found", "customer_deleted"})


def translate_error(error: stripe.StripeError) -> StripeGatewayError:
    """The one place that decides what a Stripe error means for billing."""
    status = error.http_status
    body = error.error
    code = (getattr(body, "code", None) if body else None) or error.code
    param = (getattr(body, "param", None) if body else None) or ""
    message = f"{type(error).__name__}: {error.user_message or error}"
    if isinstance(error, stripe.RateLimitError | stripe.APIConnectionError | stripe.APIError):
        return TransientStripeError(message, status=status, code=code)
    if status is not None and (status >= 500 or status in (409, 429)):
        return TransientStripeError(message, status=status, code=code)
    return PermanentStripeError(
        message, status=status, code=code, scope=_scope(error, status, code, param, message)
    )


def rejection_scope(code: str) -> ErrorScope:
    """What an asynchronous refusal (a meter error report's code) is about: a re-queued row
    follows the fixed customer link or meter mapping (`usage.submitting`) only for its scope."""
    if code in CUSTOMER_ERROR_CODES:
        return ErrorScope.CUSTOMER
    if code in METER_ERROR_CODES:
        return ErrorScope.METER
    return ErrorScope.ROW


def _scope(
    error: stripe.StripeError, status: int | None, code: str | None, param: str, message: str
) -> ErrorScope:
    if isinstance(error, stripe.AuthenticationError | stripe.PermissionError) or status in (
        401,
        403,
    ):
        return ErrorScope.RUN
    if code in ACCOUNT_ERROR_CODES:
        return ErrorScope.RUN
    if code in METER_ERROR_CODES or param == "event_name":
        return ErrorScope.METER
    if code in CUSTOMER_ERROR_CODES or "No such customer" in message:
        return ErrorScope.CUSTOMER
    return ErrorScope.ROW


def environment_proxies(urls: list[str]) -> dict[str, str]:
    """{scheme: proxy URL} for the Stripe URLs the environment routes through a proxy, by
    requests' rules (HTTPS_PROXY / HTTP_PROXY / ALL_PROXY in either case, NO_PROXY), read once
    when the gateway is built: libcurl's own reading ignores an upper-case HTTP_PROXY."""
    environment = requests.Session()  # trusts the environment: how requests would route a call
    pinned: dict[str, str] = {}
    for url in urls:
        proxies = environment.merge_environment_settings(url, {}, None, None, None)["proxies"]
        proxy = requests.utils.select_proxy(url, proxies)
        if proxy:
            pinned.setdefault(urlsplit(url).scheme, proxy)
    environment.close()
    return pinned


class PerThreadCurl(stripe.HTTPClient):
    """stripe-python's pycurl client, one per thread, for every Stripe call of a gateway.

    libcurl makes a meter event call for about a third of the CPU of requests + http.client
    (190-260 µs against 650-710 µs a call, stripe-python alone against the emulator), which was
    most of what a flush process spent per row. A pycurl handle, and the connection it keeps
    alive, must not be used by two threads at once, so each lane has its own."""

    name = "pycurl"

    def handle(self) -> stripe.PycurlClient:
        """This thread's client (made on its first call)."""
        handle = getattr(self._thread_local, "curl", None)
        if handle is None:
            handle = self._thread_local.curl = stripe.PycurlClient(proxy=self._proxy)
        return handle

    def request(self, method: str, url: str, headers: Any, post_data: Any = None) -> Any:
        return self.handle().request(method, url, headers, post_data)

    def request_stream(self, method: str, url: str, headers: Any, post_data: Any = None) -> Any:
        return self.handle().request_stream(method, url, headers, post_data)

    def close(self) -> None:
        """Each thread's handle closes its connections when the thread's locals are freed."""


def _http_client(proxy: dict[str, str] | None) -> stripe.HTTPClient:
    """libcurl, unless gevent patched this process's sockets (gunicorn `--worker-class gevent`):
    a pycurl call cannot yield to the worker's other greenlets while it waits, requests' can."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("socket"):
        return stripe.RequestsClient(proxy=proxy)
    return PerThreadCurl(proxy=proxy)


def meter_event_rate_limit(settings: Settings) -> RateLimit:
    """The client-side limit for this account's calls: one in Redis when several processes send
    at once (the fan-out), else this process's own bucket."""
    rate = settings.stripe_meter_event_rate_per_second
    if settings.submit_fanout_tasks:
        key = f"{settings.flush_lock_key}:meter-event-rate"
        return SharedRateLimit(settings.redis_url, key, rate)
    return TokenBucket(rate)


class StripeGateway:
    def __init__(
        self,
        client: stripe.StripeClient,
        *,
        live_mode: bool,
        rate_limiter: RateLimit | None = None,
        http_client: stripe.HTTPClient | None = None,
    ) -> None:
        self.client = client
        self.http_client = http_client  # the one `client` was built with, when we built it
        self.live_mode = live_mode
        self.rate_limiter = rate_limiter
        self.meter_event_session = MeterEventSessionHolder(self._create_meter_event_session)
        # v2 stream requests have their own live ceiling; test mode shares the 25/s of every call.
        self.stream_rate_limiter = (
            TokenBucket(LIVE_STREAM_RATE_PER_SECOND) if live_mode else rate_limiter
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> StripeGateway:
        if not settings.stripe_secret_key:
            raise PermanentStripeError("STRIPE_SECRET_KEY is not set")
        base = settings.stripe_api_base
        addresses: Any = (
            {"api": base, "meter_events": base, "files": base, "connect": base} if base else None
        )
        hosts = [base] if base else [stripe.DEFAULT_API_BASE, stripe.DEFAULT_METER_EVENTS_API_BASE]
        http_client = _http_client(environment_proxies(hosts) or None)
        client = stripe.StripeClient(
            settings.stripe_secret_key,
            base_addresses=addresses,
            max_network_retries=settings.stripe_max_network_retries,
            http_client=http_client,
        )
        return cls(
            client,
            live_mode=settings.stripe_live_mode,
            rate_limiter=meter_event_rate_limit(settings),
            http_client=http_client,
        )

    def require_test_mode(self, purpose: str) -> None:
        if self.live_mode:
            raise LiveKeyRefusedError(f"{purpose} runs in Stripe test mode only; got a live key")

    def _list_all(self, list_method: Any, *args: Any) -> list[Any]:
        """Every item of a Stripe list, all pages. The later pages are fetched while iterating,
        so the iteration runs inside `_call` too: their errors are translated like the first's."""
        return self._call(lambda: list(list_method(*args).auto_paging_iter()))

    def _call(
        self, fn: Any, *args: Any, limiter: RateLimit | None = None, api: str | None = None
    ) -> Any:
        """`api` names a meter event API, whose 429s are counted."""
        limiter = limiter or self.rate_limiter
        if limiter is not None:
            limiter.acquire()
        try:
            return fn(*args)
        except stripe.StripeError as error:
            translated = translate_error(error)
            if api and translated.status == 429:
                metrics.METER_EVENT_RATE_LIMITED.labels(api=api).inc()
            raise translated from error

    # Meter events -------------------------------------------------------------------------

    def send_meter_event(self, event: MeterEvent) -> MeterEventOutcome:
        """One call, never repeated here: the flush's retry policy (`usage.retry_policy`)
        decides every repeat, so stripe-python's own network retries are off for meter events."""
        params = {
            "event_name": event.event_name,
            "identifier": event.identifier,
            "timestamp": int(event.timestamp.timestamp()),
            "payload": {"stripe_customer_id": event.stripe_customer_id, "value": str(event.value)},
        }
        metrics.METER_EVENT_CALLS.labels(api="v1").inc()
        metrics.METER_EVENT_EVENTS.labels(api="v1").inc()
        try:
            # The raw request: nothing reads the created event, so it is not built into a
            # StripeObject (the hot path of a flush: one of these per outbox row).
            response = self._call(
                lambda: self.client.raw_request(
                    "post",
                    METER_EVENTS_PATH,
                    **params,
                    idempotency_key=event.idempotency_key,
                    max_network_retries=0,
                ),
                api="v1",
            )
        except PermanentStripeError as error:
            # A re-sent identifier means an earlier attempt was delivered: success, not failure.
            if error.status == 400 and DUPLICATE_IDENTIFIER_MESSAGE in str(error):
                return MeterEventOutcome.DUPLICATE
            raise
        # A replayed idempotent response is also an earlier delivery, not a new one.
        if response.headers.get("idempotent-replayed") == "true":
            return MeterEventOutcome.DUPLICATE
        return MeterEventOutcome.ACCEPTED

    def send_meter_event_batch(self, events: Sequence[MeterEvent]) -> None:
        """One v2 meter event stream request of at most 100 events, never repeated here for a
        transient error (the caller re-sends the whole request: the identifiers make that
        harmless). Stripe answers `{}` and validates later: refusals arrive as meter error
        reports (`usage.rejections`), so a return means "accepted for processing".

        An expired session (401 `billing_meter_event_session_expired`) is renewed once and the
        request re-sent; a second expiry is transient, never a run-stopping 401."""
        if not 0 < len(events) <= MAX_STREAM_EVENTS:
            raise ValueError(f"a stream request carries 1..{MAX_STREAM_EVENTS} events")
        body = json.dumps({"events": [_stream_event(event) for event in events]})
        token = self.meter_event_session.token()
        for renewed in (False, True):
            metrics.METER_EVENT_CALLS.labels(api="v2").inc()
            metrics.METER_EVENT_EVENTS.labels(api="v2").inc(len(events))
            try:
                self._call(
                    self._post_stream, body, token, limiter=self.stream_rate_limiter, api="v2"
                )
                return
            except StripeGatewayError as error:
                if not isinstance(error.__cause__, stripe.TemporarySessionExpiredError):
                    raise
                if renewed:
                    raise TransientStripeError(
                        str(error), status=error.status, code=error.code
                    ) from error
                token = self.meter_event_session.renew(token)

    def _post_stream(self, body: str, token: str) -> None:
        """`client.v2.billing.meter_event_stream.create` with the JSON body written once.

        stripe-python url-encodes every request's parameters before it looks at the API mode,
        and a v2 POST then sends them as JSON instead: for a stream request that encoding (ten
        `quote_plus` calls an event) was a third of the v2 sender's CPU (docs/performance.md).
        Everything else is stripe-python's own: its headers for a v2 POST (a fresh
        Idempotency-Key included), its HTTP client, and its reading of the answer, which raises
        the same errors as `create` (`TemporarySessionExpiredError` for an expired session)."""
        requestor = self.client._requestor
        options: Any = {
            "api_key": token,
            "stripe_account": requestor.stripe_account,
            "stripe_version": requestor.stripe_version,
        }
        base = requestor.base_addresses.get("meter_events") or stripe.DEFAULT_METER_EVENTS_API_BASE
        answer = requestor._get_http_client().request_with_retries(
            "post",
            base + METER_EVENT_STREAM_PATH,
            requestor.request_headers("post", "V2", options),
            body,
            max_network_retries=0,
        )
        requestor._interpret_response(*answer, "V2")

    def _create_meter_event_session(self) -> tuple[str, datetime, datetime]:
        """A new v2 meter event session: (token, created, expires_at)."""
        created = self._call(self.client.v2.billing.meter_event_session.create)
        metrics.METER_EVENT_SESSION_RENEWALS.inc()
        return (
            str(created.authentication_token),
            _iso_datetime(created.created) or datetime.now(UTC),
            _iso_datetime(created.expires_at) or datetime.now(UTC),
        )

    def check_meter_event_session(self) -> None:
        """Preflight: the key can open a v2 meter event session (kept for the next stream)."""
        self.meter_event_session.renew(None)

    # Meters and summaries (reconciliation, smoke checks, preflight) ------------------------

    def list_meters(self) -> list[Any]:
        return self._list_all(self.client.v1.billing.meters.list, {"limit": 100})

    def meter_by_event_name(self) -> dict[str, Any]:
        return {meter.event_name: meter for meter in self.list_meters()}

    def meter_event_total(
        self, meter_id: str, customer_id: str, start: datetime, end: datetime
    ) -> int:
        """Sum of a customer's meter events in [start, end), as Stripe aggregated them."""
        summaries = self._list_all(
            self.client.v1.billing.meters.event_summaries.list,
            meter_id,
            _summary_params(customer_id, start, end),
        )
        return int(sum(item.aggregated_value for item in summaries))

    def meter_hourly_totals(
        self, meter_id: str, customer_id: str, start: datetime, end: datetime
    ) -> dict[datetime, int]:
        """Stripe's hourly sums of a customer's meter events in [start, end) (hour-aligned):
        {hour start: value}; hours without usage are absent. Every page is read, or it raises."""
        summaries = self._list_all(
            self.client.v1.billing.meters.event_summaries.list,
            meter_id,
            _summary_params(customer_id, start, end, value_grouping_window="hour"),
        )
        totals: dict[datetime, int] = {}
        for item in summaries:
            hour = datetime.fromtimestamp(item.start_time, UTC)
            totals[hour] = totals.get(hour, 0) + int(item.aggregated_value)
        return totals

    # Meter error reports (thin v2 events) ----------------------------------------------------

    def fetch_meter_error_report(self, notification: Mapping[str, Any]) -> MeterErrorReportEvent:
        """The full event behind a thin `v1.billing.meter.error_report_triggered` or
        `v1.billing.meter.no_meter_found` delivery, read with stripe-python's event notification
        support (`fetch_event`: `GET /v2/core/events/{id}`) and, when the report names a meter,
        that meter (`fetch_related_object`) for its event name.

        The delivery's signature was verified when it was stored (`webhooks.service`), so it is
        parsed without verification here. A 404 (no such event, e.g. kept past Stripe's 30 days)
        is permanent; a 5xx or a lost connection transient, as for every call."""
        parsed = self.client.parse_event_notification_without_verification(json.dumps(notification))
        event = self._call(parsed.fetch_event)
        related = getattr(parsed, "related_object", None)
        event_name = None
        if related is not None and getattr(related, "url", None):
            event_name = getattr(self._call(parsed.fetch_related_object), "event_name", None)
        data = event.to_dict().get("data") or {}
        reason = data.get("reason") or {}
        samples = tuple(
            MeterErrorSample(
                code=str(error_type.get("code") or "unknown"),
                message=str(sample.get("error_message") or ""),
                request_identifier=(sample.get("request") or {}).get("identifier"),
            )
            for error_type in reason.get("error_types") or ()
            for sample in error_type.get("sample_errors") or ()
        )
        return MeterErrorReportEvent(
            event_id=str(event.id),
            type=str(event.type),
            meter_id=related.id if related is not None else None,
            event_name=event_name,
            error_count=int(reason.get("error_count") or len(samples)),
            validation_start=_iso_datetime(data.get("validation_start")),
            validation_end=_iso_datetime(data.get("validation_end")),
            summary=data.get("developer_message_summary"),
            samples=samples,
        )

    # Customers, subscriptions ---------------------------------------------------------------

    def retrieve_customer(self, customer_id: str) -> Any:
        return self._call(self.client.v1.customers.retrieve, customer_id)

    def retrieve_subscription(self, subscription_id: str) -> Any:
        return self._call(self.client.v1.subscriptions.retrieve, subscription_id)

    def retrieve_price(self, price_id: str) -> Any:
        return self._call(self.client.v1.prices.retrieve, price_id)

    # Invoices (invoice.created adjustments) --------------------------------------------------

    def retrieve_invoice(self, invoice_id: str) -> Any:
        return self._call(self.client.v1.invoices.retrieve, invoice_id)

    def invoice_lines(self, invoice_id: str) -> list[Any]:
        return self._list_all(self.client.v1.invoices.line_items.list, invoice_id, {"limit": 100})

    def add_invoice_item(
        self,
        customer_id: str,
        *,
        invoice_id: str | None,
        amount_cents: int,
        currency: str,
        description: str,
        metadata: dict[str, str],
        idempotency_key: str,
    ) -> Any:
        """A one-off line on a draft invoice, or (`invoice_id` None) a pending one that Stripe
        puts on the customer's next invoice; the idempotency key makes a retry the same call."""
        params: dict[str, Any] = {
            "customer": customer_id,
            "amount": amount_cents,
            "currency": currency,
            "description": description,
            "metadata": metadata,
        }
        if invoice_id is not None:
            params["invoice"] = invoice_id
        return self._call(
            self.client.v1.invoice_items.create, params, {"idempotency_key": idempotency_key}
        )

    def check_access(self) -> None:
        """A cheap authenticated read: proves the key works and Stripe answers."""
        self._call(self.client.v1.customers.list, {"limit": 1})

    # Test-mode set-up (seed_demo) -----------------------------------------------------------

    def create_customer(self, name: str, organization_id: int) -> Any:
        self.require_test_mode("Creating demo customers")
        return self._call(
            self.client.v1.customers.create,
            {"name": name, "metadata": {"organization_id": str(organization_id)}},
        )

    def ensure_meter(self, event_name: str) -> Any:
        self.require_test_mode("Creating demo meters")
        existing = self.meter_by_event_name().get(event_name)
        if existing is not None:
            return existing
        return self._call(
            self.client.v1.billing.meters.create,
            {
                "display_name": event_name.replace("_", " ").title(),
                "event_name": event_name,
                "default_aggregation": {"formula": "sum"},
                "customer_mapping": {"type": "by_id", "event_payload_key": "stripe_customer_id"},
                "value_settings": {"event_payload_key": "value"},
            },
        )

    def ensure_metered_price(self, meter: Any, *, unit_amount: int = 1) -> str:
        """A monthly metered price on the meter (found again by its lookup key); its id."""
        self.require_test_mode("Creating demo prices")
        lookup_key = f"billing-demo-metered-{meter.event_name}"[:200]
        found = self._call(self.client.v1.prices.list, {"lookup_keys": [lookup_key], "limit": 1})
        for price in found.data:
            if price.active and price.recurring and price.recurring.meter == meter.id:
                return str(price.id)
        created = self._call(
            self.client.v1.prices.create,
            {
                "currency": "usd",
                "unit_amount": unit_amount,
                "lookup_key": lookup_key,
                "transfer_lookup_key": True,  # a meter made anew (emulator reset) gets it
                "product_data": {"name": meter.display_name},
                "recurring": {"interval": "month", "usage_type": "metered", "meter": meter.id},
            },
        )
        return str(created.id)

    def create_subscription(
        self, customer_id: str, price_ids: list[str], organization_id: int
    ) -> Any:
        self.require_test_mode("Creating demo subscriptions")
        return self._call(
            self.client.v1.subscriptions.create,
            {
                "customer": customer_id,
                "items": [{"price": price_id} for price_id in price_ids],
                "metadata": {"organization_id": str(organization_id)},
            },
        )

    # Entitlements and the SaaS upgrade checkout ---------------------------------------------

    def active_entitlement_lookup_keys(self, customer_id: str) -> set[str]:
        """Lookup keys of the customer's active entitlements, every page of them."""
        entitlements = self._list_all(
            self.client.v1.entitlements.active_entitlements.list,
            {"customer": customer_id, "limit": 100},
        )
        return {entitlement.lookup_key for entitlement in entitlements}

    def product_feature_lookup_keys(self, product_id: str) -> set[str]:
        """Lookup keys of the features a product grants, every page of them."""
        attached = self._list_all(self.client.v1.products.features.list, product_id, {"limit": 100})
        return {item.entitlement_feature.lookup_key for item in attached}

    def create_subscription_checkout(self, checkout: SubscriptionCheckout) -> Any:
        params: dict[str, Any] = {
            "mode": "subscription",
            "line_items": [{"price": checkout.price_id, "quantity": 1}],
            # Webhook handlers link the organization to the customer from these, never from
            # anything the browser sends back.
            "client_reference_id": str(checkout.organization_id),
            "metadata": {"organization_id": str(checkout.organization_id)},
            "subscription_data": {"metadata": {"organization_id": str(checkout.organization_id)}},
            "success_url": checkout.success_url,
            "cancel_url": checkout.cancel_url,
        }
        if checkout.customer_id:
            params["customer"] = checkout.customer_id
        return self._call(self.client.v1.checkout.sessions.create, params)

    def retrieve_checkout_session(self, session_id: str) -> Any:
        return self._call(self.client.v1.checkout.sessions.retrieve, session_id)

    def ensure_feature_price(
        self, lookup_key: str, *, product_name: str, unit_amount: int, currency: str = "usd"
    ) -> str:
        """Test-mode set-up (demo app, tests): a monthly price whose product grants the feature.

        Returns the price id (what `STRIPE_SAAS_PRICE_ID` names). The feature is reused when it
        exists; a new product and price are created on each call.
        """
        self.require_test_mode("Creating demo products")
        found = self._call(
            self.client.v1.entitlements.features.list, {"lookup_key": lookup_key, "limit": 1}
        )
        feature = (
            found.data[0]
            if found.data
            else self._call(
                self.client.v1.entitlements.features.create,
                {"lookup_key": lookup_key, "name": lookup_key},
            )
        )
        product = self._call(
            self.client.v1.products.create,
            {
                "name": product_name,
                "default_price_data": {
                    "currency": currency,
                    "unit_amount": unit_amount,
                    "recurring": {"interval": "month"},
                },
            },
        )
        self._call(
            self.client.v1.products.features.create,
            product.id,
            {"entitlement_feature": feature.id},
        )
        return str(product.default_price)

    # Usage corrections (`billing.usage.correcting`) -----------------------------------------

    def cancel_meter_event(self, event_name: str, identifier: str, idempotency_key: str) -> str:
        """Ask Stripe to cancel one meter event (possible within 24 hours of its receipt); the
        adjustment's status (`pending`: Stripe applies it asynchronously). One call, never
        repeated here: the flush's retry policy decides every repeat. A refusal raises
        PermanentStripeError; billing never reads its message (Stripe documents none)."""
        adjustment = self._call(
            self.client.v1.billing.meter_event_adjustments.create,
            {"event_name": event_name, "type": "cancel", "cancel": {"identifier": identifier}},
            {"idempotency_key": idempotency_key, "max_network_retries": 0},
        )
        return str(adjustment.status)

    def subscription_item_price(self, subscription_id: str, meter_id: str) -> Any | None:
        """The price of the subscription's item that the meter bills, or None (a credit for
        retracted usage is priced with it)."""
        subscription = self.retrieve_subscription(subscription_id)
        for item in subscription.items.data if getattr(subscription, "items", None) else []:
            recurring = item.price.recurring
            if recurring is not None and recurring.meter == meter_id:
                return item.price
        return None


class MeterEventSessionHolder:
    """The v2 meter event session's token, shared by the stream's lane threads.

    Renewed when it comes within a margin of its expiry (60 s, or a fifth of the lifetime for
    the emulator's short sessions), and on demand after a 401 `billing_meter_event_session_expired`
    (`renew(stale)`): one renewal however many lanes saw the same stale token."""

    MARGIN_SECONDS = 60.0

    def __init__(
        self,
        create: Callable[[], tuple[str, datetime, datetime]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._create = create
        self._clock = clock
        self._lock = threading.Lock()
        self._token: str | None = None
        self._renew_at = 0.0
        self.renewals = 0

    def token(self) -> str:
        with self._lock:
            if self._token is None or self._clock() >= self._renew_at:
                self._renew()
            assert self._token is not None
            return self._token

    def renew(self, stale: str | None) -> str:
        """A fresh token, unless another thread already replaced `stale`."""
        with self._lock:
            if self._token is None or self._token == stale or stale is None:
                self._renew()
            assert self._token is not None
            return self._token

    def _renew(self) -> None:
        token, created, expires_at = self._create()
        lifetime = (expires_at - created).total_seconds()
        margin = min(self.MARGIN_SECONDS, lifetime / 5)
        self._token = token
        self._renew_at = expires_at.timestamp() - margin
        self.renewals += 1


def subscription_period(subscription: Any) -> tuple[datetime, datetime] | None:
    """The current period, from the items (API 2025-03-31 and later keep it there)."""
    items = subscription.items.data if getattr(subscription, "items", None) else []
    starts = [item.current_period_start for item in items if item.current_period_start]
    ends = [item.current_period_end for item in items if item.current_period_end]
    if not starts or not ends:
        return None
    return datetime.fromtimestamp(min(starts), UTC), datetime.fromtimestamp(max(ends), UTC)


def _iso_datetime(value: Any) -> datetime | None:
    """A v2 timestamp (`2024-09-26T17:46:22.134Z`: v2 uses ISO 8601 strings, not Unix seconds)."""
    if not value:
        return None
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _stream_event(event: MeterEvent) -> dict[str, Any]:
    """A v2 stream event. The timestamp is sent as an RFC 3339 string: stripe-python would turn a
    datetime into Unix seconds in a v2 body, which v2 does not take."""
    moment = event.timestamp if event.timestamp.tzinfo else event.timestamp.replace(tzinfo=UTC)
    return {
        "event_name": event.event_name,
        "identifier": event.identifier,
        "timestamp": moment.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "payload": {"stripe_customer_id": event.stripe_customer_id, "value": str(event.value)},
    }


def _summary_params(
    customer_id: str, start: datetime, end: datetime, **extra: str
) -> dict[str, Any]:
    """The query of a meter's event summaries for one customer over [start, end)."""
    return {
        "customer": customer_id,
        "start_time": int(start.timestamp()),
        "end_time": int(end.timestamp()),
        **extra,
        "limit": 100,
    }


# Webhook signatures ---------------------------------------------------------------------------


def signature_timestamp(header: str) -> int:
    """The `t=` of a `Stripe-Signature` header (`t=<unix>,v1=<hex>[,v1=…]`, Stripe's documented
    format); ValueError when there is not exactly one. Read here, not through stripe-python's
    private helper: a minor upgrade may rename that."""
    stamps = [part.strip()[2:] for part in header.split(",") if part.strip().startswith("t=")]
    if len(stamps) != 1:
        raise ValueError("a Stripe-Signature header holds one t= timestamp")
    return int(stamps[0])


def signed_with(payload: str, header: str, secret: str) -> bool:
    """Whether one of the header's v1 signatures is `payload`'s HMAC with `secret` (stripe-python's
    public check, without its timestamp test: the caller bounds the timestamp both ways)."""
    try:
        stripe.WebhookSignature.verify_header(payload, header, secret)
    except stripe.SignatureVerificationError:
        return False
    return True
