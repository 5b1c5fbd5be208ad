"""Fan-out: the hourly run's pending outbox rows sent by several worker processes at once.

The hourly task (single-flight under the flush lock) claims as always, then splits the pending
rows into *parts* kept in Redis, all of an organization's rows in one part, so two calls for the
same customer and meter are never in flight in two processes (inside a part, `LaneSender` sends a
customer·meter's rows one after the other). It enqueues `STRIPE_USAGE_FANOUT_TASKS` submit tasks
and works the parts itself as well, so a run never waits on a worker that is not there: with one
worker slot, or none free, the coordinator sends every part itself.

A process takes a part by taking the part's lock (the flush lock's own kind: redis-py `Lock` with
an owner token and a heartbeat-kept lease), sends it through its own `Submitter`, then marks it
done and adds what it did to the run's totals in one transaction. The coordinator returns once
every part is done. A part whose taker died (SIGKILL, lost Redis) frees itself within one lease
(`STRIPE_USAGE_FLUSH_LOCK_LEASE_SECONDS`) and the coordinator takes it: rows its taker sent but
did not record are re-sent with the same identifiers and Stripe answers "already exists", so
they are delivered once. A redelivered or late submit task finds the run's keys gone, or every
part done or held, and returns. Every process sends under one Redis rate limit
(`billing.rate_limits.SharedRateLimit`), so together they stay under Stripe's ceiling.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import redis
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from billing import logs
from billing.config import Settings
from billing.errors import OperatorError
from billing.models import SubmissionStatus, UsageSubmission, utcnow
from billing.runtime import Runtime
from billing.usage.lock import RedisFlushLock
from billing.usage.result import FlushResult
from billing.usage.submitting import Stops, Submitter

log = logs.get_logger("billing.usage")

# Rows per part: 4 processes share a 7,500-group hour in ~15 parts each, and a part's Redis
# bookkeeping (a lock, a read, one transaction) stays far below its 2,000 calls.
PART_ROWS = 2_000
# How often the coordinator looks again for parts that other processes still hold.
POLL_SECONDS = 0.1
# What a part adds to the run's result (`FlushResult` counters; billed values per event type).
COUNTERS = (
    "submissions_sent",
    "submissions_already_delivered",
    "submissions_failed",
    "submissions_pending",
    "submissions_stopped",
)
BILLED_PREFIX = "billed:"

# (settings, run id, count): queue `count` submit tasks for the run (`usage.tasks`).
EnqueueSubmitTasks = Callable[[Settings, str, int], None]


def plan_parts(
    sessions: sessionmaker[Session], organization_id: int | None, part_rows: int
) -> Iterator[list[int]]:
    """The pending outbox rows' ids in parts of about `part_rows`, an organization never split."""
    query = sa.select(UsageSubmission.id, UsageSubmission.organization_id).where(
        UsageSubmission.status == SubmissionStatus.PENDING.value
    )
    if organization_id is not None:
        query = query.where(UsageSubmission.organization_id == organization_id)
    part: list[int] = []
    last_org: int | None = None
    with sessions() as session:
        rows = session.execute(
            query.order_by(UsageSubmission.organization_id, UsageSubmission.id),
            execution_options={"yield_per": 10_000},
        )
        for row_id, org in rows:
            if org != last_org and len(part) >= part_rows:
                yield part
                part = []
            part.append(row_id)
            last_org = org
    if part:
        yield part


