"""Queueing a stored event's processing task: from the web process in batches, from a thread of
its own (`hand_off`), or at once for the sweep (`enqueuer`). The row in `webhook_events` is what
makes a delivery safe; these only say when the worker hears of it."""

from __future__ import annotations

from typing import Any

from billing.broker import BackgroundPublisher
from billing.runtime import Runtime
from billing.task_names import WEBHOOK_PROCESS_TASK
from billing.webhooks import service


def hand_off(runtime: Runtime) -> service.HandOff:
    """The endpoint's way to queue processing: through the runtime's background publisher."""
    publisher = background_publisher(runtime)

    def queue_soon(stripe_event_id: str, fields: dict[str, Any]) -> bool:
        return publisher.submit([stripe_event_id], fields)

    return queue_soon


def background_publisher(runtime: Runtime) -> BackgroundPublisher:
    """One per runtime, closed with it (what is pending is published first)."""
    return runtime.shared(
        "webhook_publisher",
        lambda: BackgroundPublisher(
            runtime.task_publisher,
            WEBHOOK_PROCESS_TASK,
            on_published=service.report_queued,
            on_failed=service.report_not_queued,
        ),
    )


def enqueuer(runtime: Runtime) -> service.Enqueue:
    publisher = runtime.task_publisher

    def enqueue(stripe_event_id: str) -> None:
        publisher.send(WEBHOOK_PROCESS_TASK, [stripe_event_id])

    return enqueue
