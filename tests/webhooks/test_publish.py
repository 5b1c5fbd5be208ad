"""The web process's task sender: Celery's messages on STRIPE_BILLING_QUEUE through one reused
Redis client per channel, and a broker that goes away and comes back."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from billing import broker, logs, publish_transport
from billing.broker import make_sender
from billing.task_names import WEBHOOK_PROCESS_TASK as PROCESS_TASK
from billing.webhooks.publish import background_publisher, enqueuer
from tests.fixtures.webhooks import (
    AppServer,
    make_event,
    post,
    queued_event_ids,
    queued_messages,
    rows,
)

ROOT = Path(__file__).resolve().parents[2]


def test_sender_publishes_celery_messages_to_the_billing_queue_through_one_client(
    make_runtime, webhook_settings, broker_client
):
    runtime = make_runtime(webhook_settings)
    enqueue = enqueuer(runtime)
    for event_id in ("evt_sender_1", "evt_sender_2", "evt_sender_3"):
        enqueue(event_id)

    messages = queued_messages(broker_client, webhook_settings.billing_queue)
    assert [m["headers"]["task"] for m in messages] == [PROCESS_TASK] * 3
    assert [(m["headers"]["argsrepr"], m["headers"]["kwargsrepr"]) for m in messages] == [
        ("['evt_sender_1']", "{}"),
        ("['evt_sender_2']", "{}"),
        ("['evt_sender_3']", "{}"),
    ]
    assert [json.loads(base64.b64decode(m["body"]))[0] for m in messages] == [
        ["evt_sender_1"],
        ["evt_sender_2"],
        ["evt_sender_3"],
    ]
    assert {m["properties"]["delivery_info"]["routing_key"] for m in messages} == {
        webhook_settings.billing_queue
    }
    # One producer (one connection, one channel, one Redis client) served every publish.
    (producer,) = runtime.task_publisher._idle
    assert isinstance(producer.channel, publish_transport.PublishChannel)
    client = producer.channel._publish_client
    enqueue("evt_sender_4")
    assert runtime.task_publisher._idle == [producer]
    assert producer.channel._publish_client is client
    assert broker_client.llen(webhook_settings.billing_queue) == 4


def test_a_thread_per_request_server_does_not_open_a_connection_per_request(
    make_runtime, webhook_settings, broker_client, monkeypatch
):
    """werkzeug's threaded server (`flask run`) starts a thread for every request: producers
    are pooled, not kept per thread, or every request would leave a broker connection open."""
    runtime = make_runtime(webhook_settings)
    sender = runtime.task_sender
    opened = []
    connect = sender.connection_for_write
    monkeypatch.setattr(sender, "connection_for_write", lambda: opened.append(1) or connect())
    enqueue = enqueuer(runtime)
    for n in range(20):
        thread = threading.Thread(target=enqueue, args=(f"evt_thread_{n}",))
        thread.start()
        thread.join()
    assert len(opened) == 1
    at_once = threading.Barrier(4)
    threads = [
        threading.Thread(target=lambda n=n: (at_once.wait(), enqueue(f"evt_together_{n}")))
        for n in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(opened) <= 4
    assert broker_client.llen(webhook_settings.billing_queue) == 24


def test_background_publisher_batches_what_arrives_together_and_reports_each_task(
    make_runtime, webhook_settings, broker_client, monkeypatch
):
    runtime = make_runtime(webhook_settings)
    publisher = runtime.task_publisher
    round_trips: list[int] = []
    send_many = publisher.send_many
    monkeypatch.setattr(
        publisher,
        "send_many",
        lambda name, many: round_trips.append(len(many)) or send_many(name, many),
    )
    published: list[str] = []
    background = broker.BackgroundPublisher(
        publisher,
        PROCESS_TASK,
        on_published=published.extend,
        on_failed=lambda contexts, error: pytest.fail(f"{contexts}: {error!r}"),
        linger=0.05,
    )
    submitters = [
        threading.Thread(target=lambda n=n: background.submit([f"evt_bg_{n}"], f"evt_bg_{n}"))
        for n in range(40)
    ]
    for thread in submitters:
        thread.start()
    for thread in submitters:
        thread.join()
    assert background.flush()
    background.close()
    # Each task published once, reported once; far fewer round trips than tasks.
    queued = queued_event_ids(broker_client, webhook_settings.billing_queue)
    assert sorted(queued) == sorted(published) == sorted(f"evt_bg_{n}" for n in range(40))
    assert sum(round_trips) == 40 and len(round_trips) <= 4
    assert background.submit(["evt_bg_late"], "late") is False  # closed


def test_background_publisher_close_publishes_what_is_pending(
    make_runtime, webhook_settings, broker_client
):
    runtime = make_runtime(webhook_settings)
    background = broker.BackgroundPublisher(
        runtime.task_publisher,
        PROCESS_TASK,
        on_published=lambda _: None,
        on_failed=lambda contexts, error: pytest.fail(repr(error)),
        linger=0.5,
    )
    assert all(background.submit([f"evt_pending_{n}"]) for n in range(3))
    background.close()
    assert broker_client.llen(webhook_settings.billing_queue) == 3


def test_a_report_that_raises_does_not_stop_the_background_publisher(
    make_runtime, webhook_settings, broker_client
):
    runtime = make_runtime(webhook_settings)
    reported: list[str] = []

    def report(contexts: list[str]) -> None:
        reported.extend(contexts)
        if len(reported) == 1:
            raise RuntimeError("a log handler failed")

    background = broker.BackgroundPublisher(
        runtime.task_publisher,
        PROCESS_TASK,
        on_published=report,
        on_failed=lambda contexts, error: pytest.fail(repr(error)),
        linger=0,
    )
    assert background.submit(["evt_report_1"], "evt_report_1") and background.flush()
    assert background.submit(["evt_report_2"], "evt_report_2") and background.flush()
    background.close()
    assert reported == ["evt_report_1", "evt_report_2"]
    assert queued_event_ids(broker_client, webhook_settings.billing_queue) == [
        "evt_report_1",
        "evt_report_2",
    ]


def test_a_process_that_exits_publishes_what_it_had_pending(webhook_settings, broker_client):
    """A gunicorn worker's graceful stop ends the interpreter: the publisher's exit hook sends
    what was still waiting for its batch."""
    script = f"""
