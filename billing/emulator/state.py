"""The emulator's in-memory Stripe account: objects, events, clock and the scheduler of due work.

Objects are kept in Stripe's JSON shape, so rendering is `json.dumps`. Nested objects that Stripe
embeds (a price in a subscription item, items in a subscription) are shared references, so an update
shows everywhere at once; events take a deep snapshot.
"""

from __future__ import annotations

import heapq
import json
import random
import string
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from billing.emulator.errors import invalid, missing

DAY = 86_400
ID_WINDOW = DAY  # identifiers and idempotency keys are kept 24 h, as Stripe guarantees
TOMBSTONE_WINDOW = 35 * DAY  # an expired identifier is remembered as long as events may be dated
_ALPHABET = string.ascii_letters + string.digits


@dataclass
class MeterEventRecord:
    timestamp: int
    value: int
    identifier: str
    received_at: int
    customer: str
    meter: str
    event_name: str
    canceled: bool = False
    rejected: bool = False  # answered 200, failed the asynchronous checks: never aggregated


VALIDATION_MODES = ("async", "sync")
SAMPLE_IDENTIFIERS = ("idempotency_key", "identifier")


@dataclass
class Settings:
    """Behaviour knobs a test may change; `reset` restores the ones the server was built with."""

    finalize_delay: int = 3600  # draft → open, as Stripe's 1 h grace period
    invoice_auto_pay: bool = False  # open invoices with an amount due stay open unless paid
    api_version: str = ""
    # Live Stripe answers a well-formed meter event 200 and checks it later ("async"); "sync"
    # answers each failed check with a 400 at once, as this emulator did before.
    meter_validation: str = "async"
    error_report_delay_seconds: int = 5  # first rejected event → its thin error report
    error_report_samples: int = 5  # sample errors kept per error code in one report
    # What a sample's request.identifier carries: the request's Idempotency-Key (Stripe's
    # reference says "The request idempotency key") or the meter event's identifier.
    error_report_identifier: str = "idempotency_key"
    summary_lag_seconds: int = 0  # events younger than this are not yet in summaries/drafts


@dataclass
class ErrorBucket:
    """Asynchronously rejected meter events waiting for their error report (one thin event)."""

    type: str  # v1.billing.meter.error_report_triggered | v1.billing.meter.no_meter_found
    meter: str | None  # the related meter; None for no_meter_found
    opened: int  # received_at of the first error: the report's validation_start
    due: int  # when the report goes out: its validation_end
    counts: dict[str, int] = field(default_factory=dict)  # code → every error of that code
    samples: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # (message, request)


@dataclass
class Clock:
    """Emulator time = real time + offset. `at` pins "now" while due work runs at its due time."""

    offset: float = 0.0
    at: int | None = None

    def now(self) -> int:
        return self.at if self.at is not None else int(time.time() + self.offset)


@dataclass
class Request:
    """What an event's `request` field and a checkout URL need of the current request."""

    id: str | None = None
    idempotency_key: str | None = None
    base_url: str = ""


