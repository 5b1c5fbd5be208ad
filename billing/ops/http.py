"""Where Prometheus scrapes: `GET /metrics` on the web app (counters and the state gauges), and a
small HTTP server in the Celery worker's main process (`BILLING_WORKER_METRICS_PORT`), which sums
its prefork children's counters from `PROMETHEUS_MULTIPROC_DIR`.

The worker's endpoint leaves the state gauges to the web app on purpose: a database or Redis call
in the main process's server thread can hold a lock (SQLAlchemy's pool, `cached_property`'s) at
the moment the pool forks a child, and that child then hangs on its first task.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from flask import Blueprint, Response
from prometheus_client import start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from billing import metrics
from billing.config import Settings
from billing.errors import error_line
from billing.logs import get_logger
from billing.ops.state import read_state
from billing.runtime import Runtime, current_runtime

log = get_logger("billing.metrics")


def metrics_blueprint(path: str) -> Blueprint:
    blueprint = Blueprint("billing_metrics", __name__)

    @blueprint.get(path)
    def scrape() -> Response:
        body = metrics.exposition(StateCollector(current_runtime))
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
            registry = metrics.registry_for_scrape()
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


class StateCollector(Collector):
    """Gauges computed from the database and Redis on each scrape (`billing.ops.state`)."""

    def __init__(self, runtime: Callable[[], Runtime]) -> None:
        self._runtime = runtime

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            state = read_state(self._runtime())
        except Exception as error:  # a scrape must answer even when a backend is down
            log.warning("billing state scrape failed", extra={"error": error_line(error)})
            yield metrics.STATE_UP.family(0)
            return
        if state.lock_error:  # the database's gauges still come: the lock alerts read them
            log.warning("billing state scrape failed", extra={"error": state.lock_error})
        yield metrics.STATE_UP.family(0 if state.lock_error else 1)
        yield from state.gauges()
