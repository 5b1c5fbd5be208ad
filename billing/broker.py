"""Publishing tasks from the web process: a Celery app that only sends (`make_sender`) on kombu's
Redis transport keeping one Redis client per channel (`billing.publish_transport`), a task
publisher that keeps a pool of producers, and a background publisher that sends tasks in
batches for callers that must not wait for the broker. The worker and beat use kombu's transport
unchanged; tests/test_broker.py fails when kombu changes what the override relies on.

Celery is imported where a sender is built and kombu's Redis transport when it first connects:
every `flask billing` command imports this module through `billing.runtime`, and most of them
never publish (the two imports were ~110-170 ms of each command's start).
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from billing.config import Settings

if TYPE_CHECKING:
    from celery import Celery
    from kombu import Producer

# Passed to Celery as `broker_transport` (kombu imports a transport named by its path).
PUBLISH_TRANSPORT = "billing.publish_transport:PublishTransport"
REDIS_SCHEMES = ("redis://", "rediss://")


def publish_transport(broker_url: str) -> str | None:
    """The transport for a sender publishing to `broker_url`; None = the URL's own (AMQP's
    publish reuses its channel already)."""
    return PUBLISH_TRANSPORT if broker_url.startswith(REDIS_SCHEMES) else None


class TaskPublisher:
    """Sends tasks to one queue as `Celery.send_task(name, args, queue=...)` would, at a fraction
    of its CPU, less still a task in batches (`send_many`; figures in docs/performance.md).

    The message is Celery's own (`amqp.as_task_v2`, protocol 2) and kombu publishes it. What is
    left out is per-call work that a fixed queue does not need: send_task's routing and signals,
    Celery's producer pool (a kombu resource pool, costly per checkout; here a list under a
    lock keeps the idle producers, each with its connection), and checking the queue's
    declaration on every publish: the queue (durable, as Celery declares it) is declared once
    per producer, when it is built. A producer whose publish failed is dropped with its
    connection.
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
        """Publish one task, retrying per `task_publish_retry_policy`."""
        message = self._message(task_name, args)
        producer = self._acquire()
        try:
            self._publish(producer, message, retry=True, retry_policy=self.retry_policy)
        except BaseException:
            producer.connection.release()
            raise
        self._release(producer)
        return str(message.headers["id"])

    def send_many(self, task_name: str, many_args: list[list[Any]]) -> list[str]:
        """Publish a task for each entry of `many_args` in one round trip to a Redis broker
        (kombu's `Producer.batch()`, a pipeline; other brokers take them one by one).

        A batch that fails is published once more, on a new connection (a broker restart
        leaves every idle one dead), as the retry policy lets one publish retry once. A message
        both attempts delivered is a duplicate task, which the consumer must tolerate.
        """
        messages = [self._message(task_name, args) for args in many_args]
        for attempt in (1, 2):
            producer = self._acquire(fresh=attempt == 2)
            try:
                with producer.batch(max_size=len(messages)):
                    for message in messages:
                        self._publish(producer, message)
            except BaseException as error:
                producer.connection.release()
                if attempt == 2 or not isinstance(error, Exception):
                    raise
            else:
                self._release(producer)
                break
        return [str(message.headers["id"]) for message in messages]

    def _message(self, task_name: str, args: list[Any]) -> Any:
        # ignore_result in the message: Celery lets the request's flag override the task's, and
        # the published tasks' results are read by nobody (their retries stored states anyway).
        return self.app.amqp.as_task_v2(
            str(uuid.uuid4()),  # a task id as Celery makes one
            task_name,
            args=args,
            argsrepr=repr(args),
            kwargsrepr="{}",
            ignore_result=True,
        )

    def _publish(self, producer: Producer, message: Any, **retry: Any) -> None:
        producer.publish(
            message.body,
            exchange="",  # the default exchange routes by queue name, as send_task does
            routing_key=self.queue.name,
            headers=message.headers,
            serializer=self.serializer,
            delivery_mode=self.delivery_mode,
            **retry,
            **message.properties,
        )

    def _acquire(self, fresh: bool = False) -> Producer:
        with self._lock:
            if self._idle and not fresh:
                return self._idle.pop()
        connection = self.app.connection_for_write()
        try:
            producer = self.app.amqp.Producer(connection, auto_declare=False)
            producer.maybe_declare(self.queue, retry=True, **self.retry_policy)
        except BaseException:  # broker down: nothing kept, the next call tries afresh
            connection.release()
            raise
        return producer

    def _release(self, producer: Producer) -> None:
        with self._lock:
            self._idle.append(producer)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for producer in idle:
            producer.connection.release()


_STOP = object()
log = logging.getLogger("billing.broker")


