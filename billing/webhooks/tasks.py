"""Celery tasks of the webhook pipeline: thin adapters over `billing.webhooks.dispatch` and
`service`. Task names are a wire contract (queued messages, beat, Flower): keep them. The retry
policy is read when the task runs, from the worker runtime's settings, as for the flush task.
"""

from __future__ import annotations

from typing import Any

from celery import Task

from billing.celery_app import celery_app
from billing.runtime import get_runtime
from billing.task_names import WEBHOOK_PROCESS_TASK, WEBHOOK_SWEEP_TASK
from billing.usage.retry_policy import retry_countdown
from billing.webhooks import dispatch, service
from billing.webhooks.handlers import TRANSIENT_ERRORS
from billing.webhooks.publish import enqueuer


@celery_app.task(name=WEBHOOK_PROCESS_TASK, bind=True, acks_late=True, ignore_result=True)
def process_webhook(self: Task, stripe_event_id: str) -> str:
    """Process one stored event; transient errors retry with backoff, then it is a dead letter."""
    runtime = get_runtime()
    settings = runtime.settings
    try:
        outcome = dispatch.process(
            runtime,
            stripe_event_id,
            final_attempt=self.request.retries >= settings.task_max_retries,
        )
    except TRANSIENT_ERRORS as error:
        raise self.retry(
            exc=error,
            countdown=retry_countdown(settings, self.request.retries),
            max_retries=settings.task_max_retries,
        ) from error
    return outcome.value


@celery_app.task(name=WEBHOOK_SWEEP_TASK, bind=True, acks_late=True, ignore_result=True)
def sweep_webhooks(self: Task) -> dict[str, Any]:
    """Beat: queue again the events stored but never processed (broker down, worker died)."""
    runtime = get_runtime()
    return service.sweep_stuck(runtime, enqueuer(runtime)).to_dict()
