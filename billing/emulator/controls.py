"""Test controls under `/_emulator/` (JSON in, JSON out, no API key; loopback peers only unless
the server allows remote controls). The list with examples is in this package's README.md."""

from __future__ import annotations

import asyncio
import html
import json
import re
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

from billing.emulator.app import SETTING_NAMES, Emulator, apply_settings
from billing.emulator.errors import StripeError, invalid
from billing.emulator.httpserver import HandlerResult, Request, Response
from billing.emulator.limits import FAULT_FIELDS, parse_fault
from billing.emulator.resources import checkout, core

_CHECKOUT = re.compile(r"^/_emulator/checkout(?:_sessions)?/([^/]+)(/complete)?$")
_INVOICE = re.compile(r"^/_emulator/invoices/([^/]+)$")


def _json(data: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(data, indent=2).encode())


class Controls:
    def __init__(self, emulator: Emulator) -> None:
        self.em = emulator
        self._routes = {
            ("GET", "/_emulator/health"): self.health,
            ("POST", "/_emulator/reset"): self.reset,
            ("GET", "/_emulator/clock"): self.clock,
            ("POST", "/_emulator/customers"): self.customers,
            ("POST", "/_emulator/clock"): self.clock,
            ("GET", "/_emulator/faults"): self.faults,
            ("POST", "/_emulator/faults"): self.faults,
            ("GET", "/_emulator/limits"): self.limits,
            ("POST", "/_emulator/limits"): self.limits,
            ("GET", "/_emulator/settings"): self.settings,
            ("POST", "/_emulator/settings"): self.settings,
            ("GET", "/_emulator/stats"): self.stats,
            ("POST", "/_emulator/stats/reset"): self.stats_reset,
            ("GET", "/_emulator/webhooks"): self.webhooks,
            ("POST", "/_emulator/webhooks"): self.webhooks,
            ("POST", "/_emulator/webhooks/flush"): self.flush,
        }

    def handle(self, req: Request) -> HandlerResult:
        if not self.em.options.allow_remote_controls and not _loopback(req.peer):
            return _json(
                {
                    "error": {
                        "message": "Test controls answer loopback clients only.",
                        "type": "invalid_request_error",
                    }
                },
                403,
            )
        try:
            fn = self._routes.get((req.method, req.path))
            if fn is not None:
                return fn(req, _body(req) if req.method == "POST" else {})
            m = _CHECKOUT.match(req.path)
            if m:
                return self.checkout(req, m.group(1), bool(m.group(2)))
            m = _INVOICE.match(req.path)
            if m and req.method == "GET":
                with self.em.state.lock:
                    inv = self.em.state.get(self.em.state.invoices, "invoice", m.group(1))
                    return _json(inv)
            return _json(
                {
                    "error": {
                        "message": f"No control {req.method} {req.path}",
                        "type": "invalid_request_error",
                    }
                },
                404,
            )
        except StripeError as err:
            return Response(err.status, err.body())

    # controls -----------------------------------------------------------------------------------

    def health(self, req: Request, body: dict[str, Any]) -> Response:
        return _json({"ok": True, "api_version": self.em.state.settings.api_version})

    def reset(self, req: Request, body: dict[str, Any]) -> Response:
        self.em.reset()
        return _json({"ok": True, "now": self.em.state.now()})

    def clock(self, req: Request, body: dict[str, Any]) -> Response:
        st = self.em.state
        if req.method == "POST":
            _only(body, {"advance", "set"})
            if "advance" in body:
                seconds = body["advance"]
                if not isinstance(seconds, int | float) or seconds < 0:
                    raise invalid("advance must be a number of seconds >= 0", param="advance")
                self.em.advance_to(st.now() + int(seconds))
            elif "set" in body:
                self.em.advance_to(int(body["set"]))
            else:
                raise invalid('Pass {"advance": seconds} or {"set": unix_ts}.')
        now = st.now()
        return _json(
            {
                "now": now,
                "offset": st.clock.offset,
                "iso": datetime.fromtimestamp(now, UTC).isoformat(),
            }
        )

    def customers(self, req: Request, body: dict[str, Any]) -> Response:
        """Many customers in one call (a benchmark's setup) → their ids, in sequence order."""
        _only(body, {"count", "start", "name", "metadata"})
        count, start = body.get("count"), body.get("start", 1)
        if not _whole(count) or not 1 <= count <= core.MAX_BULK_CUSTOMERS:
            raise invalid(f"count must be 1 to {core.MAX_BULK_CUSTOMERS:,}", param="count")
        if not _whole(start):
            raise invalid("start must be an integer", param="start")
        name, metadata = body.get("name"), body.get("metadata") or {}
        if name is not None and not isinstance(name, str):
            raise invalid("name must be a string", param="name")
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise invalid("metadata must map keys to strings", param="metadata")
        st = self.em.state
        with st.lock:
            ids = core.create_customers(st, count, start, name, metadata)
        return Response(200, json.dumps({"count": len(ids), "ids": ids}).encode())

    def faults(self, req: Request, body: dict[str, Any]) -> Response:
        rules = self.em.faults.rules
        if req.method == "POST":
            _only(body, {"clear", "faults", *FAULT_FIELDS})
            specs = body.get("faults") or (
                []
                if "path" not in body
                else [{k: v for k, v in body.items() if k not in ("clear", "faults")}]
            )
            parsed = [parse_fault(spec) for spec in specs]  # all or nothing
            if body.get("clear"):
                rules.clear()
            rules.extend(parsed)
        return _json({"faults": [r.describe() for r in rules]})

    def limits(self, req: Request, body: dict[str, Any]) -> Response:
        if req.method == "POST":
            self.em.limiter.configure(body)
        return _json(self.em.limiter.describe())

    def settings(self, req: Request, body: dict[str, Any]) -> Response:
        s = self.em.state.settings
        if req.method == "POST":
            with self.em.state.lock:
                apply_settings(s, body)
        return _json({k: getattr(s, k) for k in (*SETTING_NAMES, "api_version")})

    def stats(self, req: Request, body: dict[str, Any]) -> Response:
        return _json(self.em.snapshot())

    def stats_reset(self, req: Request, body: dict[str, Any]) -> Response:
        self.em.reset_stats()
        return _json({"ok": True})

    def webhooks(self, req: Request, body: dict[str, Any]) -> Response:
        sender = self.em.webhooks
        if req.method == "POST":
            if body.pop("clear_deliveries", False):
                sender.clear()
            sender.config.update(body)
        return _json(
            {
                "config": sender.config.describe(),
                "pending": sender.pending(),
                "deliveries": list(sender.deliveries),
            }
        )

    def flush(self, req: Request, body: dict[str, Any]) -> HandlerResult:
        """Wait (without blocking the server) until every queued delivery is done."""
        timeout = float(body.get("timeout", 10))
        sender = self.em.webhooks

        async def wait() -> Response:
            self.em.tick()
            deadline = time.monotonic() + timeout
            while sender.pending() and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            return _json(
                {
                    "idle": sender.pending() == 0,
                    "pending": sender.pending(),
                    "deliveries": len(sender.deliveries),
                }
            )

        return wait()

    def checkout(self, req: Request, ident: str, api: bool) -> Response:
        """`POST .../checkout_sessions/{id}/complete` (JSON) or the payment page's form."""
        st = self.em.state
        with st.lock:
            if req.method == "GET" and not api:
                sess = st.get(st.checkout_sessions, "checkout.session", ident)
                return Response(
                    200,
                    _page(sess, st.checkout_lines[ident]).encode(),
                    content_type="text/html; charset=utf-8",
                )
            if req.method != "POST":
                raise StripeError(405, "Use POST to complete a Checkout Session.")
            if api:
                body = _body(req)
                _only(body, {"email", "name"})
                form = body
            else:
                form = dict(parse_qsl(req.body.decode()))
            try:
                sess = checkout.complete(st, ident, form.get("email"), form.get("name"))
            finally:
                st.flush_events()
        if not api and sess.get("success_url"):
            location = sess["success_url"].replace("{CHECKOUT_SESSION_ID}", ident)
            return Response(303, b"", [("Location", location)], content_type="text/plain")
        return _json(sess)


