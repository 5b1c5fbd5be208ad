"""Stripe's v2 meter event stream: a session (secret key) gives a short-lived token; the stream
takes up to 100 events per request with that token, answers `{}` and checks them later, through
the same recording path as v1's asynchronous meter events (shared 24 h identifier dedupe, error
reports, summaries, billed totals)."""

from __future__ import annotations

import json
import secrets
from datetime import datetime
from typing import Any

from billing.emulator.errors import StripeError
from billing.emulator.httpserver import Request
from billing.emulator.params import endpoint
from billing.emulator.resources import metering
from billing.emulator.router import router
from billing.emulator.state import State, iso_ms

SESSION_PATH = "/v2/billing/meter_event_session"
STREAM_PATH = "/v2/billing/meter_event_stream"
MAX_EVENTS = 100  # Stripe's ceiling per stream request
TOKEN_PREFIX = "mes_test_"  # the token's shape is [?]: opaque to clients
EVENT_FIELDS = frozenset({"event_name", "identifier", "payload", "timestamp"})


def v2_error(status: int, message: str, type: str, code: str | None = None) -> StripeError:
    return StripeError(status, message, type=type, code=code)


def authenticate(st: State, req: Request) -> str:
    """The stream takes its session's token only, as a Bearer credential."""
    scheme, _, token = req.headers.get("authorization", "").partition(" ")
    token = token.strip()
    expires_at = st.meter_event_sessions.get(token) if scheme.lower() == "bearer" else None
    if expires_at is None:
        raise v2_error(
            401,
            "The meter event stream takes a meter event session's authentication_token as its "
            "API key; create one with POST /v2/billing/meter_event_session.",
            "invalid_request_error",
            "invalid_api_key",  # [?] the code for an unknown token
        )
    if expires_at <= st.now():
        st.meter_stream_stats["expired"] += 1
        raise v2_error(
            401,
            "The meter event session has expired. Create a new one.",  # message [?]
            "temporary_session_expired",
            "billing_meter_event_session_expired",
        )
    return token


def json_body(req: Request) -> dict[str, Any]:
    """v2 bodies are JSON objects (an empty body is `{}`)."""
    if not req.body:
        return {}
    try:
        body = json.loads(req.body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad("The request body is not valid JSON.") from exc
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object.")
    return body


def _bad(message: str) -> StripeError:
    return v2_error(400, message, "invalid_request_error", "invalid_request")  # code [?]


@router.route("POST", SESSION_PATH, endpoint({}))
def session_create(st: State, p: dict[str, Any]) -> dict[str, Any]:
    now = st.now()
    expires_at = now + st.settings.meter_event_session_seconds
    token = TOKEN_PREFIX + secrets.token_urlsafe(24)
    # Expired tokens are forgotten on the next session (they are answered 401 until then).
    for old in [t for t, exp in st.meter_event_sessions.items() if exp <= now - 3600]:
        del st.meter_event_sessions[old]
    st.meter_event_sessions[token] = expires_at
    st.meter_stream_stats["sessions"] += 1
    return {
        "id": st.new_id("mes_test_", 24),
        "object": "v2.billing.meter_event_session",
        "authentication_token": token,
        "created": iso_ms(now),
        "expires_at": iso_ms(expires_at),
        "livemode": False,
    }


@router.route("POST", STREAM_PATH, endpoint({}))
def stream_create(st: State, p: dict[str, Any]) -> dict[str, Any]:
    events = p.get("events")
    if not isinstance(events, list) or not events:
        raise _bad("events must be a non-empty list of meter events.")
    if len(events) > MAX_EVENTS:
        raise _bad(f"A request takes at most {MAX_EVENTS} events; got {len(events)}.")
    checked = [_event(i, e) for i, e in enumerate(events)]  # all well-formed, or none taken
    now = st.now()
    stats = st.meter_stream_stats
    stats["requests"] += 1
    stats["events"] += len(checked)
    for event in checked:
        identifier = event.get("identifier") or st.new_id("", 24)
        try:
            metering.refuse_duplicate(st, identifier, now)
        except StripeError:
            continue  # a re-sent identifier is dropped (counted in `duplicates`); no report [?]
        metering.accept_checked(st, event, identifier, now)
    return {}


def _event(index: int, event: Any) -> dict[str, Any]:
    """A stream event in v1's parameter shape (`timestamp` as epoch seconds), or a 400."""
    where = f"events[{index}]"
    if not isinstance(event, dict) or set(event) - EVENT_FIELDS:
        raise _bad(f"{where} must be an object of {', '.join(sorted(EVENT_FIELDS))}.")
    name, payload = event.get("event_name"), event.get("payload")
    if not isinstance(name, str) or not 0 < len(name) <= 100:
        raise _bad(f"{where}.event_name is required (a string of at most 100 characters).")
    if not isinstance(payload, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in payload.items()
    ):
        raise _bad(f"{where}.payload is required: an object of string values.")
    identifier = event.get("identifier")
    if identifier is not None and (not isinstance(identifier, str) or len(identifier) > 100):
        raise _bad(f"{where}.identifier must be a string of at most 100 characters.")
    out: dict[str, Any] = {"event_name": name, "payload": payload, "identifier": identifier}
    stamp = event.get("timestamp")
    if stamp is not None:
        if not isinstance(stamp, str):
            raise _bad(f"{where}.timestamp must be an RFC 3339 string.")
        try:
            moment = datetime.fromisoformat(stamp)
        except ValueError:
            moment = None
        if moment is None or moment.tzinfo is None:
            raise _bad(f"{where}.timestamp must be an RFC 3339 string with its offset.")
        out["timestamp"] = int(moment.timestamp())
    return out