@dataclass(frozen=True)
class RunParts:
    """One fanned-out run's parts in Redis, under `{flush lock key}:fanout:{run id}`."""

    client: redis.Redis
    prefix: str
    ttl_seconds: int
    lease_seconds: int

    @classmethod
    def of(cls, runtime: Runtime, run_id: str) -> RunParts:
        settings = runtime.settings
        return cls(
            runtime.redis,
            f"{settings.flush_lock_key}:fanout:{run_id}",
            settings.flush_lock_ttl_seconds,
            settings.flush_lock_lease_seconds,
        )

    def key(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    # The coordinator ----------------------------------------------------------------------

    def publish(self, parts: Iterable[list[int]], submitter: Submitter) -> int:
        """Store the parts, the run's call budget and its stops so far; the number of parts."""
        count = 0
        pipe = self.client.pipeline(transaction=False)
        for index, ids in enumerate(parts):
            pipe.hset(self.key("parts"), str(index), json.dumps(ids))
            count = index + 1
            if count % 100 == 0:
                pipe.execute()
        meta = {"parts": count, "call_attempts": submitter.call_attempts}
        pipe.hset(self.key("meta"), mapping=meta)
        stops = submitter.stops.as_fields()
        if stops:
            pipe.hset(self.key("stops"), mapping=stops)
        for name in ("parts", "meta", "stops"):
            pipe.expire(self.key(name), self.ttl_seconds)
        pipe.execute()
        return count

    def merge_into(self, result: FlushResult, base: dict[str, int], stops: Stops) -> None:
        """The run's totals (every process's parts, this one's included) on top of `base`, what
        the coordinator's result held before the fan-out; every process's stops."""
        totals = {k.decode(): int(v) for k, v in self.client.hgetall(self.key("totals")).items()}
        merged = {name: base.get(name, 0) + totals.get(name, 0) for name in {*base, *totals}}
        for name in COUNTERS:
            setattr(result, name, merged.get(name, 0))
        result.billed_value = {
            name[len(BILLED_PREFIX) :]: value
            for name, value in merged.items()
            if name.startswith(BILLED_PREFIX)
        }
        stops.absorb(self.stops())

    def delete(self) -> None:
        self.client.delete(*(self.key(n) for n in ("parts", "meta", "stops", "done", "totals")))

    # Every process ------------------------------------------------------------------------

    def part_count(self) -> int:
        """0 once the run is over (its keys deleted or expired)."""
        return int(self.client.hget(self.key("meta"), "parts") or 0)

    def call_attempts(self) -> int:
        return int(self.client.hget(self.key("meta"), "call_attempts") or 1)

    def stops(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.client.hgetall(self.key("stops")).items()}

    def done(self) -> set[int]:
        return {int(i) for i in self.client.smembers(self.key("done"))}

    def work(self, submitter: Submitter, *, until_done: bool) -> int:
        """Take and send parts no other process holds; the coordinator (`until_done`) goes on
        until every part is done, taking over those whose taker died. Parts sent here."""
        count, sent = self.part_count(), 0
        while count:
            done = self.done()
            if len(done) >= count or self.client.hexists(self.key("stops"), "run"):
                break
            waiting = [i for i in range(count) if i not in done]
            # A random start spreads processes that begin together over different parts.
            start = random.randrange(len(waiting))
            took = 0
            for index in waiting[start:] + waiting[:start]:
                if submitter.stops.run.is_set():
                    return sent + took
                took += self._try_part(index, submitter)
            sent += took
            if not until_done:
                break
            if not took:
                time.sleep(POLL_SECONDS)
        return sent

    def _try_part(self, index: int, submitter: Submitter) -> bool:
        lock = RedisFlushLock(
            self.client,
            self.key(f"part:{index}"),
            self.ttl_seconds,
            lease_seconds=self.lease_seconds,
            task_id=logs.bound("task_id"),
        )
        if not lock.acquire():
            return False  # another process is sending it
        try:
            if self.client.sismember(self.key("done"), str(index)):
                return False  # done between our look and the lock
            raw = self.client.hget(self.key("parts"), str(index))
            if raw is None:
                return False  # the run is over
            submitter.stops.absorb(self.stops())
            before = counts_of(submitter.result)
            submitter.submit(json.loads(raw))
            self._mark_done(index, before, counts_of(submitter.result), submitter.stops)
            return True
        finally:
            lock.release()

    def _mark_done(
        self, index: int, before: dict[str, int], after: dict[str, int], stops: Stops
    ) -> None:
        pipe = self.client.pipeline(transaction=True)
        for name, value in after.items():
            if value != before.get(name, 0):
                pipe.hincrby(self.key("totals"), name, value - before.get(name, 0))
        for field, error in stops.as_fields().items():
            pipe.hsetnx(self.key("stops"), field, error)
        pipe.sadd(self.key("done"), str(index))
        for name in ("totals", "stops", "done"):
            pipe.expire(self.key(name), self.ttl_seconds)
        pipe.execute()


def counts_of(result: FlushResult) -> dict[str, int]:
    """The counters a part changes, billed values as `billed:EVENT_TYPE`."""
    counts = {name: getattr(result, name) for name in COUNTERS}
    counts.update({BILLED_PREFIX + k: v for k, v in result.billed_value.items()})
    return counts


class Coordinator:
    """The hourly run's side (`UsageFlush(fan_out=...)`): publish the parts, enqueue the submit
    tasks, work parts until all are done, and fold the totals into the run's result."""

    def __init__(self, runtime: Runtime, enqueue: EnqueueSubmitTasks) -> None:
        self.runtime = runtime
        self.enqueue = enqueue

    def __call__(self, submitter: Submitter) -> None:
        settings = self.runtime.settings
        run_id = uuid.uuid4().hex
        parts = RunParts.of(self.runtime, run_id)
        planned = plan_parts(
            submitter.sessions, submitter.organization_id, settings.submit_fanout_part_rows
        )
        count = parts.publish(planned, submitter)
        if not count:
            parts.delete()
            return
        tasks = min(settings.submit_fanout_tasks, count - 1)
        fields = {"run_id": run_id, "parts": count, "tasks": tasks}
        log.info(logs.FLUSH_FANOUT_STARTED, extra=fields)
        if tasks:
            try:
                self.enqueue(settings, run_id, tasks)
            except OperatorError as error:  # the broker is down: this process sends every part
                log.warning(logs.FLUSH_FANOUT_UNQUEUED, extra={**fields, "error": str(error)})
        base = counts_of(submitter.result)
        try:
            own = parts.work(submitter, until_done=True)
            parts.merge_into(submitter.result, base, submitter.stops)
        finally:
            parts.delete()
        log.info(
            logs.FLUSH_FANOUT_COMPLETED,
            extra={"run_id": run_id, "parts": count, "parts_sent_here": own},
        )


def submit_parts(runtime: Runtime, run_id: str) -> FlushResult:
    """A submit task's work: send the parts of `run_id` no other process holds; what it did."""
    parts = RunParts.of(runtime, run_id)
    result = FlushResult()
    if not parts.part_count():
        return result  # the run is over (a late or redelivered task)
    stops = Stops()
    submitter = Submitter(
        runtime.settings,
        runtime.session_factory,
        runtime.stripe,
        stops,
        result,
        organization_id=None,
        clock=utcnow,
        call_attempts=parts.call_attempts(),
    )
    try:
        parts.work(submitter, until_done=False)
    finally:
        submitter.close()
    return result
