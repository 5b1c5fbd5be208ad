"""The request pipeline: stats → auth → route → rate ceiling → faults → params → per-object lock
→ (latency) → idempotency → handler. Rate limits and faults come before idempotency, as on Stripe,
so a retry after them is a fresh attempt.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import os
import re
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

import stripe

from billing.emulator import errors
from billing.emulator.errors import StripeError
from billing.emulator.httpserver import HandlerResult, Request, Response
from billing.emulator.limits import Decision, Fault, Faults, RateLimiter
from billing.emulator.params import parse_form
from billing.emulator.resources import metering, subscriptions
from billing.emulator.router import Route, router
from billing.emulator.state import (
    ID_WINDOW,
    SAMPLE_IDENTIFIERS,
    VALIDATION_MODES,
    Settings,
    State,
    expand,
)
from billing.emulator.webhooks import WebhookConfig, WebhookSender

log = logging.getLogger("billing.emulator")
API_VERSION = stripe.api_version


class ControlHandler(Protocol):
    def handle(self, req: Request) -> HandlerResult: ...


@dataclass
class Options:
    """What a server is built with; `reset` comes back to it."""

    webhook_url: str | None = None
    webhook_secret: str | None = None
    rate_limits: str = "test"
    global_rps: float | None = None
    path_rps: dict[str, float | None] | None = None
    finalize_delay: int = 3600
    invoice_auto_pay: bool = True
    webhook_backoff_ms: float = 1000.0
    webhook_max_attempts: int = 10
    allow_remote_controls: bool = False
    meter_validation: str = "async"
    error_report_delay_seconds: int = 5
    error_report_samples: int = 5
    error_report_identifier: str = "idempotency_key"
    summary_lag_seconds: int = 0
    thin_webhook_url: str | None = None  # the thin-event destination; default: webhook_url
    thin_webhook_secret: str | None = None  # its signing secret; default: webhook_secret


# The settings a test may change at run time (`POST /_emulator/settings`); Options carries each.
SETTING_NAMES = (
    "finalize_delay",
    "invoice_auto_pay",
    "meter_validation",
    "error_report_delay_seconds",
    "error_report_samples",
    "error_report_identifier",
    "summary_lag_seconds",
)


def apply_settings(settings: Settings, changes: dict[str, Any]) -> None:
    """Validated setting changes (options at reset, `POST /_emulator/settings`): all or none."""
    checked: dict[str, Any] = {}
    for key, value in changes.items():
        if key == "invoice_auto_pay":
            checked[key] = bool(value)
        elif key == "meter_validation":
            checked[key] = _choice(key, value, VALIDATION_MODES)
        elif key == "error_report_identifier":
            checked[key] = _choice(key, value, SAMPLE_IDENTIFIERS)
        elif key in ("finalize_delay", "error_report_delay_seconds", "summary_lag_seconds"):
            checked[key] = _whole(key, value, 0)
        elif key == "error_report_samples":
            checked[key] = _whole(key, value, 1)
        else:
            raise errors.invalid(f"Received unknown parameter: {key}", param=key)
    for key, value in checked.items():
        setattr(settings, key, value)


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise errors.invalid(f"{key} must be one of {', '.join(allowed)}", param=key)
    return str(value)


def _whole(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise errors.invalid(f"{key} must be a whole number >= {minimum}", param=key)
    return int(value)


@dataclass
class _Stored:
    created: int
    signature: tuple[str, str, str]
    status: int
    body: bytes
    headers: list[tuple[str, str]]


class Stats:
    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.responses: dict[str, dict[str, int]] = {}
        self.started = time.time()

    def count(self, key: str) -> None:
        self.requests[key] = self.requests.get(key, 0) + 1

    def answered(self, key: str, status: int) -> None:
        by_status = self.responses.get(key)
        if by_status is None:
            by_status = self.responses[key] = {}
        code = str(status)
        by_status[code] = by_status.get(code, 0) + 1


class Emulator:
    def __init__(self, options: Options | None = None) -> None:
        self.options = options or Options()
        self.state = State(Settings(api_version=API_VERSION))
        self.limiter = RateLimiter()
        self.faults = Faults()
        self.webhooks = WebhookSender(WebhookConfig())
        self.state.on_events = self.webhooks.enqueue
        self.stats = Stats()
        self._idem: dict[tuple[str, str], _Stored] = {}
        self._idem_inflight: set[tuple[str, str]] = set()
        self._locks: set[tuple[str, ...]] = set()
        self._req_ids = itertools.count(1)
        self._req_prefix = "req_" + os.urandom(4).hex()
        self._last_sweep = 0.0
        # `/_emulator/` (tests' controls): whoever serves this emulator wires them
        # (`EmulatorServer`), so the controls module may import this one and not the reverse.
        self.controls: ControlHandler | None = None
        self.reset()

    # configuration -----------------------------------------------------------------------------

    def reset(self) -> None:
        o = self.options
        with self.state.lock:
            self.state.clear()
            self.state.clock.offset = 0.0
            apply_settings(self.state.settings, {k: getattr(o, k) for k in SETTING_NAMES})
            self.faults.rules.clear()
            limits: dict[str, Any] = {"preset": o.rate_limits}
            if o.global_rps is not None:
                limits["global"] = o.global_rps
            if o.path_rps:
                limits["paths"] = dict(o.path_rps)
            self.limiter.configure(limits)
            self.webhooks.config = WebhookConfig(
                url=o.webhook_url,
                secret=o.webhook_secret,
                backoff_ms=o.webhook_backoff_ms,
                max_attempts=o.webhook_max_attempts,
                thin_url=o.thin_webhook_url,
                thin_secret=o.thin_webhook_secret,
            )
            self.webhooks.clear()
            self.stats = Stats()
            self._idem.clear()
            self._idem_inflight.clear()
            self._locks.clear()

    def reset_stats(self) -> None:
        """Request counters from zero (`POST /_emulator/stats/reset`); state is kept."""
        self.stats = Stats()

    def set_base_url(self, url: str) -> None:
        self.state.base_url = url

    # periodic work -----------------------------------------------------------------------------

    def tick(self) -> None:
        """Due work when no request comes (the server calls this every second)."""
        with self.state.lock:
            self._run_due()
            self.state.flush_events()
            if time.monotonic() - self._last_sweep > 60:
                self.sweep()

    def sweep(self) -> None:
        """Forget identifiers and idempotency keys older than 24 h of emulator time."""
        self._last_sweep = time.monotonic()
        self.state.expire_identifiers()
        cutoff = self.state.now() - ID_WINDOW
        for key in [k for k, v in self._idem.items() if v.created <= cutoff]:
            del self._idem[key]

    def _run_due(self) -> None:
        st = self.state
        if st.due_soon(st.now()):
            st.run_due(st.now(), _run_due_work)

    def advance_to(self, target: int) -> None:
        """Move emulator time to `target`, running what falls due on the way, in order."""
        st = self.state
        with st.lock:
            if target > st.now():
                st.run_due(target, _run_due_work)
            st.clock.offset += target - st.now()
            self.sweep()
            st.flush_events()

    # the pipeline ------------------------------------------------------------------------------

    def handle(self, req: Request) -> HandlerResult:
        started = time.perf_counter()
        key = f"{req.method} {req.path}"
        self.stats.count(key)
        api = not req.path.startswith("/_emulator")
        if api:
            result = self._api(req)
        elif self.controls is not None:
            result = self.controls.handle(req)
        else:
            result = self._error(errors.StripeError(404, "No test controls on this emulator"))
        if result is None or isinstance(result, Response):
            self._log(req, key, result, started)
            return result
        return self._after(result, req, key, started)

    async def _after(
        self, pending: Awaitable[Response | None], req: Request, key: str, started: float
    ) -> Response | None:
        result = await pending
        self._log(req, key, result, started)
        return result

    def _log(self, req: Request, key: str, resp: Response | None, started: float) -> None:
        status = resp.status if resp is not None else 0
        self.stats.answered(key, status)
        if log.isEnabledFor(logging.INFO):
            ms = (time.perf_counter() - started) * 1000
            shown = status or "dropped"
            log.info('%s "%s %s" %s %.1fms', req.peer, req.method, req.path, shown, ms)

    def _api(self, req: Request) -> HandlerResult:
        lock: tuple[str, ...] | None = None
        try:
            api_key = self._authenticate(req)
            match = router.match(req.method, req.path)
            if match is None:
                raise StripeError(
                    404,
                    f"Unrecognized request URL ({req.method}: {req.path}). "
                    "Please see https://stripe.com/docs or we can help at "
                    "https://support.stripe.com/.",
                )
            if not self.limiter.allow(req.path):
                raise errors.rate_limited()
            decision = self.faults.decide(req.method, req.path)
            if decision is not None and not decision.latency_ms:
                return None if decision.drop else self._fault_response(decision.status)
            route, args = match
            params = self._params(req, route)
            if route.lock_key is not None:
                lock = route.lock_key(self.state, params)
                if lock is not None:
                    if lock in self._locks:
                        self.state.meter_stats["lock_timeouts"] += 1
                        raise errors.lock_timeout()
                    self._locks.add(lock)
            if decision is not None:
                held, lock = lock, None  # the delayed call releases it
                return self._delayed(decision, req, api_key, route, args, params, held)
            return self._execute(req, api_key, route, args, params)
        except StripeError as err:
            return self._error(err)
        finally:
            if lock is not None:
                self._locks.discard(lock)

    async def _delayed(
        self,
        decision: Decision,
        req: Request,
        api_key: str,
        route: Route,
        args: tuple[str, ...],
        params: dict[str, Any],
        lock: tuple[str, ...] | None,
    ) -> Response | None:
        # Holding the per-object lock (and the idempotency key) across the latency makes
        # contention observable: a concurrent call gets lock_timeout (or 409 for the same key).
        claim = self._idem_key(req, api_key)
        if claim is not None and (claim in self._idem_inflight or claim in self._idem):
            claim = None
        if claim is not None:
            self._idem_inflight.add(claim)
        try:
            await asyncio.sleep(decision.latency_ms / 1000.0)
            if decision.drop:
                return None
            if decision.status is not None:
                return self._fault_response(decision.status)
            if claim is not None:
                self._idem_inflight.discard(claim)
                claim = None
            try:
                return self._execute(req, api_key, route, args, params)
            except StripeError as err:
                return self._error(err)
        finally:
            if claim is not None:
                self._idem_inflight.discard(claim)
            if lock is not None:
                self._locks.discard(lock)

    def _authenticate(self, req: Request) -> str:
        header = req.headers.get("authorization", "")
        scheme, _, cred = header.partition(" ")
        if scheme.lower() == "basic":  # curl -u sk_test_...:
            try:
                cred = base64.b64decode(cred).decode().partition(":")[0]
            except (ValueError, UnicodeDecodeError):
                cred = ""
        elif scheme.lower() != "bearer":
            cred = ""
        cred = cred.strip()
        if not cred:
            raise StripeError(
                401,
                "You did not provide an API key. You need to provide your API "
                "key in the Authorization header, using Bearer auth (e.g. "
                "'Authorization: Bearer YOUR_SECRET_KEY').",
            )
        if cred.startswith(("sk_live_", "rk_live_", "pk_live_")):
            raise StripeError(
                401,
                "This is the Stripe emulator: it accepts test-mode keys "
                "(sk_test_...) only and refuses live-mode keys. Never point a "
                "live key at it.",
            )
        if not cred.startswith(("sk_test_", "rk_test_")):
            raise StripeError(401, f"Invalid API Key provided: {_masked_key(cred)}")
        return cred

    def _params(self, req: Request, route: Route) -> dict[str, Any]:
        if req.method == "POST":
            ctype = req.headers.get("content-type", "")
            if req.body and "json" in ctype:
                raise errors.invalid(
                    "Invalid request: v1 endpoints take form-encoded bodies "
                    "(application/x-www-form-urlencoded), not JSON."
                )
            raw = parse_form(req.query) if req.query else {}
            try:
                raw.update(parse_form(req.body.decode("utf-8")))
            except UnicodeDecodeError as exc:
                raise errors.invalid("Invalid request: the body is not UTF-8.") from exc
        else:
            raw = parse_form(req.query) if req.query else {}
        return route.schema.clean_fields(raw)

    def _idem_key(self, req: Request, api_key: str) -> tuple[str, str] | None:
        if req.method != "POST":
            return None
        value = req.headers.get("idempotency-key")
        return (api_key, value) if value else None

    def _execute(
        self,
        req: Request,
        api_key: str,
        route: Route,
        args: tuple[str, ...],
        params: dict[str, Any],
    ) -> Response:
        st = self.state
        idem = self._idem_key(req, api_key)
        headers = self._headers(req)
        signature = ("", "", "")
        if idem is not None:
            signature = (req.method, req.path, json.dumps(params, sort_keys=True))
            if len(idem[1]) > 255:
                raise errors.invalid(
                    "Idempotency-Key must be at most 255 characters.", param="Idempotency-Key"
                )
            stored = self._idem.get(idem)
            if stored is not None and stored.created > st.now() - ID_WINDOW:
                if stored.signature != signature:
                    raise StripeError(
                        400,
                        "Keys for idempotent requests can only be used with the same parameters "
                        "they were first used with. Try using a key other than "
                        f"'{idem[1]}' if you meant to execute a different request.",
                        type="idempotency_error",
                    )
                return Response(
                    stored.status,
                    stored.body,
                    [*headers, ("Idempotent-Replayed", "true"), *stored.headers],
                )
            if idem in self._idem_inflight:
                raise StripeError(
                    409,
                    "There is currently another in-progress request using this Idempotent Key "
                    "(that probably means you submitted twice, and the other request is still "
                    "going through). Please retry this request later.",
                    type="idempotency_error",
                    code="idempotency_key_in_use",
                )
        with st.lock:
            st.request.id = headers[0][1]
            st.request.idempotency_key = idem[1] if idem else None
            host = req.headers.get("host")
            st.request.base_url = f"http://{host}" if host else st.base_url
            self._run_due()
            try:
                result = route.handler(st, params, *args)
                paths = params.get("expand")
                if paths:
                    result = expand(st, result, paths)
                status, body, extra = 200, json.dumps(result).encode(), []
            except StripeError as err:
                status, body, extra = err.status, err.body(), err.headers
            finally:
                st.flush_events()
        # Validation-type failures are not saved (Stripe saves results once execution began).
        if idem is not None and (status < 400 or status >= 500):
            self._idem[idem] = _Stored(st.now(), signature, status, body, extra)
        return Response(status, body, headers + extra)

    def _headers(self, req: Request) -> list[tuple[str, str]]:
        headers = [
            ("Request-Id", f"{self._req_prefix}{next(self._req_ids):010d}"),
            ("Stripe-Version", req.headers.get("stripe-version") or API_VERSION),
        ]
        idem = req.headers.get("idempotency-key")
        if idem and req.method == "POST":
            headers.append(("Idempotency-Key", idem))
        return headers

    def _error(self, err: StripeError) -> Response:
        return Response(
            err.status,
            err.body(),
            [("Request-Id", f"{self._req_prefix}{next(self._req_ids):010d}"), *err.headers],
        )

    def _fault_response(self, fault: Fault | None) -> Response:
        assert fault is not None and fault.status is not None
        if fault.status == 429:
            err = errors.lock_timeout() if fault.code == "lock_timeout" else errors.rate_limited()
        elif fault.status >= 500:
            err = errors.api_error(fault.status)
        else:
            err = StripeError(fault.status, "Emulated fault.", code=fault.code)
        if fault.should_retry is not None:
            err.headers = [h for h in err.headers if h[0] != "Stripe-Should-Retry"]
            err.headers.append(("Stripe-Should-Retry", "true" if fault.should_retry else "false"))
        return self._error(err)

    # snapshot for GET /_emulator/stats ----------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        st = self.state
        with st.lock:
            return {
                "now": st.now(),
                "uptime_s": round(time.time() - self.stats.started, 3),
                "requests": dict(self.stats.requests),
                "responses": {k: dict(v) for k, v in self.stats.responses.items()},
                "billed": {c: dict(v) for c, v in st.billed.items()},
                "meter_events": dict(st.meter_stats),
                "webhooks": {
                    "pending": self.webhooks.pending(),
                    "delivered": sum(1 for d in self.webhooks.deliveries if d["ok"]),
                    "failed_attempts": sum(1 for d in self.webhooks.deliveries if not d["ok"]),
                },
                "events": len(st.events),
                "thin_events": len(st.v2_events),
            }


def _run_due_work(st: State, kind: str, ident: str, due: int) -> None:
    """The scheduler's dispatcher (see State.run_due)."""
    if kind == metering.ERROR_REPORT:
        metering.run_error_report(st, ident)
    else:
        subscriptions.run_due_work(st, kind, ident, due)


_KEY_PREFIX = re.compile(r"[a-z]{2,5}_(?:(?:test|live)_)?")


def _masked_key(key: str) -> str:
    """A refused key as Stripe echoes it (`sk_test_****1234`): its prefix and, when the rest is
    long, its last four; the asterisks do not tell its length."""
    match = _KEY_PREFIX.match(key)
    prefix = match.group(0) if match else ""
    rest = key[len(prefix) :]
    return f"{prefix}****{rest[-4:] if len(rest) >= 12 else ''}"
