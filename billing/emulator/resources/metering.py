"""Billing meters, meter events (the hot path), adjustments and event summaries."""

from __future__ import annotations

from typing import Any

from billing.emulator.errors import StripeError, invalid
from billing.emulator.params import Int, Map, Obj, Str, endpoint, list_endpoint
from billing.emulator.router import router
from billing.emulator.state import (
    ID_WINDOW,
    ErrorBucket,
    MeterEventRecord,
    State,
    iso_ms,
    newest_first,
    paginate,
)

MAX_PAST = 35 * 86_400  # Stripe refuses meter event timestamps older than 35 days
MAX_FUTURE = 5 * 60  # ... or more than 5 minutes ahead
WINDOWS = {"hour": 3600, "day": 86_400}


def _meter_shape(st: State, p: dict[str, Any]) -> dict[str, Any]:
    now = st.now()
    mapping = p.get("customer_mapping") or {}
    values = p.get("value_settings") or {}
    return {
        "id": st.new_id("mtr_test_", 24),
        "object": "billing.meter",
        "created": now,
        "customer_mapping": {
            "event_payload_key": mapping.get("event_payload_key") or "stripe_customer_id",
            "type": "by_id",
        },
        "default_aggregation": {"formula": p["default_aggregation"]["formula"]},
        "display_name": p["display_name"],
        "event_name": p["event_name"],
        "event_time_window": p.get("event_time_window"),
        "livemode": False,
        "status": "active",
        "status_transitions": {"deactivated_at": None},
        "updated": now,
        "value_settings": {"event_payload_key": values.get("event_payload_key") or "value"},
    }


@router.route(
    "POST",
    "/v1/billing/meters",
    endpoint(
        {
            "customer_mapping": Obj(
                {"event_payload_key": Str(100), "type": Str(choices=("by_id",))},
                ("event_payload_key", "type"),
            ),
            "default_aggregation": Obj(
                {"formula": Str(choices=("count", "last", "sum"))}, ("formula",)
            ),
            "display_name": Str(250),
            "event_name": Str(100),
            "event_time_window": Str(choices=("day", "hour")),
            "value_settings": Obj({"event_payload_key": Str(100)}, ("event_payload_key",)),
        },
        ("default_aggregation", "display_name", "event_name"),
    ),
)
def meters_create(st: State, p: dict[str, Any]) -> dict[str, Any]:
    name = p["event_name"]
    if name in st.meter_by_event:
        raise invalid(
            f"A meter with event_name `{name}` already exists. Meter event names must be unique.",
            param="event_name",
        )
    meter = _meter_shape(st, p)
    st.meters[meter["id"]] = meter
    st.meter_by_event[name] = meter["id"]
    return meter


@router.route("GET", "/v1/billing/meters/{id}", endpoint({}))
def meters_retrieve(st: State, p: dict[str, Any], ident: str) -> dict[str, Any]:
    return st.get(st.meters, "billing.meter", ident)


@router.route("POST", "/v1/billing/meters/{id}", endpoint({"display_name": Str(250)}))
def meters_update(st: State, p: dict[str, Any], ident: str) -> dict[str, Any]:
    meter = st.get(st.meters, "billing.meter", ident)
    if p.get("display_name"):
        meter["display_name"] = p["display_name"]
        meter["updated"] = st.now()
    return meter


@router.route("POST", "/v1/billing/meters/{id}/deactivate", endpoint({}))
def meters_deactivate(st: State, p: dict[str, Any], ident: str) -> dict[str, Any]:
    meter = st.get(st.meters, "billing.meter", ident)
    meter["status"] = "inactive"
    meter["status_transitions"]["deactivated_at"] = meter["updated"] = st.now()
    return meter


@router.route("POST", "/v1/billing/meters/{id}/reactivate", endpoint({}))
def meters_reactivate(st: State, p: dict[str, Any], ident: str) -> dict[str, Any]:
    meter = st.get(st.meters, "billing.meter", ident)
    meter["status"] = "active"
    meter["status_transitions"]["deactivated_at"] = None
    meter["updated"] = st.now()
    return meter


