"""gunicorn settings for billing's web process (the Stripe webhook endpoint):

    gunicorn -c python:billing.gunicorn_conf 'billing:create_app()'

Flags on the command line override these (gunicorn's precedence), e.g. `--bind 0.0.0.0:8000`.
"""

from __future__ import annotations

import gc
from typing import Any

worker_class = "gthread"
workers = 4
threads = 4


def post_worker_init(worker: Any) -> None:
    """Put what the loaded app holds (modules, the Flask app, settings) out of the garbage
    collector's reach. A full collection otherwise walks all of it with every thread of the
    worker stopped: measured at 70 to 310 ms, two or three times per worker in 12,000 webhook
    deliveries, which made the endpoint's p99 (1 to 2 ms once frozen). What is made later is
    collected as usual; the collection first frees the start-up garbage, which freezing would
    keep for good."""
    gc.collect()
    gc.freeze()
