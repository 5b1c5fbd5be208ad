"""Every repeat of a meter event call, decided in one place.

Three layers can repeat a call: the flush retries one call (tenacity, per outbox row), a run
repeats the whole flush pass (tenacity in `flush_hourly`, Celery's autoretry in the task), and
stripe-python can retry inside one call. Stacked, they multiplied: 3 passes x 5 calls = 15 calls
per row for a persistent 429, up to 30 in a Celery task. Here the layers share one budget instead:

- at most `CALLS_PER_ROW_PER_RUN` calls per outbox row per run, whatever the layers;
- stripe-python's own retries are off for meter events (the gateway passes the public request
  option `max_network_retries=0`), so every call is one counted here;
- a run of N passes gives its first pass the calls the later passes do not need (5 calls over
  3 passes: 3, 1, 1), and a run never has more passes than calls;
- waits are tenacity's exponential backoff with jitter, short between the calls of one pass and
  longer between passes (`STRIPE_BILLING_RETRY_BACKOFF_SECONDS`, `…_MAX_SECONDS`).
"""

from __future__ import annotations

import random

from tenacity import wait_exponential_jitter
from tenacity.wait import wait_base

from billing.config import Settings

CALLS_PER_ROW_PER_RUN = 5
HOURLY_PASSES = 3  # `flask billing flush_hourly`: the guide's "3 attempts"


def passes_allowed(passes: int) -> int:
    """Passes a run may make: each pass costs a row at least one call."""
    return max(1, min(passes, CALLS_PER_ROW_PER_RUN))


def calls_in_pass(pass_index: int, passes: int) -> int:
    """Calls one row may get in pass `pass_index` (0-based) of a run of `passes` passes."""
    allowed = passes_allowed(passes)
    if pass_index <= 0:
        return CALLS_PER_ROW_PER_RUN - (allowed - 1)
    return 1 if pass_index < allowed else 0


def is_last_pass(pass_index: int, passes: int) -> bool:
    return pass_index + 1 >= passes_allowed(passes)


def call_wait(settings: Settings) -> wait_base:
    """Between two calls of one row inside a pass (Stripe asks for backoff with jitter)."""
    base = settings.retry_backoff_seconds
    return wait_exponential_jitter(multiplier=base / 4, max=max(base * 8, 0.001), jitter=base / 4)


def pass_wait(settings: Settings) -> wait_base:
    """Between two passes of one run."""
    base = settings.retry_backoff_seconds
    return wait_exponential_jitter(
        multiplier=base, max=settings.retry_backoff_max_seconds, jitter=base
    )


def retry_countdown(settings: Settings, retries: int) -> float:
    """The delay before Celery retry `retries`+1: exponential backoff, full jitter, capped."""
    ceiling = min(settings.retry_backoff_max_seconds, settings.retry_backoff_seconds * 2**retries)
    return random.uniform(0, ceiling)
