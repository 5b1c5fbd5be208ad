"""Where Prometheus scrapes: `GET /metrics` on the web app (counters and the state gauges), and a
small HTTP server in the Celery worker's main process (`BILLING_WORKER_METRICS_PORT`), which sums
its prefork children's counters from `PROMETHEUS_MULTIPROC_DIR`.

The worker's endpoint leaves the state gauges to the web app on purpose: a database or Redis call
in the main process's server thread can hold a lock (SQLAlchemy's pool, `cached_property`'s) at
the moment the pool forks a child, and that child then hangs on its first task.
"""

from __future__ import annotations

import threading
from typing import Any

from flask import Blueprint, Response
from prometheus_client import start_http_server

from billing import metrics
from billing.config import Settings
from billing.logs import get_logger

log = get_logger("billing.metrics")


def metrics_blueprint(path: str) -> Blueprint:
    blueprint = Blueprint("billing_metrics", __name__)

    @blueprint.get(path)
    def scrape() -> Response:
        from billing.runtime import current_runtime

        body = metrics.exposition(current_runtime)
        return Response(body, mimetype=metrics.CONTENT_TYPE)

    return blueprint


_server_lock = threading.Lock()
_server: Any = None


def start_worker_metrics_server(settings: Settings) -> Any:
    """Serve the worker's metrics once per process; a no-op when no port is configured."""
    global _server
    if not settings.worker_metrics_port:
        return None
    with _server_lock:
        if _server is None:
            registry = metrics.registry_for_scrape(_no_runtime, with_state=False)
            _server = start_http_server(
                settings.worker_metrics_port, settings.worker_metrics_address, registry=registry
            )
            log.info(
                "billing worker metrics served",
                extra={
                    "address": settings.worker_metrics_address,
                    "port": settings.worker_metrics_port,
                },
            )
    return _server


def _no_runtime() -> Any:
    raise RuntimeError("the worker's metrics endpoint reads no database")
