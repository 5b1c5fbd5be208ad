"""The fan-out: the hourly run's pending rows sent in parts by several processes, each part by one
process at a time, under one Redis rate limit; a dead taker's part is taken over; exact totals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import sqlalchemy as sa

from billing.broker import make_sender
from billing.config import ConfigError, Settings
from billing.models import UsageSubmission
from billing.rate_limits import SharedRateLimit
from billing.task_names import FLUSH_HOURLY_TASK, SUBMIT_PARTS_TASK
from billing.usage import fanout
from billing.usage.lock import inspect_lock
from billing.usage.service import flush_guarded
from tests.conftest import TEST_BROKER_URL
from tests.factories import (
    expected_totals,
    seed_usage,
    submission_statuses,
)
from tests.fixtures.processes import celery_worker_args, settings_env, worker_queue
from tests.process import billing_env

ORGS = list(range(1, 41))
TYPES = ["api_call", "storage_gb_hour"]


@pytest.fixture
def backlog(billing_runtime):
    return seed_usage(billing_runtime, ORGS, TYPES, 1200, hours=6)


def groups_by_org(runtime) -> dict[int, int]:
    with runtime.session_factory() as session:
        return dict(
            session.execute(sa.select(UsageSubmission.id, UsageSubmission.organization_id)).all()
        )


def leftover_keys(runtime) -> list[bytes]:
    return list(runtime.redis.scan_iter(f"{runtime.settings.flush_lock_key}:fanout:*"))


def test_parts_never_split_an_organization(billing_runtime, backlog):
    from billing.usage.run import UsageFlush

    flush = UsageFlush(billing_runtime.settings, billing_runtime.session_factory, None)
    flush._claim_only()
    org_of = groups_by_org(billing_runtime)
    parts = list(fanout.plan_parts(billing_runtime.session_factory, None, part_rows=25))
    assert sorted(i for part in parts for i in part) == sorted(org_of)
    owners = [{org_of[i] for i in part} for part in parts]
    for index, orgs in enumerate(owners):
        assert not any(orgs & other for other in owners[index + 1 :])
    sizes = [len(part) for part in parts]
    assert len(parts) > 5 and all(size >= 25 for size in sizes[:-1])


def test_coordinator_alone_sends_every_part_exactly_once(
    billing_settings, make_runtime, emulator, backlog
):
    """The submit tasks were queued but no worker runs them: the coordinator sends it all."""
    customers, rows = backlog
    runtime = make_runtime(
        billing_settings.replace(submit_fanout_tasks=3, submit_fanout_part_rows=25)
    )
    queued: list[int] = []
    coordinator = fanout.Coordinator(runtime, lambda _s, _run_id, count: queued.append(count))
    result = flush_guarded(runtime, fan_out=coordinator)
    groups = len(groups_by_org(runtime))
    assert result.ok and result.events_claimed == len(rows)
    assert result.submissions_sent == groups
    assert sum(result.billed_value.values()) == sum(r["quantity"] for r in rows)
    assert emulator.billed() == expected_totals(rows, customers)
    assert emulator.stats()["meter_events"]["accepted"] == groups  # no part sent twice
    assert queued == [3]
    assert submission_statuses(runtime) == {"sent": groups}
    assert leftover_keys(runtime) == []


@pytest.mark.parametrize("api", ["v1", "v2"])
def test_parts_read_in_several_chunks_count_every_row_once(
    billing_settings, make_runtime, emulator, backlog, api
):
    """Parts of ~60 rows, each loaded 7 rows at a time on v1 (v2 loads `streaming.LOAD_ROWS` at
    a time and streams each part's rows): the run's result counts every row once."""
    customers, rows = backlog
    runtime = make_runtime(
        billing_settings.replace(
            submit_fanout_tasks=3,
            submit_fanout_part_rows=60,
            flush_batch_size=7,
            stripe_meter_event_api=api,
        )
    )
    result = flush_guarded(runtime, fan_out=fanout.Coordinator(runtime, lambda *_: None))
    groups = len(groups_by_org(runtime))
    assert result.ok and result.submissions_sent == groups
    assert sum(result.billed_value.values()) == sum(r["quantity"] for r in rows)
    assert emulator.billed() == expected_totals(rows, customers)
    assert emulator.stats()["meter_events"]["accepted"] == groups
    assert submission_statuses(runtime) == {"sent": groups}


def test_submit_tasks_share_the_parts_and_the_result_counts_them_all(
    billing_settings, make_runtime, emulator, backlog
):
    """Two submit tasks, one of them delivered twice (threads standing in for worker processes),
    and the coordinator: every part sent once, by whoever took it first; the run's result adds
    up every process's counts."""
    customers, rows = backlog
    emulator.faults({"path": "/v1/billing/meter_events", "latency_ms": 5, "count": 100_000})
    helpers: list[threading.Thread] = []
    helper_results = []

    def enqueue(_settings: Settings, run_id: str, count: int) -> None:
        for _ in range(count + 1):  # one of them delivered twice
            thread = threading.Thread(
                target=lambda: helper_results.append(fanout.submit_parts(runtime, run_id))
            )
            thread.start()
            helpers.append(thread)

    runtime = make_runtime(
        billing_settings.replace(submit_fanout_tasks=2, submit_fanout_part_rows=25)
    )
    result = flush_guarded(runtime, fan_out=fanout.Coordinator(runtime, enqueue))
    for thread in helpers:
        thread.join(timeout=60)
    groups = len(groups_by_org(runtime))
    assert len(helpers) == 3
    assert result.ok and result.submissions_sent == groups
    assert sum(h.submissions_sent for h in helper_results) > 0  # the helpers took parts
    assert emulator.billed() == expected_totals(rows, customers)
    assert emulator.stats()["meter_events"]["accepted"] == groups
    assert submission_statuses(runtime) == {"sent": groups}
    # A submit task delivered after the run finds nothing to do.
    late = fanout.submit_parts(runtime, "a-finished-run")
    assert late.submissions_sent == 0 and emulator.stats()["meter_events"]["accepted"] == groups


def test_losing_the_run_lock_mid_fanout_bills_everything_once(
    billing_settings, make_runtime, emulator, backlog
):
    """The flush lock's key vanishes while the parts are sent: the run reports the loss (the
    task retries), every row is still billed once, and the next run sends nothing again. (A
    3 s lease: the heartbeat that notices the loss beats every second.)"""
    customers, rows = backlog
    runtime = make_runtime(
        billing_settings.replace(
            submit_fanout_tasks=1, submit_fanout_part_rows=25, flush_lock_lease_seconds=3
        )
    )
    emulator.faults({"path": "/v1/billing/meter_events", "latency_ms": 80, "count": 100_000})

    def drop_the_lock() -> None:
        deadline = time.monotonic() + 30
        while emulator.stats()["meter_events"]["accepted"] < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        runtime.redis.delete(runtime.settings.flush_lock_key)

    def enqueue(_settings: Settings, run_id: str, count: int) -> None:
        threading.Thread(target=drop_the_lock, daemon=True).start()
        threading.Thread(target=fanout.submit_parts, args=(runtime, run_id), daemon=True).start()

    result = flush_guarded(runtime, fan_out=fanout.Coordinator(runtime, enqueue))
    groups = len(groups_by_org(runtime))
    assert result.lock_lost and not result.ok
    assert result.submissions_sent == groups and result.submissions_pending == 0
    again = flush_guarded(runtime, fan_out=fanout.Coordinator(runtime, enqueue))
    assert again.ok and again.submissions_sent == 0
    assert emulator.billed() == expected_totals(rows, customers)
    assert emulator.stats()["meter_events"]["accepted"] == groups


CHILD = textwrap.dedent(
    """
    import sys
    from billing.config import Settings
    from billing.runtime import Runtime
    from billing.usage import fanout
    runtime = Runtime(Settings.from_env())
    fanout.submit_parts(runtime, sys.argv[1])
    """
)


def test_a_part_whose_taker_was_killed_is_taken_over_and_billed_once(
    billing_settings, make_runtime, emulator, backlog
):
    """A submit process SIGKILLed while it sends a part: its part's lease runs out, the
    coordinator takes the part and re-sends it; rows the dead one sent are answered "already
    exists", and every total is exact."""
    customers, rows = backlog
    emulator.faults({"path": "/v1/billing/meter_events", "latency_ms": 40, "count": 100_000})
    settings = billing_settings.replace(
        submit_fanout_tasks=1, submit_fanout_part_rows=60, flush_lock_lease_seconds=2
    )
    runtime = make_runtime(settings)
    children: list[subprocess.Popen] = []
    killed: list[str] = []

    def kill_once_it_sends(prefix: str) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not killed:
            for key in runtime.redis.scan_iter(f"{prefix}:part:*"):
                state = inspect_lock(runtime.redis, key.decode())
                if state and state.holder and state.holder.pid == children[0].pid:
                    time.sleep(0.3)  # a few of its calls are in flight or answered
                    os.kill(children[0].pid, signal.SIGKILL)
                    killed.append(key.decode())
                    return
            time.sleep(0.01)

    def enqueue(_settings: Settings, run_id: str, count: int) -> None:
        env = billing_env(settings, STRIPE_USAGE_FLUSH_LOCK_LEASE_SECONDS="3")
        children.append(
            subprocess.Popen(
                [sys.executable, "-c", CHILD, run_id], env=env, stderr=subprocess.DEVNULL
            )
        )
        prefix = f"{settings.flush_lock_key}:fanout:{run_id}"
        # The coordinator works parts too: it waits here until the child has taken one and been
        # killed (a child slow to start on a loaded machine found every part already taken).
        kill_once_it_sends(prefix)

    coordinator = fanout.Coordinator(runtime, enqueue)
    result = flush_guarded(runtime, fan_out=coordinator)
    children[0].wait(timeout=30)
    groups = len(groups_by_org(runtime))
    assert killed, "the submit process never took a part"
    assert children[0].returncode == -signal.SIGKILL
    assert result.ok and result.submissions_sent == groups
    assert emulator.billed() == expected_totals(rows, customers)
    assert submission_statuses(runtime) == {"sent": groups}


def test_one_shared_limit_holds_every_process_to_its_rate(settings):
    """Two limiters on one key (two processes' worth) make at most 20 calls in any second."""
    key = f"{settings.flush_lock_key}:test-rate"
    limits = [SharedRateLimit(settings.redis_url, key, 20) for _ in range(2)]
    stamps: list[float] = []
    lock = threading.Lock()

    def call_for(limit: SharedRateLimit, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            limit.acquire()
            with lock:
                stamps.append(time.monotonic())

    threads = [threading.Thread(target=call_for, args=(limit, 2.2)) for limit in limits]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stamps.sort()
    # Stamps are taken after Redis granted the call (a thread may be late by a GIL switch):
    # a 0.9 s window of them holds no more than the 20 of a second.
    busiest = max(sum(1 for t in stamps if s <= t < s + 0.9) for s in stamps)
    assert busiest <= 20
    assert len(stamps) >= 30  # past the first second's 20: the limit lets the rate through


def test_fanout_needs_the_redis_lock():
    env = {"STRIPE_USAGE_FANOUT_TASKS": "2", "STRIPE_USAGE_FLUSH_LOCK_BACKEND": "file"}
    with pytest.raises(ConfigError, match="STRIPE_USAGE_FANOUT_TASKS needs"):
        Settings.from_env(env)
    assert Settings.from_env({"STRIPE_USAGE_FANOUT_TASKS": "4"}).submit_fanout_tasks == 4
    assert Settings.from_env({}).submit_fanout_tasks == 0


FANOUT_ENV = {
    "TASKS": "STRIPE_USAGE_FANOUT_TASKS",
    "PART_ROWS": "STRIPE_USAGE_FANOUT_PART_ROWS",
    "LEASE": "STRIPE_USAGE_FLUSH_LOCK_LEASE_SECONDS",
}


def fanout_worker(billing_settings, make_runtime, processes, children: int, **env: str):
    """A real prefork worker with `children` on its own queue, fan-out settings from `env`
    (TASKS, PART_ROWS, LEASE): (a runtime on that queue, the worker process)."""
    settings = billing_settings.replace(billing_queue=worker_queue())
    extra = {FANOUT_ENV[name]: value for name, value in env.items()}
    args = celery_worker_args(settings.billing_queue, "-P", "prefork", "-c", str(children))
    worker = processes.start(
        "worker", args, settings_env(settings, BILLING_LOG_LEVEL="info", **extra)
    )
    return make_runtime(settings), worker


def hourly_run(settings: Settings):
    """`billing.usage.flush_hourly` queued as beat queues it; its AsyncResult."""
    sender = make_sender(settings)
    sender.conf.result_backend = TEST_BROKER_URL
    try:
        return sender.send_task(FLUSH_HOURLY_TASK, queue=settings.billing_queue)
    finally:
        sender.close()


def test_hourly_task_on_a_real_worker_fans_out_to_submit_tasks(
    billing_settings, make_runtime, emulator, backlog, processes
):
    """`billing.usage.flush_hourly` on a prefork worker with three children and
    STRIPE_USAGE_FANOUT_TASKS=2: the submit tasks run beside it and the totals are exact."""
    customers, rows = backlog
    emulator.faults({"path": "/v1/billing/meter_events", "latency_ms": 5, "count": 100_000})
    runtime, worker = fanout_worker(
        billing_settings, make_runtime, processes, 3, TASKS="2", PART_ROWS="25"
    )
    outcome = hourly_run(runtime.settings).get(timeout=120)
    groups = len(groups_by_org(runtime))
    assert outcome["ok"] and outcome["submissions_sent"] == groups
    assert emulator.billed() == expected_totals(rows, customers)
    assert submission_statuses(runtime) == {"sent": groups}
    log_text = worker.log_path.read_text()
    assert log_text.count(f"{SUBMIT_PARTS_TASK}[") >= 2  # both submit tasks were received
    assert leftover_keys(runtime) == []


def test_a_worker_child_killed_mid_part_leaves_the_totals_exact(
    billing_settings, make_runtime, emulator, backlog, processes
):
    """A prefork worker's child SIGKILLed while it sends a submit task's part (not the child
    running the hourly task, which holds the flush lock): the hourly task takes the part over
    once its 3 s lease runs out, and Stripe's totals are the table's."""
    customers, rows = backlog
    emulator.faults({"path": "/v1/billing/meter_events", "latency_ms": 40, "count": 100_000})
    runtime, _ = fanout_worker(
        billing_settings, make_runtime, processes, 2, TASKS="1", PART_ROWS="60", LEASE="3"
    )
    settings = runtime.settings
    killed: list[int] = []

    def kill_the_submit_child() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            run = inspect_lock(runtime.redis, settings.flush_lock_key)
            for key in runtime.redis.scan_iter(f"{settings.flush_lock_key}:fanout:*:part:*"):
                part = inspect_lock(runtime.redis, key.decode())
                if (
                    run
                    and run.holder
                    and part
                    and part.holder
                    and part.holder.pid != run.holder.pid
                ):
                    time.sleep(0.3)  # some of its calls answered, some in flight
                    os.kill(part.holder.pid, signal.SIGKILL)
                    killed.append(part.holder.pid)
                    return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_the_submit_child)
    sent = hourly_run(settings)
    killer.start()
    try:
        outcome = sent.get(timeout=120)
    finally:
        killer.join()
    groups = len(groups_by_org(runtime))
    assert killed, "no submit task ever held a part"
    assert outcome["ok"] and outcome["submissions_sent"] == groups
    assert emulator.billed() == expected_totals(rows, customers)
    assert submission_statuses(runtime) == {"sent": groups}