class State:
    def __init__(self, settings: Settings, base_url: str = "") -> None:
        self.lock = threading.RLock()
        self.settings = settings
        self.clock = Clock()
        self.request = Request(base_url=base_url)
        self.base_url = base_url
        self.on_events: Callable[[list[dict[str, Any]]], None] = lambda events: None
        self.clear()

    def clear(self) -> None:
        self.customers: dict[str, dict[str, Any]] = {}
        self.products: dict[str, dict[str, Any]] = {}
        self.prices: dict[str, dict[str, Any]] = {}
        self.meters: dict[str, dict[str, Any]] = {}
        self.meter_by_event: dict[str, str] = {}
        self.meter_events: dict[tuple[str, str], list[MeterEventRecord]] = {}
        self.identifiers: dict[str, MeterEventRecord] = {}
        self.expired_identifiers: dict[str, tuple[str, int]] = {}  # → (event_name, received_at)
        self.adjustments: list[dict[str, Any]] = []
        self.features: dict[str, dict[str, Any]] = {}
        self.feature_by_lookup: dict[str, str] = {}
        self.product_features: dict[str, dict[str, Any]] = {}
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self.subscription_items: dict[str, dict[str, Any]] = {}
        self.sub_cycle: dict[str, tuple[int, int]] = {}  # sub id → (anchor, cycle index)
        self.invoices: dict[str, dict[str, Any]] = {}
        self.invoice_items: dict[str, dict[str, Any]] = {}
        self.invoice_seq: dict[str, int] = {}
        self.metered_lines: dict[str, tuple[str, str]] = {}  # line id → (meter id, customer)
        self.checkout_sessions: dict[str, dict[str, Any]] = {}
        self.checkout_lines: dict[str, list[dict[str, Any]]] = {}
        self.events: dict[str, dict[str, Any]] = {}
        self.v2_events: dict[str, dict[str, Any]] = {}  # full thin events, GET /v2/core/events
        self.error_buckets: dict[str, ErrorBucket] = {}  # schedule ident → open report
        self.active_entitlements: dict[str, dict[str, dict[str, Any]]] = {}  # cus → feat → ent
        self.schedule: list[tuple[int, int, str, str]] = []
        self.billed: dict[str, dict[str, int]] = {}
        self.meter_stats = {
            "accepted": 0,
            "duplicates": 0,
            "rejected": 0,
            "rejected_async": 0,
            "error_reports": 0,
            "canceled": 0,
            "lock_timeouts": 0,
        }
        self._pending_events: list[dict[str, Any]] = []
        self._seq = 0
        self._rng = random.Random()

    # ids and time ---------------------------------------------------------------------------

    def new_id(self, prefix: str, length: int = 14) -> str:
        return prefix + "".join(self._rng.choices(_ALPHABET, k=length))

    def now(self) -> int:
        return self.clock.now()

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # lookups ----------------------------------------------------------------------------------

    def get(
        self,
        table: dict[str, dict[str, Any]],
        kind: str,
        ident: str,
        param: str = "id",
        status: int = 404,
    ) -> dict[str, Any]:
        obj = table.get(ident)
        if obj is None:
            err = missing(kind, ident, param)
            err.status = status
            raise err
        return obj

    def customer(self, ident: str, param: str = "customer") -> dict[str, Any]:
        cus = self.get(self.customers, "customer", ident, param, status=400)
        if cus.get("deleted"):
            raise missing("customer", ident, param)
        return cus

    def resolve(self, ident: str) -> dict[str, Any] | None:
        """Any object by id, for `expand`."""
        for prefix, table in (
            ("cus_", self.customers),
            ("prod_", self.products),
            ("price_", self.prices),
            ("mtr_", self.meters),
            ("sub_", self.subscriptions),
            ("si_", self.subscription_items),
            ("in_", self.invoices),
            ("ii_", self.invoice_items),
            ("cs_", self.checkout_sessions),
            ("feat_", self.features),
            ("evt_", self.events),
        ):
            if ident.startswith(prefix):
                return table.get(ident)
        return None

    # events -----------------------------------------------------------------------------------

    def emit(self, type: str, obj: dict[str, Any], previous: dict[str, Any] | None = None) -> None:
        data: dict[str, Any] = {"object": json.loads(json.dumps(obj))}
        if previous is not None:
            data["previous_attributes"] = json.loads(json.dumps(previous))
        event = {
            "id": self.new_id("evt_", 24),
            "object": "event",
            "api_version": self.settings.api_version,
            "created": self.now(),
            "data": data,
            "livemode": False,
            "pending_webhooks": 0,
            "request": {
                "id": self.request.id,
                "idempotency_key": self.request.idempotency_key,
            },
            "type": type,
        }
        self.events[event["id"]] = event
        self._pending_events.append(event)

    def emit_thin(
        self, type: str, related_object: dict[str, Any] | None, data: dict[str, Any]
    ) -> dict[str, Any]:
        """A v2 thin event: the destination gets the payload without `data`, which only
        `GET /v2/core/events/{id}` returns."""
        thin = {
            "id": self.new_id("evt_test_", 46),
            "object": "v2.core.event",
            "context": None,
            "created": iso_ms(self.now()),
            "livemode": False,
            "reason": None,
            "related_object": related_object,
            "type": type,
        }
        self.v2_events[thin["id"]] = {**thin, "changes": None, "data": data}
        self._pending_events.append(thin)
        return thin

    def flush_events(self) -> None:
        """Hand this request's events to the webhook sender as one batch (see webhooks.py)."""
        if self._pending_events:
            batch, self._pending_events = self._pending_events, []
            self.on_events(batch)

    # scheduler --------------------------------------------------------------------------------

    def schedule_at(self, due: int, kind: str, ident: str) -> None:
        heapq.heappush(self.schedule, (due, self.next_seq(), kind, ident))

    def run_due(self, until: int, runner: Callable[[State, str, str, int], None]) -> None:
        """Run work due up to `until` in time order, each step at its own due time."""
        while self.schedule and self.schedule[0][0] <= until:
            due, _, kind, ident = heapq.heappop(self.schedule)
            self.clock.at = max(due, self.clock.at or 0)
            try:
                runner(self, kind, ident, due)
            finally:
                self.clock.at = None

    def due_soon(self, until: int) -> bool:
        return bool(self.schedule) and self.schedule[0][0] <= until

    def expire_identifiers(self) -> None:
        """Identifiers older than the dedupe window become tombstones (a cancel then says "too
        late", not "never received"), kept as long as an event may be backdated."""
        now = self.now()
        cutoff = now - ID_WINDOW
        stale = []
        for key, rec in self.identifiers.items():  # in receipt order: stop at the first fresh one
            if rec.received_at > cutoff:
                break
            stale.append(key)
        for key in stale:
            rec = self.identifiers.pop(key)
            self.expired_identifiers.pop(key, None)  # re-insert keeps receipt order here too
            self.expired_identifiers[key] = (rec.event_name, rec.received_at)
        forget = now - TOMBSTONE_WINDOW
        old = []
        for key, (_, received_at) in self.expired_identifiers.items():
            if received_at > forget:
                break
            old.append(key)
        for key in old:
            del self.expired_identifiers[key]


