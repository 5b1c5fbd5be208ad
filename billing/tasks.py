"""Celery tasks: thin adapters over billing.services. Task names are a wire contract: keep them.

The retry policy is read when a task runs, from the settings of the worker's runtime (the
environment at worker start, or what a test or host app installed): nothing is fixed at import.
"""

from __future__ import annotations

import random
from typing import Any

from celery import Task
from kombu.exceptions import OperationalError

from billing.celery_app import FLUSH_HOURLY_TASK, celery_app
from billing.config import Settings, scrub
from billing.runtime import get_runtime
from billing.services import TRANSIENT_ERRORS, flush_guarded

__all__ = ["FLUSH_HOURLY_TASK", "BrokerUnavailableError", "enqueue_hourly_flush"]


class BrokerUnavailableError(RuntimeError):
    """The Celery broker refused or dropped the connection: nothing was queued."""


def retry_countdown(settings: Settings, retries: int) -> float:
    """Exponential backoff with full jitter, capped: the delay before Celery retry `retries`+1."""
    ceiling = min(settings.retry_backoff_max_seconds, settings.retry_backoff_seconds * 2**retries)
    return random.uniform(0, ceiling)


@celery_app.task(name=FLUSH_HOURLY_TASK, bind=True, acks_late=True)
def flush_hourly_usage(self: Task) -> dict[str, Any]:
    """The hourly flush under the overlap lock; transient failures retry with backoff."""
    runtime = get_runtime()
    settings = runtime.settings
    try:
        return flush_guarded(runtime).raise_if_transient().to_dict()
    except TRANSIENT_ERRORS as error:
        raise self.retry(
            exc=error,
            countdown=retry_countdown(settings, self.request.retries),
            max_retries=settings.task_max_retries,
        ) from error


def enqueue_hourly_flush(settings: Settings) -> str:
    """Queue the hourly flush on these settings' broker and queue; returns the task id."""
    try:
        with celery_app.connection_for_write(settings.celery_broker_url) as connection:
            result = flush_hourly_usage.apply_async(
                queue=settings.billing_queue, connection=connection
            )
    except (OperationalError, OSError) as error:
        raise BrokerUnavailableError(
            f"Celery broker unreachable at {scrub(settings.celery_broker_url)}: {error}; "
            "nothing was queued"
        ) from error
    return str(result.id)
