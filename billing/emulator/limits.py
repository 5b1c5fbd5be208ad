"""Injected faults and rate ceilings; both act before the idempotency layer, as Stripe's do."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from billing.emulator.errors import invalid

# Stripe's limits. Only test keys are accepted here, so "test" is the default preset: one shared
# 25 requests/s bucket for every /v1 call, meter events included. "live" is offered to rehearse
# production: 100/s shared, plus a separate 1,000/s bucket for meter events.
PRESETS: dict[str, dict[str, Any]] = {
    "test": {"global": 25.0, "paths": {}},
    "live": {"global": 100.0, "paths": {"/v1/billing/meter_events": 1000.0}},
    "off": {"global": None, "paths": {}},
}
FAULT_STATUSES = (400, 402, 404, 409, 429, 500, 502, 503, 504)


@dataclass
class Fault:
    path: str
    method: str | None = None
    status: int | None = None
    code: str | None = None  # for 429: "rate_limit" (default) or "lock_timeout"
    should_retry: bool | None = None  # force a Stripe-Should-Retry header
    latency_ms: float = 0.0
    drop: bool = False
    count: int | None = None  # next N matching calls; None = unlimited
    probability: float = 1.0
    seed: int = 0
    hits: int = 0
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def matches(self, method: str, path: str) -> bool:
        if self.method and self.method != method:
            return False
        return self.path in ("*", path) or path.startswith(self.path)

    def fire(self) -> bool:
        if self.count is not None and self.count <= 0:
            return False
        if self.probability < 1.0 and self.rng.random() >= self.probability:
            return False
        if self.count is not None:
            self.count -= 1
        self.hits += 1
        return True

    def describe(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "method": self.method,
            "status": self.status,
            "code": self.code,
            "should_retry": self.should_retry,
            "latency_ms": self.latency_ms,
            "drop": self.drop,
            "remaining": self.count,
            "probability": self.probability,
            "seed": self.seed,
            "hits": self.hits,
        }


FAULT_FIELDS = frozenset(
    {
        "path",
        "method",
        "status",
        "code",
        "should_retry",
        "latency_ms",
        "drop",
        "count",
        "probability",
        "seed",
    }
)


def parse_fault(spec: dict[str, Any]) -> Fault:
    unknown = set(spec) - FAULT_FIELDS
    if unknown:
        raise invalid(f"Unknown fault field(s): {', '.join(sorted(unknown))}")
    if not isinstance(spec.get("path"), str) or not spec["path"]:
        raise invalid("A fault needs a `path` (exact path, prefix, or `*`).", param="path")
    status = spec.get("status")
    if status is not None and status not in FAULT_STATUSES:
        raise invalid(f"status must be one of {FAULT_STATUSES}", param="status")
    if status is None and not spec.get("drop") and not spec.get("latency_ms"):
        raise invalid("A fault needs `status`, `latency_ms` or `drop`.")
    probability = float(spec.get("probability", 1.0))
    if not 0.0 <= probability <= 1.0:
        raise invalid("probability must be within [0, 1]", param="probability")
    seed = int(spec.get("seed", 0))
    return Fault(
        path=spec["path"],
        method=spec["method"].upper() if spec.get("method") else None,
        status=status,
        code=spec.get("code"),
        should_retry=spec.get("should_retry"),
        latency_ms=float(spec.get("latency_ms") or 0.0),
        drop=bool(spec.get("drop")),
        count=None if spec.get("count") is None else int(spec["count"]),
        probability=probability,
        seed=seed,
        rng=random.Random(seed),
    )


@dataclass
class Decision:
    status: Fault | None = None
    drop: bool = False
    latency_ms: float = 0.0


class Faults:
    def __init__(self) -> None:
        self.rules: list[Fault] = []

    def decide(self, method: str, path: str) -> Decision | None:
        if not self.rules:
            return None
        decision = Decision()
        fired = False
        for rule in self.rules:
            if rule.matches(method, path) and rule.fire():
                fired = True
                decision.latency_ms += rule.latency_ms
                if rule.drop:
                    decision.drop = True
                if rule.status is not None and decision.status is None:
                    decision.status = rule
        return decision if fired else None


class Bucket:
    """Token bucket: `rate` per second, bursting to one second's worth."""

    __slots__ = ("rate", "stamp", "tokens")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class RateLimiter:
    def __init__(self, preset: str = "test") -> None:
        self._lock = threading.Lock()
        self.configure({"preset": preset})

    def configure(self, spec: dict[str, Any]) -> None:
        unknown = set(spec) - {"preset", "global", "paths"}
        if unknown:
            raise invalid(f"Unknown limits field(s): {', '.join(sorted(unknown))}")
        if "preset" in spec:
            if spec["preset"] not in PRESETS:
                raise invalid(f"preset must be one of {sorted(PRESETS)}", param="preset")
            base = PRESETS[spec["preset"]]
            self.global_rps: float | None = base["global"]
            self.paths: dict[str, float] = dict(base["paths"])
        if "global" in spec:
            self.global_rps = _rate(spec["global"])
        for path, rate in (spec.get("paths") or {}).items():
            value = _rate(rate)
            if value is None:
                self.paths.pop(path, None)
            else:
                self.paths[path] = value
        with self._lock:
            self._global = Bucket(self.global_rps) if self.global_rps else None
            self._buckets = {p: Bucket(r) for p, r in self.paths.items()}
            # Longest prefix first, so a specific path beats a general one.
            self._order = sorted(self._buckets, key=len, reverse=True)

    def allow(self, path: str) -> bool:
        with self._lock:
            for prefix in self._order:
                if path == prefix or path.startswith(prefix):
                    return self._buckets[prefix].take()
            return self._global.take() if self._global is not None else True

    def describe(self) -> dict[str, Any]:
        return {"global": self.global_rps, "paths": dict(self.paths)}


def _rate(value: Any) -> float | None:
    if value is None or value == 0 or value == "off":
        return None
    rate = float(value)
    if rate < 0:
        raise invalid("A rate must be positive (or null/0 for no ceiling).")
    return rate
