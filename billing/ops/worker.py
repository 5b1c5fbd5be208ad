"""The Celery worker's own metrics endpoint, hooked to its start (Celery imports this module with
the task modules, before `worker_init`): the main process serves its prefork children's counters
(`billing.ops.http.start_worker_metrics_server`) and forgets a finished child's live gauges."""

from __future__ import annotations

import os
from typing import Any

from celery import signals

from billing.celery_app import celery_app, process_settings
from billing.metrics import mark_process_dead
from billing.ops.http import start_worker_metrics_server


@signals.worker_init.connect
def _serve_worker_metrics(sender: Any = None, **_: Any) -> None:
    """The worker's main process, before the prefork pool starts: children inherit no thread."""
    if getattr(sender, "app", None) is celery_app:
        start_worker_metrics_server(process_settings())


@signals.worker_process_shutdown.connect
def _forget_child_gauges(pid: int | None = None, **_: Any) -> None:
    mark_process_dead(pid or os.getpid())