class BackgroundPublisher:
    """Publishes one task per `submit` from a thread of its own, in batches: for a caller that
    has made its work durable already and must not wait for the broker (the webhook view).

    The thread waits `linger` seconds after the first task of a batch so that the tasks
    submitted meanwhile share its round trip (`TaskPublisher.send_many`): publishing was the
    largest cost of a webhook delivery, and concurrent requests rarely publish at the same
    instant. The default 50 ms beat a shorter wait side by side, and longer ones were no better
    (figures in docs/performance.md). A task's processing starts that much later, which nothing
    waits for. Each batch ends in `on_published(contexts)` or `on_failed(contexts, error)`; the
    caller's `context` travels with its task. At most `max_pending` tasks wait: past that, `submit`
    refuses (returns False) instead of growing without bound while the broker is away.

    The thread starts on the first `submit` in a process (a forked child starts its own; what
    its parent had pending is the parent's). `close` publishes what is pending and stops it; so
    does the interpreter's exit (a gunicorn worker's graceful stop). A process killed outright
    loses the tasks of its last `linger`: the caller must be able to recover them (the
    webhook sweep queues again what stayed `received`).
    """

    def __init__(
        self,
        publisher: TaskPublisher,
        task_name: str,
        on_published: Callable[[list[Any]], None],
        on_failed: Callable[[list[Any], BaseException], None],
        *,
        linger: float = 0.05,
        max_batch: int = 500,
        max_pending: int = 10_000,
    ) -> None:
        self.publisher = publisher
        self.task_name = task_name
        self.on_published = on_published
        self.on_failed = on_failed
        self.linger = linger
        self.max_batch = max_batch
        self.max_pending = max_pending
        self._closed = False
        self._forget()

    def _forget(self) -> None:
        """A new process (a fork) starts empty: the parent's thread and tasks are not its own."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._pending: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, args: list[Any], context: Any = None) -> bool:
        """Queue a task for the next batch; False if refused (closed, or too many pending)."""
        if self._pid != os.getpid():
            self._forget()
        with self._lock:  # not after `close` has queued its stop: nothing would publish it
            if self._closed or self._pending.qsize() >= self.max_pending:
                return False
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="billing-task-publisher", daemon=True
                )
                self._thread.start()
                atexit.register(self.close)
            self._pending.put((args, context))
        return True

    def _run(self) -> None:
        while True:
            batch, marker = self._next_batch()
            if batch:
                self._publish(batch)
            if marker is _STOP:
                return
            if marker is not None:
                marker.set()  # a `flush` waiting for what was submitted before it

    def _next_batch(self) -> tuple[list[tuple[list[Any], Any]], Any]:
        """The tasks waiting (after `linger`, at most `max_batch`) and the marker that ended
        them early (`_STOP` or a flush's event), if any."""
        item = self._pending.get()
        if not isinstance(item, tuple):
            return [], item
        time.sleep(self.linger)
        batch = [item]
        while len(batch) < self.max_batch and not self._pending.empty():
            item = self._pending.get()
            if not isinstance(item, tuple):
                return batch, item
            batch.append(item)
        return batch, None

    def _publish(self, batch: list[tuple[list[Any], Any]]) -> None:
        contexts = [context for _, context in batch]
        error: Exception | None = None
        try:
            self.publisher.send_many(self.task_name, [args for args, _ in batch])
        except Exception as failed:
            error = failed
        try:
            if error is None:
                self.on_published(contexts)
            else:
                self.on_failed(contexts, error)
        except Exception:  # a failing report must not stop the thread (nothing would publish)
            log.exception("task publisher: reporting a batch failed")

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until what was submitted so far is published (or refused) and reported."""
        if self._thread is None or self._closed or self._pid != os.getpid():
            return True  # nothing submitted here, or `close` published it all
        done = threading.Event()
        self._pending.put(done)
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Publish what is pending, then stop the thread (at most `timeout` seconds)."""
        atexit.unregister(self.close)
        with self._lock:
            self._closed = True
            thread = self._thread if self._pid == os.getpid() else None
            if thread is not None:
                self._pending.put(_STOP)
        if thread is not None:
            thread.join(timeout)


def import_sender_modules() -> None:
    """Import what a sender publishes with, for a process that publishes from its first request
    on (the web worker, before it freezes what it loaded: `billing.gunicorn_conf`)."""
    import celery.app.amqp  # noqa: F401
    import kombu.messaging  # noqa: F401

    import billing.publish_transport  # noqa: F401


def make_sender(settings: Settings) -> Celery:
    """A Celery app that only sends, built from `settings` (its broker URL, its queue).

    The web process enqueues with it; publishing retries once, briefly, so a broker outage costs
    a request a fraction of a second, never a lost event (the row is already stored).
    """
    from celery import Celery

    sender = Celery("billing-webhook-sender", set_as_current=False)
    sender.conf.update(
        # Celery lets a CELERY_BROKER_URL in the environment override `broker_url`; the write
        # URL it does not, so the sender publishes where `settings` says.
        broker_url=settings.celery_broker_url,
        broker_write_url=settings.celery_broker_url,
        broker_transport=publish_transport(settings.celery_broker_url),
        broker_connection_timeout=2,
        broker_connection_retry=False,
        broker_transport_options={"socket_connect_timeout": 2, "socket_timeout": 5},
        task_serializer="json",
        accept_content=["json"],
        task_publish_retry_policy={
            "max_retries": 1,
            "interval_start": 0.05,
            "interval_step": 0.1,
            "interval_max": 0.1,
        },
    )
    return sender
