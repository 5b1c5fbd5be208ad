"""gunicorn settings for billing's web process (the Stripe webhook endpoint):

    gunicorn -c python:billing.gunicorn_conf 'billing:create_app()'

Flags on the command line override these (gunicorn's precedence), e.g. `--bind 0.0.0.0:8000`.

4 gthread workers x 4 threads: side by side, gevent workers served slightly more deliveries per
second but with the higher p99, because a gevent worker accepts keep-alive connections greedily,
so one can end up serving most of them, and a stall there holds all their requests (figures in
docs/performance.md).

`--worker-class gevent` still works: psycopg2's sockets are not Python's, so gevent cannot patch
them, and each gevent worker sets psycopg2's wait callback (psycogreen), or one insert waiting on
PostgreSQL would stop the whole worker.

The master, before it binds or forks, refuses a bad setting with the CLI's line (a worker would
boot, answer /metrics, and fail every webhook with a 500), and makes the workers count into one
prometheus-client multiprocess directory, so that each scrape sums them all instead of returning
whichever worker answered.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile
from typing import Any

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"

worker_class = "gthread"
workers = 4
threads = 4


# The metrics directory this master made (and removes at exit); None when the operator's is used.
_created_metrics_dir: str | None = None


def on_starting(server: Any) -> None:
    """In the master, before it listens: the settings parse, and the workers share a metrics
    directory. Only billing.config is imported here: prometheus-client picks its mode when first
    imported, which must happen in a worker, after the directory is set."""
    from billing.config import ConfigError, config_error_line, load_settings

    try:
        load_settings()
    except ConfigError as error:
        _refuse(config_error_line(error))
    _share_metrics_directory()


def _share_metrics_directory() -> None:
    global _created_metrics_dir
    if os.environ.get(MULTIPROC_DIR):  # the operator's (systemd's RuntimeDirectory=), checked
        return
    if "prometheus_client" in sys.modules:  # --preload built the app in this process already
        _refuse(
            f"--preload needs {MULTIPROC_DIR} set (an empty directory), or each worker "
            "counts alone and a scrape sees one of them"
        )
    _created_metrics_dir = tempfile.mkdtemp(prefix="billing-web-metrics-")
    os.environ[MULTIPROC_DIR] = _created_metrics_dir


def _refuse(message: str) -> None:
    print(f"Error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def child_exit(server: Any, worker: Any) -> None:
    """An exited worker's live gauges leave the sum; its counters stay counted."""
    from billing.metrics import mark_process_dead

    mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    if _created_metrics_dir is not None:
        shutil.rmtree(_created_metrics_dir, ignore_errors=True)


def post_fork(server: Any, worker: Any) -> None:
    """Before the worker loads the app (and opens any connection): make psycopg2 yield to
    gevent's hub while it waits, under a gevent worker only."""
    ggevent = sys.modules.get("gunicorn.workers.ggevent")  # loaded when gevent workers run
    if ggevent is not None and isinstance(worker, ggevent.GeventWorker):
        from psycogreen.gevent import patch_psycopg

        patch_psycopg()


def post_worker_init(worker: Any) -> None:
    """Put what the loaded app holds (modules, the Flask app, settings) out of the garbage
    collector's reach. A full collection otherwise walks all of it with the worker stopped,
    long enough to make the endpoint's p99 (figures in docs/performance.md). What is made later
    is collected as usual; the collection first frees the start-up garbage, which freezing would
    keep for good. Celery and kombu are not imported by the app (the CLI does not need them):
    imported here, they are frozen too, rather than on the first delivery, outside the freeze."""
    from billing.broker import import_sender_modules

    import_sender_modules()
    gc.collect()
    gc.freeze()
