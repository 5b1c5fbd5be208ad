"""Publishing tasks from the web process: kombu's Redis transport keeping one Redis client per
channel, and a task publisher that keeps a pool of producers.

kombu's Redis channel builds a new `redis.Redis` client for every message it publishes (`_put` →
`conn_or_acquire()` → `_create_client()`); building one fills its table of ~170 response
callbacks, about half of Celery's CPU cost of a publish. A `redis.Redis` client is thread-safe
and stateless beyond its connection pool (which the channel already keeps), so the web process's
sender reuses one per channel. Messages, queues and routing are kombu's own: only the client
object is kept. The worker and beat use kombu's transport unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from kombu.transport import redis as kombu_redis
from kombu.utils.uuid import uuid

if TYPE_CHECKING:
    from celery import Celery
    from kombu import Producer

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


class TaskPublisher:
    """Sends tasks to one queue as `Celery.send_task(name, args, queue=...)` would, at half its
    CPU (measured: 262 → about 130 µs a publish, the largest cost of a webhook delivery).

    The message is Celery's own (`amqp.as_task_v2`, protocol 2) and kombu publishes it, retrying
    per `task_publish_retry_policy`. What is left out is per-call work that a fixed task and
    queue do not need: send_task's routing and signals, Celery's producer pool (a kombu resource
    pool: about 55 µs a checkout; here a list under a lock keeps the idle producers, each with
    its connection), and checking the queue's declaration on every publish: the queue (durable,
    as Celery declares it) is declared once per producer, when it is built. A producer whose
    publish failed is dropped with its connection.
    """

    def __init__(self, app: Celery, queue_name: str) -> None:
        self.app = app
        self.queue = app.amqp.queues[queue_name]  # created as send_task(queue=…) would
        self.retry_policy = dict(app.conf.task_publish_retry_policy or {})
        self.delivery_mode = app.conf.task_default_delivery_mode
        self.serializer = app.conf.task_serializer
        self._idle: list[Producer] = []
        self._lock = threading.Lock()

    def send(self, task_name: str, args: list[Any]) -> str:
        task_id = uuid()
        message = self.app.amqp.as_task_v2(
            task_id, task_name, args=args, argsrepr=repr(args), kwargsrepr="{}"
        )
        producer = self._acquire()
        try:
            producer.publish(
                message.body,
                exchange="",  # the default exchange routes by queue name, as send_task does
                routing_key=self.queue.name,
                headers=message.headers,
                serializer=self.serializer,
                delivery_mode=self.delivery_mode,
                retry=True,
                retry_policy=self.retry_policy,
                **message.properties,
            )
        except BaseException:
            producer.connection.release()
            raise
        with self._lock:
            self._idle.append(producer)
        return task_id

    def _acquire(self) -> Producer:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        connection = self.app.connection_for_write()
        try:
            producer = self.app.amqp.Producer(connection, auto_declare=False)
            producer.maybe_declare(self.queue, retry=True, **self.retry_policy)
        except BaseException:  # broker down: nothing kept, the next call tries afresh
            connection.release()
            raise
        return producer

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for producer in idle:
            producer.connection.release()