@router.route(
    "GET", "/v1/billing/meters", list_endpoint({"status": Str(choices=("active", "inactive"))})
)
def meters_list(st: State, p: dict[str, Any]) -> dict[str, Any]:
    found = [m for m in st.meters.values() if not p.get("status") or m["status"] == p["status"]]
    return paginate(newest_first(found), p, "/v1/billing/meters")


# meter events -----------------------------------------------------------------------------------


def meter_event_lock_key(st: State, p: dict[str, Any]) -> tuple[str, ...] | None:
    """Stripe allows one concurrent call per (customer, meter): the key, before validation."""
    payload = p.get("payload")
    meter = st.meters.get(st.meter_by_event.get(p.get("event_name") or "", ""))
    if meter is None or not isinstance(payload, dict):
        return None
    customer = payload.get(meter["customer_mapping"]["event_payload_key"])
    return None if customer is None else (meter["id"], customer)


class _Failed(Exception):
    """A meter event failing a check: `sync` is the 400 of sync mode; `code`/`message` the
    sample error of async mode (codes from Stripe's OpenAPI enum; messages [?] but one)."""

    def __init__(self, sync: StripeError, code: str, message: str) -> None:
        super().__init__(message)
        self.sync, self.code, self.message = sync, code, message


def _check(st: State, p: dict[str, Any], now: int) -> tuple[dict[str, Any], str, int, int]:
    """(meter, customer, value, timestamp) of a valid event, or `_Failed`."""
    event_name = p["event_name"]
    meter_id = st.meter_by_event.get(event_name)
    meter = st.meters.get(meter_id) if meter_id else None
    if meter is None:
        raise _Failed(
            invalid(
                f"No active meter was found for event_name `{event_name}`.",
                param="event_name",
                code="resource_missing",
            ),
            "no_meter",
            f"No meter found for event name `{event_name}`.",
        )
    if meter["status"] != "active":
        raise _Failed(
            invalid(
                f"The meter for event_name `{event_name}` is inactive. Reactivate it to accept "
                "events.",
                param="event_name",
            ),
            "archived_meter",
            f"Meter {meter['id']} is archived; events for `{event_name}` are not accepted.",
        )
    payload = p["payload"]
    cus_key = meter["customer_mapping"]["event_payload_key"]
    value_key = meter["value_settings"]["event_payload_key"]
    customer_id = payload.get(cus_key)
    if not customer_id:
        raise _Failed(
            invalid(
                f"Missing required param: payload[{cus_key}].",
                param=f"payload[{cus_key}]",
                code="parameter_missing",
            ),
            "meter_event_no_customer_defined",
            f"Customer mapping key {cus_key} not found in payload.",  # Stripe's fixture text
        )
    cus = st.customers.get(customer_id)
    if cus is None or cus.get("deleted"):
        raise _Failed(
            invalid(
                f"No such customer: '{customer_id}'",
                param=f"payload[{cus_key}]",
                code="resource_missing",
            ),
            "meter_event_customer_not_found",
            f"Customer {customer_id} not found.",
        )
    raw = payload.get(value_key)
    if raw is None:
        if meter["default_aggregation"]["formula"] != "count":
            raise _Failed(
                invalid(
                    f"Missing required param: payload[{value_key}].",
                    param=f"payload[{value_key}]",
                    code="parameter_missing",
                ),
                "meter_event_invalid_value",
                f"Value key {value_key} not found in payload.",
            )
        value = 1
    elif (raw[1:] if raw[:1] == "-" else raw).isdecimal() and raw.isascii():
        value = int(raw)  # negative values correct earlier usage (Stripe's "Fix incorrect usage")
    else:
        raise _Failed(
            invalid(
                f"Invalid payload[{value_key}]: the value must be a whole number, got `{raw}`.",
                param=f"payload[{value_key}]",
            ),
            "meter_event_invalid_value",
            f"Value `{raw}` for key {value_key} is not a whole number.",
        )
    timestamp = p.get("timestamp")
    if timestamp is None:
        timestamp = now
    elif timestamp < now - MAX_PAST:
        raise _Failed(
            invalid(
                "Timestamp must be within the past 35 days.",
                param="timestamp",
                code="timestamp_too_far_in_past",
            ),
            "timestamp_too_far_in_past",
            "Timestamp is more than 35 days in the past.",
        )
    elif timestamp > now + MAX_FUTURE:
        raise _Failed(
            invalid(
                "Timestamp must not be more than 5 minutes in the future.",
                param="timestamp",
                code="timestamp_in_future",
            ),
            "timestamp_in_future",
            "Timestamp is more than 5 minutes in the future.",
        )
    return meter, customer_id, value, timestamp


