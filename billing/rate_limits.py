"""Client-side rate limits that keep meter event calls under Stripe's ceiling.

`TokenBucket` serves the threads of one process. `SharedRateLimit` is one limit for every process
that sends for the account (the fan-out's submit tasks on several workers): a moving window kept
in Redis by the `limits` library, so N processes together make at most `rate` calls in any second,
the way Stripe counts them.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

from limits import RateLimitItemPerMinute, RateLimitItemPerSecond, storage, strategies

# A throttled caller looks again at least this often: the window may free a slot any moment.
MAX_THROTTLED_SLEEP_SECONDS = 0.05


class RateLimit(Protocol):
    def acquire(self) -> None:
        """Block until one call is allowed."""


class TokenBucket:
    """A token bucket shared by the threads of one process."""

    def __init__(self, rate_per_second: float, burst: float | None = None) -> None:
        self.rate = rate_per_second
        self.capacity = burst if burst is not None else max(1.0, rate_per_second / 10)
        self._tokens = self.capacity
        self._updated = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
                self._updated = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                wait = (1 - self._tokens) / self.rate
            time.sleep(wait)


class SharedRateLimit:
    """`rate_per_second` calls in any one-second window, counted in Redis under `key` by every
    process that uses the same key (below one call a second: per minute)."""

    def __init__(self, redis_url: str, key: str, rate_per_second: float) -> None:
        self.key = key
        self.item = (
            RateLimitItemPerSecond(max(1, round(rate_per_second)))
            if rate_per_second >= 1
            else RateLimitItemPerMinute(max(1, round(rate_per_second * 60)))
        )
        self._limiter = strategies.MovingWindowRateLimiter(storage.RedisStorage(redis_url))

    def acquire(self) -> None:
        while not self._limiter.hit(self.item, self.key):
            stats = self._limiter.get_window_stats(self.item, self.key)
            time.sleep(min(max(stats.reset_time - time.time(), 0.001), MAX_THROTTLED_SLEEP_SECONDS))
