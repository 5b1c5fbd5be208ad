"""kombu's Redis transport, for publishing only, keeping one Redis client per channel.

kombu's Redis channel builds a new `redis.Redis` client for every message it publishes (`_put` →
`conn_or_acquire()` → `_create_client()`); building one fills its table of ~170 response
callbacks, about half of Celery's CPU cost of a publish. A `redis.Redis` client is thread-safe
and stateless beyond its connection pool (which the channel already keeps), so the web process's
sender reuses one per channel. Messages, queues and routing are kombu's own: only the client
object is kept. The worker and beat use kombu's transport unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis

# Passed to Celery as `broker_transport` (kombu imports a transport named by its path).
PUBLISH_TRANSPORT = "billing.broker:PublishTransport"
REDIS_SCHEMES = ("redis://", "rediss://")


class PublishChannel(kombu_redis.Channel):
    _publish_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client is None:
            # The channel drops its pool on close and after a fork: a client follows its pool.
            cached = self._publish_client
            if cached is None or cached.connection_pool is not self.pool:
                cached = self._publish_client = self._create_client()
            client = cached
        yield client


class PublishTransport(kombu_redis.Transport):
    Channel = PublishChannel


def publish_transport(broker_url: str) -> str | None:
    """The transport for a sender publishing to `broker_url`; None = the URL's own (AMQP's
    publish reuses its channel already)."""
    return PUBLISH_TRANSPORT if broker_url.startswith(REDIS_SCHEMES) else None
