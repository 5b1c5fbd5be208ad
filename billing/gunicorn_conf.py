"""gunicorn settings for billing's web process (the Stripe webhook endpoint):

    gunicorn -c python:billing.gunicorn_conf 'billing:create_app()'

Flags on the command line override these (gunicorn's precedence), e.g. `--bind 0.0.0.0:8000`.

gevent workers: a delivery waits twice (its insert's commit, and the broker through the
background publisher), and gthread workers, handing each request and each wait between threads,
left 10-20% of the two cores idle under load. Against 4 gthread workers x 4 threads on the 2-core
VM (bench/webhooks-results.md: five comparisons of 4 to 8 interleaved rounds), 4 gevent workers
served x1.08 to x1.28 the deliveries per second at the same CPU per delivery, with 10 context
switches a delivery instead of 16-17; p99 was 12-20% higher. In full runs, each followed by a
gthread run, the gain was smaller (median x1.04 over 13 pairs, x1.02 over 8 on another machine)
and p99 higher in every pair; with the direct route (endpoint.DirectRoute), on a third machine,
x1.18 over 6 pairs, p99 higher in 4. psycopg2's sockets are not Python's, so gevent cannot
patch them: each gevent worker sets psycopg2's wait callback (psycogreen), or one insert waiting
on PostgreSQL would stop the whole worker.
"""

from __future__ import annotations

import gc
from typing import Any

worker_class = "gevent"
workers = 4


def post_fork(server: Any, worker: Any) -> None:
    """Before the worker loads the app (and opens any connection): make psycopg2 yield to
    gevent's hub while it waits, under a gevent worker only."""
    from gunicorn.workers.ggevent import GeventWorker

    if isinstance(worker, GeventWorker):
        from psycogreen.gevent import patch_psycopg

        patch_psycopg()


def post_worker_init(worker: Any) -> None:
    """Put what the loaded app holds (modules, the Flask app, settings) out of the garbage
    collector's reach. A full collection otherwise walks all of it with the worker stopped:
    measured at 70 to 310 ms, two or three times per worker in 12,000 webhook deliveries,
    which made the endpoint's p99 (1 to 2 ms once frozen). What is made later is collected as
    usual; the collection first frees the start-up garbage, which freezing would keep for
    good."""
    gc.collect()
    gc.freeze()