from billing.config import Settings
from billing.runtime import Runtime
from billing.webhooks.publish import background_publisher
runtime = Runtime(Settings.from_env({{
    "DATABASE_URL": {webhook_settings.database_url!r},
    "CELERY_BROKER_URL": {webhook_settings.celery_broker_url!r},
    "STRIPE_BILLING_QUEUE": {webhook_settings.billing_queue!r},
}}))
background_publisher(runtime).linger = 0.5
for n in range(5):
    assert background_publisher(runtime).submit([f"evt_exit_{{n}}"], {{"event_id": "evt_exit"}})
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    queued = queued_event_ids(broker_client, webhook_settings.billing_queue)
    assert queued == [f"evt_exit_{n}" for n in range(5)]


def test_only_a_redis_broker_gets_the_publish_transport(webhook_settings):
    assert broker.publish_transport("redis://127.0.0.1:6379/0") == broker.PUBLISH_TRANSPORT
    assert broker.publish_transport("amqp://guest:guest@127.0.0.1:5672//") is None
    amqp = make_sender(
        webhook_settings.replace(celery_broker_url="amqp://guest:guest@127.0.0.1:5672//")
    )
    assert amqp.connection_for_write().transport_cls == "amqp"


class Relay:
    """A TCP relay to Redis that can drop every connection and refuse new ones, then resume."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.up = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                sock.close()

    def drop(self) -> None:
        self.up = False
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.sockets.clear()

    def close(self) -> None:
        self.drop()
        self.listener.close()


@pytest.fixture
def relay(broker_client) -> Iterator[Relay]:
    kwargs = broker_client.connection_pool.connection_kwargs
    relay = Relay((kwargs.get("host", "127.0.0.1"), kwargs.get("port", 6379)))
    yield relay
    relay.close()


def test_broker_lost_between_deliveries_answers_200_then_publishes_again_once_back(
    make_runtime, webhook_settings, broker_client, relay, captured
):
    db = webhook_settings.celery_broker_url.rsplit("/", 1)[1]
    runtime = make_runtime(
        webhook_settings.replace(celery_broker_url=f"redis://127.0.0.1:{relay.port}/{db}")
    )
    server = AppServer(runtime)
    publisher = background_publisher(runtime)
    try:
        before = post(server.url, make_event(event_id="evt_relay_before"))
        assert publisher.flush()
        relay.drop()
        during = post(server.url, make_event(event_id="evt_relay_during"))
        assert publisher.flush()
        relay.up = True
        after = post(server.url, make_event(event_id="evt_relay_after"))
        assert publisher.flush()
    finally:
        server.close()
    assert {r.status_code for r in (before, during, after)} == {200}
    assert {r.stripe_event_id: r.status for r in rows(runtime)} == {
        "evt_relay_before": "received",
        "evt_relay_during": "received",
        "evt_relay_after": "received",
    }
    queued = queued_event_ids(broker_client, webhook_settings.billing_queue)
    assert queued == ["evt_relay_before", "evt_relay_after"]
    (failed,) = captured.messages(logs.WEBHOOK_ENQUEUE_FAILED)
    assert failed.event_id == "evt_relay_during"
    assert [r.event_id for r in captured.messages(logs.WEBHOOK_ACCEPTED)] == [
        "evt_relay_before",
        "evt_relay_after",
    ]
