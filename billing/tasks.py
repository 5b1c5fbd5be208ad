"""Celery tasks: thin adapters over billing.services. Task names are a wire contract: keep them."""

from __future__ import annotations

from typing import Any

from celery import Task

from billing import logs
from billing.celery_app import celery_app
from billing.config import Settings, load_settings
from billing.runtime import get_runtime
from billing.services import TRANSIENT_ERRORS, flush_guarded

FLUSH_HOURLY_TASK = "billing.usage.flush_hourly"

_settings = load_settings()


@celery_app.task(
    name=FLUSH_HOURLY_TASK,
    bind=True,
    acks_late=True,
    autoretry_for=TRANSIENT_ERRORS,
    retry_backoff=max(0, round(_settings.retry_backoff_seconds)),
    # Used when the backoff factor is 0 (tests): Celery's own default would wait 180 s.
    default_retry_delay=_settings.retry_backoff_seconds,
    retry_backoff_max=round(_settings.retry_backoff_max_seconds),
    retry_jitter=True,
    max_retries=_settings.task_max_retries,
)
def flush_hourly_usage(self: Task) -> dict[str, Any]:
    """The hourly flush under the overlap lock; transient failures retry with backoff."""
    with logs.bind(task_id=self.request.id, task_name=self.name):
        return flush_guarded(get_runtime()).raise_if_transient().to_dict()


def enqueue_hourly_flush(settings: Settings) -> str:
    result = flush_hourly_usage.apply_async(queue=settings.billing_queue)
    return str(result.id)
