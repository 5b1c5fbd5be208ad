"""kombu's Redis transport with one Redis client per channel, for the web process's sender
(`billing.broker.make_sender`): kombu builds a new `redis.Redis` client for every message it
publishes on Redis (`_put` → `conn_or_acquire()` → `_create_client()`), and filling a client's
table of ~170 response callbacks was a large share of a publish's CPU. A client is thread-safe
and stateless beyond its connection pool, which the channel keeps already, so a channel reuses
one. kombu imports this module by its path (`billing.broker.PUBLISH_TRANSPORT`) when a sender
first connects.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis


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
