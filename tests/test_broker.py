"""billing.publish_transport, the one reach into kombu internals (`PublishChannel` overrides the
Redis channel's `conn_or_acquire`): these tests fail when kombu changes what the override relies
on, so an upgrade cannot make it silently useless or wrong."""

from __future__ import annotations

import inspect
import uuid

import pytest
import redis
from kombu import Connection, Exchange, Producer, Queue
from kombu.transport import redis as kombu_redis

from billing import publish_transport
from tests.conftest import TEST_BROKER_URL


def test_kombu_still_has_what_the_publish_channel_overrides():
    channel = kombu_redis.Channel
    assert "client" in inspect.signature(channel.conn_or_acquire).parameters
    assert inspect.signature(channel._create_client).parameters.keys() == {"self", "asynchronous"}
    assert publish_transport.PublishTransport.Channel is publish_transport.PublishChannel


def _clients_built_for(
    transport: type, monkeypatch: pytest.MonkeyPatch, publishes: int
) -> tuple[int, int]:
    """Declare a queue and publish `publishes` messages to it through `transport`: (redis clients
    built, messages queued)."""
    built = []
    create = kombu_redis.Channel._create_client

    def counting_create(self, *args, **kwargs):
        built.append(1)
        return create(self, *args, **kwargs)

    monkeypatch.setattr(kombu_redis.Channel, "_create_client", counting_create)
    name = f"kombu-contract-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    with Connection(TEST_BROKER_URL, transport=transport) as connection:
        channel = connection.channel()
        producer = Producer(channel)
        queue(channel).declare()
        for n in range(publishes):
            producer.publish({"n": n}, exchange=queue.exchange, routing_key=name, declare=[])
        count = len(built)
    client = redis.Redis.from_url(TEST_BROKER_URL)
    try:
        return count, client.llen(name)
    finally:
        client.delete(name)


def test_kombu_builds_a_redis_client_per_publish_and_the_publish_channel_does_not(monkeypatch):
    # Stock kombu: two clients a message (the routing table read and the push). If this ever
    # fails, kombu fixed it upstream and PublishChannel can go.
    stock = [_clients_built_for(kombu_redis.Transport, monkeypatch, n) for n in (10, 20)]
    assert stock[1][0] - stock[0][0] >= 10 and [q for _, q in stock] == [10, 20]
    # The override: kombu still reaches Redis through conn_or_acquire, so the clients built do
    # not grow with the messages published (the channel's own client, and the one kept).
    ours = [
        _clients_built_for(publish_transport.PublishTransport, monkeypatch, n) for n in (10, 20)
    ]
    assert ours[0][0] == ours[1][0] <= 2 and [q for _, q in ours] == [10, 20]
