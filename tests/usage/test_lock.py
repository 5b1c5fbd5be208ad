import time

import pytest
import redis

from billing.usage.lock import FileFlushLock, LockUnavailableError, RedisFlushLock, held
from tests.conftest import REDIS_PREFIX

KEY = f"{REDIS_PREFIX}flush-lock"


def test_second_holder_is_refused_until_release(redis_client):
    first, second = RedisFlushLock(redis_client, KEY, 30), RedisFlushLock(redis_client, KEY, 30)
    with held(first) as got_first:
        assert got_first
        with held(second) as got_second:
            assert not got_second
        assert redis_client.exists(KEY)
    assert not redis_client.exists(KEY)
    with held(second) as got_again:
        assert got_again


def test_lock_of_a_killed_holder_expires_after_its_ttl(redis_client):
    # A SIGKILLed worker leaves its key behind with only its TTL to clear it.
    redis_client.set(KEY, "dead-worker-token", px=300)
    lock = RedisFlushLock(redis_client, KEY, 30)
    assert not lock.acquire()
    time.sleep(0.4)
    assert lock.acquire()
    lock.release()


def test_non_owner_cannot_release(redis_client):
    owner, intruder = RedisFlushLock(redis_client, KEY, 30), RedisFlushLock(redis_client, KEY, 30)
    assert owner.acquire()
    token = redis_client.get(KEY)
    intruder.release()  # never acquired: must not delete the owner's key
    assert redis_client.get(KEY) == token
    owner.release()
    assert not redis_client.exists(KEY)


def test_release_after_expiry_leaves_the_new_holders_lock(redis_client, caplog):
    first = RedisFlushLock(redis_client, KEY, 1)
    assert first.acquire()
    first._stop.set()  # stop the heartbeat: simulate a holder stalled past its TTL
    time.sleep(1.2)
    second = RedisFlushLock(redis_client, KEY, 30)
    assert second.acquire()
    first.release()
    assert redis_client.exists(KEY), "the stale holder deleted the new holder's lock"
    assert "expired before release" in caplog.text
    second.release()


def test_heartbeat_keeps_a_long_flush_locked(redis_client):
    lock = RedisFlushLock(redis_client, KEY, 30, lease_seconds=0.6)
    assert lock.acquire()
    time.sleep(2.2)  # over three leases: only the heartbeat keeps the key alive
    assert redis_client.exists(KEY) and not lock.lost
    lock.release()


def test_heartbeat_reports_a_stolen_lock(redis_client):
    lock = RedisFlushLock(redis_client, KEY, 1)
    assert lock.acquire()
    redis_client.set(KEY, "someone-else")
    time.sleep(0.6)
    assert lock.lost
    lock.release()
    assert redis_client.get(KEY) == b"someone-else"


def test_unreachable_redis_is_a_clear_error():
    client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    with pytest.raises(LockUnavailableError, match="refusing to flush without the overlap guard"):
        RedisFlushLock(client, KEY, 30).acquire()


def test_file_lock_excludes_a_second_holder(tmp_path):
    first, second = FileFlushLock(KEY, tmp_path), FileFlushLock(KEY, tmp_path)
    with held(first) as got_first:
        assert got_first
        with held(second) as got_second:
            assert not got_second
    with held(second) as got_again:
        assert got_again


def test_a_heartbeat_that_dies_counts_as_a_lost_lock(redis_client):
    """A lease too long for a timer (settings built in code skip the config's bounds) kills the
    heartbeat thread at once: the lock must read as lost, never as quietly held."""
    lock = RedisFlushLock(redis_client, KEY, 99_999_999_999, lease_seconds=99_999_999_999)
    assert lock.acquire()
    deadline = time.monotonic() + 5
    while not lock.lost and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lock.lost
    lock.release()


def test_a_flush_whose_heartbeat_died_does_not_report_ok(billing_runtime, emulator):
    from datetime import timedelta

    from billing.models import utcnow
    from billing.usage.service import flush_guarded
    from tests.factories import add_accounts, add_events

    add_accounts(billing_runtime, [1])
    add_events(
        billing_runtime,
        [
            {
                "organization_id": 1,
                "event_type": "api_call",
                "quantity": 2,
                "occurred_at": utcnow() - timedelta(hours=1),
            }
        ],
    )
    billing_runtime.settings = billing_runtime.settings.replace(
        flush_lock_ttl_seconds=99_999_999_999, flush_lock_lease_seconds=99_999_999_999
    )
    result = flush_guarded(billing_runtime)
    assert result.lock_lost and not result.ok