def iso_ms(ts: int) -> str:
    """v2's timestamp format: `2024-09-26T17:46:22.000Z`."""
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(ts))


# lists and expansion ----------------------------------------------------------------------------


def paginate(objects: list[dict[str, Any]], params: dict[str, Any], url: str) -> dict[str, Any]:
    """`objects` newest first, as Stripe lists them; `starting_after`/`ending_before` by id."""
    limit = params.get("limit") or 10
    after, before = params.get("starting_after"), params.get("ending_before")
    start, stop = 0, len(objects)
    if after:
        idx = _index(objects, after, "starting_after")
        start = idx + 1
    if before:
        idx = _index(objects, before, "ending_before")
        stop = idx
        start = max(start, stop - limit)
    page = objects[start : min(stop, start + limit)]
    return {
        "object": "list",
        "data": page,
        "has_more": start + len(page) < stop if not before else start > 0,
        "url": url,
    }


def _index(objects: list[dict[str, Any]], ident: str, param: str) -> int:
    for i, obj in enumerate(objects):
        if obj.get("id") == ident:
            return i
    raise invalid(f"No such object: '{ident}'", param=param, code="resource_missing")


def newest_first(objects: Any) -> list[dict[str, Any]]:
    return list(reversed(list(objects)))


def expand(state: State, obj: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    """Replace id strings by objects along dotted paths (`customer`, `data.customer`, ...)."""
    if not paths:
        return obj
    copy = json.loads(json.dumps(obj))
    for path in paths:
        _expand_path(state, copy, path.split("."), path)
    return copy


def _expand_path(state: State, node: Any, parts: list[str], full: str) -> None:
    if isinstance(node, list):
        for item in node:
            _expand_path(state, item, parts, full)
        return
    if not isinstance(node, dict):
        return
    key, rest = parts[0], parts[1:]
    if key not in node:
        raise invalid(f"This property cannot be expanded ({full}).", param="expand")
    value = node[key]
    if isinstance(value, str):
        target = state.resolve(value)
        if target is None:
            raise invalid(f"This property cannot be expanded ({full}).", param="expand")
        value = node[key] = {
            k: v for k, v in json.loads(json.dumps(target)).items() if not k.startswith("_")
        }
    if rest and value is not None:
        _expand_path(state, value, rest, full)