def _refuse_duplicate(st: State, identifier: str, now: int) -> None:
    seen = st.identifiers.get(identifier)
    if seen is not None and seen.received_at > now - ID_WINDOW:
        st.meter_stats["duplicates"] += 1
        # Stripe's answer to a re-sent identifier; the library must not retry it.
        raise StripeError(
            400,
            f"An event already exists with identifier {identifier}.",
            param="identifier",
            headers=[("Stripe-Should-Retry", "false")],
        )


def _remember(st: State, rec: MeterEventRecord) -> None:
    st.identifiers.pop(rec.identifier, None)  # re-insert keeps receipt order for expiry
    st.identifiers[rec.identifier] = rec


@router.route(
    "POST",
    "/v1/billing/meter_events",
    endpoint(
        {"event_name": Str(100), "identifier": Str(100), "payload": Map(), "timestamp": Int()},
        ("event_name", "payload"),
    ),
    lock_key=meter_event_lock_key,
)
def meter_events_create(st: State, p: dict[str, Any]) -> dict[str, Any]:
    now = st.now()
    event_name = p["event_name"]
    identifier = p.get("identifier") or st.new_id("", 24)
    if st.settings.meter_validation == "sync":
        try:
            meter, customer_id, value, timestamp = _check(st, p, now)
        except _Failed as failed:
            st.meter_stats["rejected"] += 1
            raise failed.sync from None
        _refuse_duplicate(st, identifier, now)
    else:
        # Accepted for processing: only the form (schema) and a re-sent identifier are refused
        # now; whether the identifier of a later-rejected event is kept for dedupe is [?] (kept).
        _refuse_duplicate(st, identifier, now)
        try:
            meter, customer_id, value, timestamp = _check(st, p, now)
        except _Failed as failed:
            _reject_later(st, p, identifier, now, failed)
            return _accepted(p, identifier, p.get("timestamp") or now, now)
    rec = MeterEventRecord(timestamp, value, identifier, now, customer_id, meter["id"], event_name)
    _remember(st, rec)
    st.meter_events.setdefault((meter["id"], customer_id), []).append(rec)
    billed = st.billed.setdefault(customer_id, {})
    billed[event_name] = billed.get(event_name, 0) + value
    st.meter_stats["accepted"] += 1
    return _accepted(p, identifier, timestamp, now)


def _accepted(p: dict[str, Any], identifier: str, timestamp: int, now: int) -> dict[str, Any]:
    return {
        "object": "billing.meter_event",
        "created": now,
        "event_name": p["event_name"],
        "identifier": identifier,
        "livemode": False,
        "payload": p["payload"],
        "timestamp": timestamp,
    }


# asynchronous rejections ------------------------------------------------------------------------

ERROR_REPORT = "meter_error_report"  # the scheduler's kind for a due report
ERROR_REPORT_TRIGGERED = "v1.billing.meter.error_report_triggered"
NO_METER_FOUND = "v1.billing.meter.no_meter_found"


