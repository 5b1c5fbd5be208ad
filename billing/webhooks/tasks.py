"""Celery tasks of the webhook pipeline: thin adapters over billing.webhooks.service.

Task names are a wire contract (queued messages, beat, Flower): keep them. The retry policy is
read when the task runs, from the worker runtime's settings, as for the flush task.
"""

from __future__ import annotations

from typing import Any

from celery import Task

from billing.broker import BackgroundPublisher
from billing.celery_app import WEBHOOK_PROCESS_TASK, WEBHOOK_SWEEP_TASK, celery_app
from billing.runtime import Runtime, get_runtime
from billing.usage.tasks import retry_countdown
from billing.webhooks import handlers, service

PROCESS_TASK = WEBHOOK_PROCESS_TASK
SWEEP_TASK = WEBHOOK_SWEEP_TASK


@celery_app.task(name=PROCESS_TASK, bind=True, acks_late=True, ignore_result=True)
def process_webhook(self: Task, stripe_event_id: str) -> str:
    """Process one stored event; transient errors retry with backoff, then it is a dead letter."""
    runtime = get_runtime()
    settings = runtime.settings
    try:
        outcome = service.process_event(
            runtime,
            stripe_event_id,
            handlers.HANDLERS,
            final_attempt=self.request.retries >= settings.task_max_retries,
            transient_errors=handlers.TRANSIENT_ERRORS,
        )
    except handlers.TRANSIENT_ERRORS as error:
        raise self.retry(
            exc=error,
            countdown=retry_countdown(settings, self.request.retries),
            max_retries=settings.task_max_retries,
        ) from error
    return outcome.value


@celery_app.task(name=SWEEP_TASK, bind=True, acks_late=True, ignore_result=True)
def sweep_webhooks(self: Task) -> dict[str, Any]:
    """Beat: queue again the events stored but never processed (broker down, worker died)."""
    runtime = get_runtime()
    return service.sweep_stuck(runtime, enqueuer(runtime)).to_dict()


def hand_off(runtime: Runtime) -> service.HandOff:
    """The view's way to queue processing: through the runtime's background publisher."""
    publisher = runtime.webhook_publisher

    def queue_soon(stripe_event_id: str, fields: dict[str, Any]) -> bool:
        return publisher.submit([stripe_event_id], fields)

    return queue_soon


def make_background_publisher(runtime: Runtime) -> BackgroundPublisher:
    return BackgroundPublisher(
        runtime.task_publisher,
        PROCESS_TASK,
        on_published=service.report_queued,
        on_failed=service.report_not_queued,
    )


def enqueuer(runtime: Runtime) -> service.Enqueue:
    publisher = runtime.task_publisher

    def enqueue(stripe_event_id: str) -> None:
        publisher.send(PROCESS_TASK, [stripe_event_id])

    return enqueue
