"""Webhook delivery: signed like Stripe, POSTed from a background thread, retried with backoff.

An API request never waits on delivery: it hands its events over as one batch (so that
`reverse`/`shuffle` can reorder what one call emitted) and returns.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from billing.emulator.errors import invalid

log = logging.getLogger("billing.emulator.webhooks")
ORDERS = ("in_order", "reverse", "shuffle")


def sign(payload: bytes, secret: str, timestamp: int) -> str:
    """`Stripe-Signature` as Stripe builds it: HMAC-SHA256 of "{t}.{body}" with the secret."""
    signed = f"{timestamp}.".encode() + payload
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


@dataclass
class WebhookConfig:
    url: str | None = None
    secret: str | None = None
    duplicate: bool = False  # deliver every event twice (same event id)
    order: str = "in_order"  # or "reverse" / "shuffle" within a batch
    hold_ms: float = 0.0  # gather events this long before a batch goes out
    backoff_ms: float = 1000.0  # first retry delay; doubles per attempt
    max_backoff_ms: float = 60_000.0
    max_attempts: int = 10
    timeout_s: float = 5.0
    timestamp_offset: int = 0  # shift `t=` (negative forges a stale signature)
    enabled_events: list[str] = field(default_factory=lambda: ["*"])
    seed: int = 0
    # The event destination of thin (v2.core.event) payloads. On Stripe a destination carries
    # either snapshot or thin payloads, each with its own secret; unset, thin events go to
    # `url` signed with `secret`.
    thin_url: str | None = None
    thin_secret: str | None = None

    def update(self, spec: dict[str, Any]) -> None:
        for key, value in spec.items():
            if key not in self.__dataclass_fields__:
                raise invalid(f"Unknown webhooks field: {key}", param=key)
            setattr(self, key, value)
        if self.order not in ORDERS:
            raise invalid(f"order must be one of {ORDERS}", param="order")
        for name in ("url", "thin_url"):
            url = getattr(self, name)
            if url and not url.startswith(("http://", "https://")):
                raise invalid(f"{name} must be http(s)://...", param=name)

    def destination(self, thin: bool) -> tuple[str | None, str | None]:
        """(url, secret) that a snapshot or a thin event is delivered to."""
        if thin:
            return self.thin_url or self.url, self.thin_secret or self.secret
        return self.url, self.secret

    def wants(self, event_type: str) -> bool:
        for pattern in self.enabled_events:
            if pattern == "*" or pattern == event_type:
                return True
            if pattern.endswith(".*") and event_type.startswith(pattern[:-1]):
                return True
        return False

    def describe(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for name in ("secret", "thin_secret"):
            if out[name]:
                out[name] = out[name][:10] + "…"
        return out


@dataclass(order=True)
class _Job:
    due: float
    seq: int
    event_id: str = field(compare=False)
    event_type: str = field(compare=False)
    body: bytes = field(compare=False)
    arrival: int = field(compare=False, default=0)  # enqueue order, for reordering
    attempt: int = field(compare=False, default=0)
    duplicate: bool = field(compare=False, default=False)
    generation: int = field(compare=False, default=0)
    thin: bool = field(compare=False, default=False)  # a v2.core.event payload


class WebhookSender:
    def __init__(self, config: WebhookConfig) -> None:
        self.config = config
        self._cv = threading.Condition()
        self._jobs: list[_Job] = []
        self._seq = 0
        self._stop = False
        self._inflight = 0
        self._generation = 0  # bumped by clear(): a delivery in flight then is forgotten
        self._rng = random.Random(config.seed)
        self.deliveries: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._run, name="emulator-webhooks", daemon=True)
        self._thread.start()

    # producer side --------------------------------------------------------------------------

    def enqueue(self, events: list[dict[str, Any]]) -> None:
        cfg = self.config
        batch = [
            e
            for e in events
            if all(cfg.destination(e["object"] == "v2.core.event")) and cfg.wants(e["type"])
        ]
        if not batch:
            return
        due = time.monotonic() + cfg.hold_ms / 1000.0
        with self._cv:
            for event in batch:
                thin = event["object"] == "v2.core.event"
                if not thin:  # a thin payload has no pending_webhooks
                    event["pending_webhooks"] = 1
                body = json.dumps(event, indent=2).encode()
                for dup in (False, True) if cfg.duplicate else (False,):
                    self._seq += 1
                    self._jobs.append(
                        _Job(
                            due,
                            self._seq,
                            event["id"],
                            event["type"],
                            body,
                            arrival=self._seq,
                            duplicate=dup,
                            generation=self._generation,
                            thin=thin,
                        )
                    )
            if cfg.order != "in_order":  # what was held may be reordered with what came before
                self._reorder_held(cfg.order)
            self._jobs.sort()
            self._cv.notify()

    def _reorder_held(self, order: str) -> None:
        """Held (never attempted) jobs go out together, in the configured order."""
        fresh = [j for j in self._jobs if j.attempt == 0]
        if not fresh:
            return
        due = max(j.due for j in fresh)
        seqs = sorted(j.seq for j in fresh)
        if order == "reverse":
            fresh.sort(key=lambda j: -j.arrival)
        else:
            self._rng.shuffle(fresh)
        for job, seq in zip(fresh, seqs, strict=True):
            job.due, job.seq = due, seq

    def clear(self) -> None:
        with self._cv:
            self._generation += 1
            self._jobs.clear()
            self.deliveries.clear()
            self._rng = random.Random(self.config.seed)

    def pending(self) -> int:
        with self._cv:
            return len(self._jobs) + self._inflight

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._jobs or self._inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.05))
        return True

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=5)

    # delivery thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop:
                    now = time.monotonic()
                    if self._jobs and self._jobs[0].due <= now:
                        break
                    wait = self._jobs[0].due - now if self._jobs else None
                    self._cv.wait(wait)
                if self._stop:
                    return
                job = self._jobs.pop(0)
                self._inflight += 1
            try:
                self._deliver(job)
            finally:
                with self._cv:
                    self._inflight -= 1
                    self._cv.notify_all()

    def _deliver(self, job: _Job) -> None:
        cfg = self.config
        url, secret = cfg.destination(job.thin)
        if not url or not secret:
            return
        job.attempt += 1
        timestamp = int(time.time()) + cfg.timestamp_offset
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
            "Stripe-Signature": sign(job.body, secret, timestamp),
        }
        status: int | None = None
        error: str | None = None
        try:
            status = _post(url, job.body, headers, cfg.timeout_s)
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
        ok = status is not None and 200 <= status < 300
        record = {
            "event_id": job.event_id,
            "type": job.event_type,
            "attempt": job.attempt,
            "status": status,
            "error": error,
            "ok": ok,
            "duplicate": job.duplicate,
            "at": time.time(),
        }
        log.info(
            "webhook %s %s attempt %d -> %s",
            job.event_type,
            job.event_id,
            job.attempt,
            status or error,
        )
        with self._cv:
            if job.generation != self._generation:
                return
            self.deliveries.append(record)
            if not ok and job.attempt < cfg.max_attempts:
                delay = min(cfg.backoff_ms * 2 ** (job.attempt - 1), cfg.max_backoff_ms)
                job.due = time.monotonic() + delay / 1000.0
                self._seq += 1
                job.seq = self._seq
                self._jobs.append(job)
                self._jobs.sort()


def _post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> int:
    parts = urlsplit(url)
    conn_cls = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    conn = conn_cls(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()