def _loopback(peer: str) -> bool:
    return peer.startswith("127.") or peer in ("::1", "localhost") or peer.startswith("::ffff:127.")


def _body(req: Request) -> dict[str, Any]:
    if not req.body.strip():
        return {}
    try:
        data = json.loads(req.body)
    except ValueError as exc:
        raise invalid("Controls take a JSON object body.") from exc
    if not isinstance(data, dict):
        raise invalid("Controls take a JSON object body.")
    return data


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _only(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise invalid(f"Received unknown parameter: {unknown[0]}", param=unknown[0])


def _page(sess: dict[str, Any], lines: list[dict[str, Any]]) -> str:
    rows = "".join(
        f"<li>{html.escape(str(li['description']))} — {li['price']['unit_amount_decimal']} "
        f"{html.escape(li['currency'].upper())} (x {li['quantity'] or 'usage'})</li>"
        for li in lines
    )
    email = html.escape(sess.get("customer_email") or "")
    disabled = "" if sess["status"] == "open" else " disabled"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Emulated Checkout</title></head>
<body style="font-family: sans-serif; max-width: 32em; margin: 3em auto">
<h1>Emulated Stripe Checkout</h1>
<p>Session <code>{html.escape(sess["id"])}</code> — status <b>{sess["status"]}</b></p>
<ul>{rows}</ul>
<form method="post">
<label>Email <input name="email" value="{email}"></label>
<button type="submit"{disabled}>Pay (test mode)</button>
</form>
<p><a href="{html.escape(sess.get("cancel_url") or "#")}">Cancel</a></p>
</body></html>"""
