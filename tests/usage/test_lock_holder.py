"""The lock names its holder; a dead holder's lock is freed early and safely, a live one never."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

from billing import create_app
from billing.usage.lock import (
    LockHolder,
    RedisFlushLock,
    ReleaseOutcome,
    inspect_lock,
    release_dead_holder,
)
from tests.conftest import REDIS_PREFIX, TEST_REDIS_URL

KEY = f"{REDIS_PREFIX}flush-lock"


def foreign_token(lease: float) -> str:
    holder = LockHolder("other-host", 4242, "task-9", "2026-01-01T00:00:00+00:00", lease, "n1")
    return holder.token()


def test_lock_value_names_host_pid_task_and_since(redis_client):
    lock = RedisFlushLock(redis_client, KEY, 30, lease_seconds=3, task_id="task-123")
    assert lock.acquire()
    try:
        state = inspect_lock(redis_client, KEY)
        assert state is not None and state.holder is not None
        assert (state.holder.host, state.holder.pid) == (socket.gethostname(), os.getpid())
        assert state.holder.task_id == "task-123" and state.holder.lease_seconds == 3
        assert state.heartbeat_alive and not state.holder_dead
        assert 0 < state.expires_in_seconds <= 3
    finally:
        lock.release()
    assert inspect_lock(redis_client, KEY) is None


def test_a_run_cannot_hold_the_lock_past_its_ttl(redis_client):
    # The heartbeat stops re-arming at the TTL, so a hung run cannot block every later hour.
    lock = RedisFlushLock(redis_client, KEY, 1, lease_seconds=0.3)
    assert lock.acquire()
    time.sleep(1.6)
    assert lock.lost and not redis_client.exists(KEY)
    lock.release()


def test_release_refuses_a_live_heartbeat(redis_client):
    lock = RedisFlushLock(redis_client, KEY, 30, lease_seconds=3)
    assert lock.acquire()
    try:
        assert release_dead_holder(redis_client, inspect_lock(redis_client, KEY)) == (
            ReleaseOutcome.HOLDER_ALIVE
        )
        assert redis_client.exists(KEY)
    finally:
        lock.release()


def test_release_frees_a_lock_whose_heartbeat_stopped(redis_client):
    # Lease 30 s, 5 s left: the holder has not re-armed it for 25 s (two beats are 20 s).
    redis_client.set(KEY, foreign_token(30), px=5_000)
    state = inspect_lock(redis_client, KEY)
    assert not state.heartbeat_alive and state.holder_dead
    assert release_dead_holder(redis_client, state) == ReleaseOutcome.RELEASED
    assert not redis_client.exists(KEY)


def test_release_never_frees_a_lock_that_changed_hands(redis_client):
    redis_client.set(KEY, foreign_token(30), px=5_000)
    stale = inspect_lock(redis_client, KEY)
    redis_client.set(KEY, "a-new-holder", px=30_000)  # the old lease ran out; someone took it
    assert release_dead_holder(redis_client, stale) == ReleaseOutcome.CHANGED_HANDS
    assert redis_client.get(KEY) == b"a-new-holder"


def test_a_token_of_unknown_shape_is_never_called_dead(redis_client):
    redis_client.set(KEY, "0f3c9a-legacy-token", px=1_000)
    state = inspect_lock(redis_client, KEY)
    assert state.holder is None and not state.holder_dead
    assert release_dead_holder(redis_client, state) == ReleaseOutcome.HOLDER_ALIVE


HOLDER_SCRIPT = textwrap.dedent(
    """
    import sys, time, redis
    from billing.usage.lock import RedisFlushLock
    lock = RedisFlushLock(redis.Redis.from_url(sys.argv[1]), sys.argv[2], 3300,
                          lease_seconds=float(sys.argv[3]), task_id="killed-task")
    assert lock.acquire()
    print("held", flush=True)
    time.sleep(600)
    """
)


def start_holder(lease: float) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER_SCRIPT, TEST_REDIS_URL, KEY, str(lease)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "held"
    return process


def kill(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


def test_sigkilled_holder_frees_the_lock_within_one_lease(redis_client):
    holder = start_holder(lease=2)
    time.sleep(2.5)  # the heartbeat has re-armed the lease several times by now
    kill(holder)
    killed_at = time.monotonic()
    lock = RedisFlushLock(redis_client, KEY, 30, lease_seconds=2)
    while not lock.acquire():
        assert time.monotonic() - killed_at < 5, "lock still held long after one lease"
        time.sleep(0.05)
    waited = time.monotonic() - killed_at
    lock.release()
    assert waited <= 2.2


def test_cli_release_if_holder_dead_frees_a_killed_local_holder_at_once(redis_client, settings):
    runner = create_app(settings).test_cli_runner()
    holder = start_holder(lease=60)
    try:
        alive = runner.invoke(args=["billing", "lock", "release"])
        assert alive.exit_code == 1 and json.loads(alive.stdout)["outcome"] == "holder_alive"
        quiet = runner.invoke(args=["billing", "lock", "release", "--if-holder-dead"])
        assert quiet.exit_code == 0 and redis_client.exists(KEY)
        shown = json.loads(runner.invoke(args=["billing", "lock", "show"]).stdout)
        assert shown["holder"]["task_id"] == "killed-task" and shown["heartbeat_alive"]
    finally:
        kill(holder)
    # The lease still has ~60 s to run, but the holder's pid is gone from this host: proof enough.
    freed = runner.invoke(args=["billing", "lock", "release", "--if-holder-dead"])
    assert freed.exit_code == 0, freed.output
    assert json.loads(freed.stdout)["outcome"] == "released"
    assert not redis_client.exists(KEY)
    again = runner.invoke(args=["billing", "lock", "release"])
    assert again.exit_code == 0 and json.loads(again.stdout)["outcome"] == "not_held"