def _reject_later(st: State, p: dict[str, Any], identifier: str, now: int, failed: _Failed) -> None:
    """Record the failure in its meter's open report; the first one schedules the report."""
    event_name = p["event_name"]
    meter_id = st.meter_by_event.get(event_name)
    payload = p["payload"]
    meter = st.meters.get(meter_id or "")
    customer = payload.get(meter["customer_mapping"]["event_payload_key"], "") if meter else ""
    rec = MeterEventRecord(
        p.get("timestamp") or now, 0, identifier, now, customer, meter_id or "", event_name
    )
    rec.rejected = True
    _remember(st, rec)
    st.meter_stats["rejected_async"] += 1
    if failed.code == "no_meter":
        kind, related, key = NO_METER_FOUND, None, f"{NO_METER_FOUND}|{event_name}"
    else:
        kind, related, key = (
            ERROR_REPORT_TRIGGERED,
            meter_id,
            f"{ERROR_REPORT_TRIGGERED}|{meter_id}",
        )
    bucket = st.error_buckets.get(key)
    if bucket is None:
        due = now + st.settings.error_report_delay_seconds
        bucket = st.error_buckets[key] = ErrorBucket(kind, related, now, due)
        st.schedule_at(due, ERROR_REPORT, key)
    bucket.counts[failed.code] = bucket.counts.get(failed.code, 0) + 1
    samples = bucket.samples.setdefault(failed.code, [])
    if len(samples) < st.settings.error_report_samples:
        request = identifier
        if st.settings.error_report_identifier == "idempotency_key":
            request = st.request.idempotency_key or identifier  # [?] without a key
        samples.append((failed.message, request))


def run_error_report(st: State, key: str) -> None:
    """Send the due report: a thin event, its full form kept for `GET /v2/core/events/{id}`."""
    bucket = st.error_buckets.pop(key, None)
    if bucket is None:
        return
    total = sum(bucket.counts.values())
    summary = "There is 1 invalid event" if total == 1 else f"There are {total} invalid events"
    data = {
        "developer_message_summary": summary,
        "reason": {
            "error_count": total,
            "error_types": [
                {
                    "code": code,
                    "error_count": count,
                    "sample_errors": [
                        {"error_message": message, "request": {"identifier": request}}
                        for message, request in bucket.samples[code]
                    ],
                }
                for code, count in bucket.counts.items()
            ],
        },
        "validation_end": iso_ms(bucket.due),
        "validation_start": iso_ms(bucket.opened),
    }
    related = None
    if bucket.meter is not None:
        url = f"/v1/billing/meters/{bucket.meter}"
        related = {"id": bucket.meter, "type": "billing.meter", "url": url}
    st.emit_thin(bucket.type, related, data)
    st.meter_stats["error_reports"] += 1


@router.route("GET", "/v2/core/events/{id}", endpoint({}))
def v2_events_retrieve(st: State, p: dict[str, Any], ident: str) -> dict[str, Any]:
    return st.get(st.v2_events, "v2.core.event", ident)  # v2's own not-found body is [?]


@router.route(
    "POST",
    "/v1/billing/meter_event_adjustments",
    endpoint(
        {
            "cancel": Obj({"identifier": Str(100)}, ("identifier",)),
            "event_name": Str(100),
            "type": Str(choices=("cancel",)),
        },
        ("event_name",),
    ),
)
def meter_event_adjustments_create(st: State, p: dict[str, Any]) -> dict[str, Any]:
    if not p.get("cancel"):
        raise invalid("Missing required param: cancel.", param="cancel", code="parameter_missing")
    identifier, event_name = p["cancel"]["identifier"], p["event_name"]
    now = st.now()
    rec = st.identifiers.get(identifier)
    if rec is None or rec.event_name != event_name or rec.received_at <= now - ID_WINDOW:
        seen = st.expired_identifiers.get(identifier) if rec is None else None
        if rec is not None and rec.received_at <= now - ID_WINDOW:  # not swept yet
            seen = (rec.event_name, rec.received_at)
        if seen is not None and seen[0] == event_name:  # both messages [?]
            raise invalid(
                "Meter events can only be canceled within 24 hours of Stripe receiving them.",
                param="cancel[identifier]",
            )
        raise invalid(
            f"No meter event with identifier {identifier} was found for event_name `{event_name}`.",
            param="cancel[identifier]",
            code="resource_missing",
        )
    if not rec.canceled:
        rec.canceled = True
        if not rec.rejected:  # a rejected event was never counted
            st.billed[rec.customer][rec.event_name] -= rec.value
        st.meter_stats["canceled"] += 1
    adj = {
        "object": "billing.meter_event_adjustment",
        "cancel": {"identifier": identifier},
        "event_name": p["event_name"],
        "livemode": False,
        "status": "pending",  # Stripe's v1 answer; the emulator applies the cancel at once
        "type": "cancel",
    }
    st.adjustments.append(adj)
    return adj


# aggregation ------------------------------------------------------------------------------------


def aggregate(st: State, meter: dict[str, Any], customer: str, start: int, end: int) -> float:
    """The meter's formula over events with start <= timestamp < end, received at least
    `summary_lag_seconds` ago (Stripe aggregates asynchronously)."""
    seen_by = st.now() - st.settings.summary_lag_seconds
    records = [
        r
        for r in st.meter_events.get((meter["id"], customer), ())
        if not r.canceled and start <= r.timestamp < end and r.received_at <= seen_by
    ]
    window = WINDOWS.get(meter.get("event_time_window") or "")
    if window:  # the meter keeps only the newest event per window
        newest: dict[int, MeterEventRecord] = {}
        for r in records:
            key = r.timestamp - r.timestamp % window
            old = newest.get(key)
            if old is None or r.timestamp >= old.timestamp:
                newest[key] = r
        records = sorted(newest.values(), key=lambda r: (r.timestamp, r.received_at))
    formula = meter["default_aggregation"]["formula"]
    if formula == "count":
        return float(len(records))
    if formula == "last":
        if not records:
            return 0.0
        return float(max(records, key=lambda r: (r.timestamp, r.received_at)).value)
    return float(sum(r.value for r in records))


@router.route(
    "GET",
    "/v1/billing/meters/{id}/event_summaries",
    endpoint(
        {
            "customer": Str(),
            "end_time": Int(),
            "ending_before": Str(),
            "limit": Int(1, 100),
            "start_time": Int(),
            "starting_after": Str(),
            "value_grouping_window": Str(choices=("day", "hour")),
        },
        ("customer", "end_time", "start_time"),
    ),
)
def meter_event_summaries(st: State, p: dict[str, Any], ident: str) -> dict[str, Any]:
    meter = st.get(st.meters, "billing.meter", ident)
    st.customer(p["customer"])
    start, end = p["start_time"], p["end_time"]
    grouping = p.get("value_grouping_window")
    step = WINDOWS[grouping] if grouping else 60
    for name, ts in (("start_time", start), ("end_time", end)):
        if ts % step:
            unit = grouping or "minute"
            raise invalid(f"{name} must be aligned with {unit} boundaries.", param=name)
    if start >= end:
        raise invalid("start_time must be before end_time.", param="start_time")
    if grouping:
        bounds = [(t, min(t + step, end)) for t in range(start, end, step)]
        if len(bounds) > 24 * 400:
            raise invalid("Too many windows requested; narrow the time range.", param="end_time")
    else:
        bounds = [(start, end)]
    summaries = []
    for lo, hi in bounds:
        value = aggregate(st, meter, p["customer"], lo, hi)
        if grouping and not value:
            continue  # grouped summaries list the windows that have usage
        summaries.append(
            {
                "id": f"mtrusg_test_{meter['id'][9:]}{p['customer'][4:]}{lo:x}{hi:x}",
                "object": "billing.meter_event_summary",
                "aggregated_value": value,
                "end_time": hi,
                "livemode": False,
                "meter": meter["id"],
                "start_time": lo,
            }
        )
    url = f"/v1/billing/meters/{ident}/event_summaries"
    return paginate(newest_first(summaries), p, url)
