"""Submitting: pending outbox rows become Stripe meter events.

Each row is sent with its fixed identifier and an idempotency key derived from it. A crash after
Stripe accepted but before we recorded it is repaired by the next flush: the re-send is answered
"An event already exists with identifier …", which means delivered. Stripe keeps identifiers for
at least 24 hours only, so a row unsent for longer is held for reconciliation instead of re-sent.

Only an error about one request fails its row. An error about the account (key, permissions), a
meter or a customer stops sending for what it is about and leaves those rows pending, so the next
flush after the fix bills them once (`stripe_gateway.ErrorScope`).

A submit is three steps, so that how rows reach Stripe can change without touching what is loaded
or recorded: **load** the pending rows among the given ids, a chunk at a time, as plain rows (no
ORM objects: a batch of a million outbox rows must not sit in memory at once); **send** a chunk
through a `Sender` (v1: `LaneSender`, one call per row in lanes); **record** what each row's
attempt came to. Recording only ever moves a row that is still pending, so a late or redelivered
submit of the same ids never sets a sent row back, and loading only pending rows means it sends
nothing twice.
"""

from __future__ import annotations

import functools
import queue
import threading
from array import array
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any, NamedTuple, Protocol

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, stop_when_event_set

from billing import logs
from billing.config import Settings
from billing.models import (
    BillingAccount,
    SubmissionStatus,
    UsageSubmission,
    begin_record,
    id_in,
    pending_among,
    still_pending,
)
from billing.stripe_gateway import (
    REPOINTED_SCOPES,
    ErrorScope,
    MeterEvent,
    MeterEventOutcome,
    PermanentStripeError,
    StripeGateway,
    StripeGatewayError,
    TransientStripeError,
)
from billing.usage import retry_policy, streaming
from billing.usage.result import FlushResult

log = logs.get_logger("billing.usage")

# Outcomes of a row that is left pending because an error about more than the row stopped it:
STOPPED = "stopped"  # this row's call got the error
SKIPPED = "skipped"  # not sent: an earlier row's error already covers it
ACTIVE_METER = "active"
DELIVERED = frozenset({MeterEventOutcome.ACCEPTED.value, MeterEventOutcome.DUPLICATE.value})


class OutboxRow(NamedTuple):
    """What sending and recording need of one outbox row, read as a plain row."""

    id: int
    organization_id: int
    stripe_customer_id: str
    event_type: str
    event_name: str
    value: int
    window_start: datetime
    identifier: str
    attempts: int
    key_generation: int
    last_error_scope: str | None

    # The model's own derivation (one place decides every retry's key).
    idempotency_key = UsageSubmission.idempotency_key


OUTBOX_COLUMNS = tuple(getattr(UsageSubmission, name) for name in OutboxRow._fields)


class Stops:
    """What errors about more than one row have stopped, shared by the submit lanes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.run = threading.Event()  # set: every lane stops at once
        self.run_error: str | None = None
        self.meters: dict[str, str] = {}
        self.customers: dict[str, str] = {}

    def stop(self, error: StripeGatewayError, row: OutboxRow) -> None:
        if error.scope == ErrorScope.RUN:
            self.stop_run(str(error))
        elif error.scope == ErrorScope.METER:
            self.stop_meter(row.event_name, str(error))
        elif error.scope == ErrorScope.CUSTOMER:
            self.stop_customer(row.stripe_customer_id, str(error))

    def stop_run(self, error: str) -> None:
        with self._lock:
            self.run_error = self.run_error or error
            self.run.set()

    def stop_meter(self, event_name: str, error: str) -> None:
        with self._lock:
            self.meters.setdefault(event_name, error)

    def stop_customer(self, customer_id: str, error: str) -> None:
        with self._lock:
            self.customers.setdefault(customer_id, error)

    def as_fields(self) -> dict[str, str]:
        """The stops as flat fields (`run`, `meter:NAME`, `customer:ID`), to share with the other
        processes of a fanned-out run (`usage.fanout`)."""
        with self._lock:
            fields = {f"meter:{name}": error for name, error in self.meters.items()}
            fields.update({f"customer:{c}": error for c, error in self.customers.items()})
            if self.run_error:
                fields["run"] = self.run_error
            return fields

    def absorb(self, fields: dict[str, str]) -> None:
        """Another process's stops (`as_fields`): this one stops the same things."""
        for field, error in fields.items():
            kind, _, name = field.partition(":")
            if kind == "run":
                self.stop_run(error)
            elif kind == "meter":
                self.stop_meter(name, error)
            elif kind == "customer":
                self.stop_customer(name, error)

    def stopped_meters(self) -> set[str]:
        """A copy: lanes add entries while the claimer reads."""
        with self._lock:
            return set(self.meters)

    def stopped_customers(self) -> list[str]:
        with self._lock:
            return sorted(self.customers)

    def covering(self, row: OutboxRow) -> tuple[ErrorScope, str] | None:
        """The stop that covers this row, if any: (scope, error)."""
        if self.run.is_set():
            return ErrorScope.RUN, self.run_error or ""
        if row.event_name in self.meters:
            return ErrorScope.METER, self.meters[row.event_name]
        if row.stripe_customer_id in self.customers:
            return ErrorScope.CUSTOMER, self.customers[row.stripe_customer_id]
        return None


class Attempt(NamedTuple):
    """What happened to one outbox row in this pass."""

    row: OutboxRow
    outcome: str  # a MeterEventOutcome, `failed`, `pending`, STOPPED or SKIPPED
    error: str | None = None
    scope: ErrorScope | None = None


class Sender(Protocol):
    """How a chunk of loaded rows reaches Stripe: one `Attempt` per row, in any order.

    The submitter loads before and records after; a sender keeps no row once it has returned."""

    def send(self, rows: Sequence[OutboxRow]) -> list[Attempt]: ...

    def close(self) -> None: ...


class LaneSender:
    """v1: one meter event call per row, in `STRIPE_USAGE_SUBMIT_CONCURRENCY` lanes.

    A (customer, meter) key is one unit of work: a lane takes the next key and sends its rows one
    after the other, so at most one call per key is in flight, as Stripe allows. The lane threads
    live as long as the run (the gateway's HTTP session keeps their connections alive). Lanes
    matter at real Stripe latency (a lane makes at most 1/latency calls a second); on loopback a
    process is bound by its CPU, so each call's own work is kept small: the retry policy is built
    once, not per row, and the per-row log lines are written by one thread (`LaneLog`)."""

    def __init__(
        self, settings: Settings, gateway: StripeGateway, stops: Stops, *, call_attempts: int
    ) -> None:
        self.gateway = gateway
        self.stops = stops
        self.call_attempts = call_attempts
        self._lanes = ThreadPoolExecutor(
            max_workers=max(1, settings.submit_concurrency), thread_name_prefix="meter-submit"
        )
        self._width = max(1, settings.submit_concurrency)
        self._log = logs.LaneLog(log)
        # One for every row and thread: tenacity keeps a call's state per thread.
        self._retrying = Retrying(
            stop=stop_after_attempt(max(1, call_attempts)) | stop_when_event_set(stops.run),
            wait=retry_policy.call_wait(settings),
            retry=retry_if_exception_type(TransientStripeError),
            reraise=True,
        )

    @property
    def executor(self) -> ThreadPoolExecutor:
        return self._lanes

    @property
    def retrying(self) -> Retrying:
        return self._retrying

    @property
    def lane_log(self) -> logs.LaneLog:
        return self._log

    def close(self) -> None:
        self._lanes.shutdown(wait=True)
        self._log.close()

    def send(self, rows: Sequence[OutboxRow]) -> list[Attempt]:
        keys: dict[tuple[str, str], list[OutboxRow]] = defaultdict(list)
        for row in rows:
            keys[(row.stripe_customer_id, row.event_name)].append(row)
        work: queue.SimpleQueue[list[OutboxRow]] = queue.SimpleQueue()
        for key_rows in keys.values():
            work.put(key_rows)
        failed = threading.Event()  # one lane raised: the others take no new key
        # carry_context: the lanes' log lines keep the task_id/task_name bound by the caller.
        lane = logs.carry_context(self._lane)
        futures = [
            self._lanes.submit(lane, work, failed) for _ in range(min(self._width, len(keys)))
        ]
        try:
            return [attempt for future in futures for attempt in future.result()]
        finally:
            self._log.flush()  # every row's lines are out before the chunk is recorded

    def _lane(
        self, work: queue.SimpleQueue[list[OutboxRow]], failed: threading.Event
    ) -> list[Attempt]:
        attempts: list[Attempt] = []
        try:
            while not failed.is_set():
                try:
                    key_rows = work.get_nowait()
                except queue.Empty:
                    break
                attempts.extend(self._send_one(row) for row in key_rows)
        except BaseException:
            failed.set()
            raise
        return attempts

    def _send_one(self, row: OutboxRow) -> Attempt:
        covering = self.stops.covering(row)
        if covering is not None:
            return Attempt(row, SKIPPED, covering[1], covering[0])
        if self.call_attempts < 1:
            return Attempt(row, SKIPPED)
        event = MeterEvent.of_row(row)
        fields = {
            "organization_id": row.organization_id,
            "idempotency_key": event.idempotency_key,
            "event_name": row.event_name,
            "value": row.value,
            "identifier": row.identifier,
        }
        attempt = 0

        def send() -> MeterEventOutcome:
            nonlocal attempt
            attempt += 1
            self._log.info(logs.METER_SUBMIT_ATTEMPT, {**fields, "attempt": attempt})
            return self.gateway.send_meter_event(event)

        try:
            outcome = self._call(send)
        except PermanentStripeError as error:
            self._log.error(
                logs.METER_SUBMIT_FAILED,
                {**fields, "error": str(error), "transient": False, "scope": error.scope},
            )
            if error.scope != ErrorScope.ROW:
                self.stops.stop(error, row)
                return Attempt(row, STOPPED, str(error), error.scope)
            return Attempt(row, SubmissionStatus.FAILED.value, str(error), error.scope)
        except TransientStripeError as error:
            self._log.warning(
                logs.METER_SUBMIT_FAILED, {**fields, "error": str(error), "transient": True}
            )
            return Attempt(row, SubmissionStatus.PENDING.value, str(error))
        self._log.info(logs.METER_SUBMIT_SUCCEEDED, {**fields, "outcome": outcome.value})
        return Attempt(row, outcome.value)

    def _call(self, send: Callable[[], MeterEventOutcome]) -> MeterEventOutcome:
        """Transient errors (429, 409, 5xx, connection) are retried here, within the row's share
        of the run's call budget (`usage.retry_policy`); a run-level stop ends the retries."""
        return self._retrying(send)


class Submitter:
    """Loads, sends (through its `Sender`) and records outbox rows for one flush run;
    `close()` ends the sender's threads."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        gateway: StripeGateway,
        stops: Stops,
        result: FlushResult,
        *,
        organization_id: int | None,
        clock: Callable[[], datetime],
        call_attempts: int,
        sender: Sender | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = session_factory
        self.gateway = gateway
        self.stops = stops
        self.result = result
        self.organization_id = organization_id
        self.clock = clock
        self.call_attempts = call_attempts
        self.sender = sender or LaneSender(settings, gateway, stops, call_attempts=call_attempts)

    def close(self) -> None:
        self.sender.close()

    def check_before_claiming(self) -> None:
        """One read before anything is claimed: a refused key stops the run and a meter Stripe
        lacks stops that meter, so their usage stays unclaimed (not parked in the outbox, ageing
        towards the identifier window) until the configuration is fixed.

        Only a 401 stops the run here: a restricted key may send meter events without being
        allowed to list meters. Any other failure leaves the checking to the sends."""
        try:
            meters = self.gateway.meter_by_event_name()
        except TransientStripeError:
            return
        except PermanentStripeError as error:
            if error.status == 401:
                self.stops.stop_run(str(error))
            return
        for event_name in sorted(set(self.settings.stripe_meters.values())):
            meter = meters.get(event_name)
            if meter is None or meter.status != ACTIVE_METER:
                self.stops.stop_meter(
                    event_name, f"No active Stripe meter has the event name {event_name!r}"
                )

    # Pending ids are read in keyset pages of the primary key: one result of a million rows
    # held every row object of it at once (docs/performance.md).
    PENDING_ID_PAGE = 100_000

    def pending_submission_ids(self) -> Sequence[int]:
        """Every pending row's id, ascending, as 8 bytes each (`array('q')`), not a list."""
        ids = array("q")
        with self.sessions() as session:
            while True:
                query = sa.select(UsageSubmission.id).where(
                    UsageSubmission.status == SubmissionStatus.PENDING.value
                )
                if self.organization_id is not None:
                    query = query.where(UsageSubmission.organization_id == self.organization_id)
                if ids:
                    query = query.where(UsageSubmission.id > ids[-1])
                page = session.scalars(
                    query.order_by(UsageSubmission.id).limit(self.PENDING_ID_PAGE)
                ).all()
                ids.extend(page)
                if len(page) < self.PENDING_ID_PAGE:
                    return ids

    def hold_stale_submissions(self) -> None:
        """Unsent past Stripe's identifier window: a re-send could bill twice. Hold and report."""
        cutoff = self.clock() - timedelta(hours=self.settings.resend_window_hours)
        query = sa.select(UsageSubmission).where(
            UsageSubmission.status == SubmissionStatus.PENDING.value,
            UsageSubmission.created_at < cutoff,
        )
        if self.organization_id is not None:
            query = query.where(UsageSubmission.organization_id == self.organization_id)
        with self.sessions.begin() as session:
            for row in session.scalars(query):
                row.status = SubmissionStatus.HELD.value
                row.last_error = (
                    f"unsent for over {self.settings.resend_window_hours}h; reconcile against "
                    "Stripe meter event summaries before re-sending"
                )
                self.result.submissions_held += 1
                log.warning(
                    logs.FLUSH_HELD,
                    extra={
                        "organization_id": row.organization_id,
                        "idempotency_key": row.idempotency_key,
                        "identifier": row.identifier,
                        "value": row.value,
                    },
                )

    def submit(self, submission_ids: Sequence[int]) -> None:
        """Send the pending rows among `submission_ids` and record what became of them, a chunk
        at a time (v2: the meter event stream records each request's rows itself)."""
        for rows in self.load(submission_ids):
            if self.settings.stripe_meter_event_api == "v2":
                self._stream_sender.submit(rows)
            else:
                self.record(self.sender.send(rows))

    @functools.cached_property
    def _stream_sender(self) -> streaming.StreamSender:
        """The v2 sender, made once: it sends on the v1 sender's lanes, under its retry policy."""
        if not isinstance(self.sender, LaneSender):
            raise TypeError("the v2 stream sends on a LaneSender's lanes")
        return streaming.StreamSender(
            self.gateway,
            self.sessions,
            self.stops,
            self.result,
            clock=self.clock,
            lanes=self.sender.executor,
            lane_count=self.settings.submit_concurrency,
            retrying=self.sender.retrying,
            call_attempts=self.call_attempts,
            lane_log=self.sender.lane_log,
        )

    def load(self, submission_ids: Sequence[int]) -> Iterator[list[OutboxRow]]:
        """The rows among `submission_ids` that are still pending, in id order, in chunks of
        `STRIPE_USAGE_FLUSH_BATCH_SIZE` (v2: at least `streaming.LOAD_ROWS`).

        The next chunk is read while the caller sends this one: read in turn, the lanes waited
        for every read (docs/performance.md, "Claiming a million groups")."""
        page = max(1, self.settings.flush_batch_size)
        if self.settings.stripe_meter_event_api == "v2":
            page = max(page, streaming.LOAD_ROWS)
        if not submission_ids:
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox-load") as ahead:
            read = logs.carry_context(self._load_page)
            following = ahead.submit(read, submission_ids[:page])
            for start in range(page, len(submission_ids) + page, page):
                rows = following.result()
                if start < len(submission_ids):
                    following = ahead.submit(read, submission_ids[start : start + page])
                if rows:
                    yield rows

    def _load_page(self, ids: Sequence[int]) -> list[OutboxRow]:
        """One chunk by primary key: a range scan between its first and last id."""
        with self.sessions() as session:
            dialect = session.get_bind().dialect.name
            rows = [
                OutboxRow._make(row)
                for row in session.execute(
                    sa.select(*OUTBOX_COLUMNS)
                    .where(pending_among(ids, dialect))
                    .order_by(UsageSubmission.id)
                )
            ]
            if any(row.last_error_scope in REPOINTED_SCOPES for row in rows):
                rows = self._repoint(session, rows)
        return rows

    def _repoint(self, session: Session, rows: list[OutboxRow]) -> list[OutboxRow]:
        """Rows that Stripe refused for their meter or customer follow the fixed configuration.

        Safe: a refused meter or customer means Stripe never accepted the row under that name, and
        the identifier (which dedupes billing) stays the same."""
        meters = self.settings.stripe_meters
        rows = [
            row._replace(event_name=meters.get(row.event_type, row.event_name))
            if row.last_error_scope == ErrorScope.METER
            else row
            for row in rows
        ]
        orgs = {r.organization_id for r in rows if r.last_error_scope == ErrorScope.CUSTOMER}
        if not orgs:
            return rows
        customers = dict(
            session.execute(
                sa.select(BillingAccount.organization_id, BillingAccount.stripe_customer_id).where(
                    BillingAccount.organization_id.in_(sorted(orgs)),
                    BillingAccount.stripe_customer_id.is_not(None),
                )
            ).all()
        )
        return [
            row._replace(stripe_customer_id=customers[row.organization_id])
            if row.last_error_scope == ErrorScope.CUSTOMER and row.organization_id in customers
            else row
            for row in rows
        ]

    def record(self, attempts: list[Attempt]) -> None:
        """What the attempts came to, in one transaction: every row delivered under the name it
        was loaded with in one statement, the rest (refused, left pending, repointed) row by
        row. Each statement moves only rows that are still pending."""
        now = self.clock()
        delivered_ids: list[int] = []
        updates: list[dict[str, Any]] = []
        for row, outcome, error, scope in attempts:
            delivered = outcome in DELIVERED
            called = outcome != SKIPPED
            self._count(row, outcome, error)
            if outcome == SKIPPED and scope in (None, ErrorScope.RUN):
                continue  # nothing learnt about this row
            if delivered and row.last_error_scope not in REPOINTED_SCOPES:
                delivered_ids.append(row.id)
                continue
            status = (
                SubmissionStatus.SENT.value
                if delivered
                else outcome
                if outcome == SubmissionStatus.FAILED.value
                else SubmissionStatus.PENDING.value
            )
            refused = outcome in (STOPPED, SubmissionStatus.FAILED.value)
            updates.append(
                {
                    "id": row.id,
                    "status": status,
                    "attempts": row.attempts + (1 if called else 0),
                    "last_error": error,
                    "last_error_scope": scope.value if scope else None,
                    "event_name": row.event_name,
                    "stripe_customer_id": row.stripe_customer_id,
                    "sent_at": now if delivered else None,
                    "updated_at": now,
                    # Stripe may keep a refusal under the idempotency key; the next send of this
                    # row is a new request (its identifier, which dedupes billing, is unchanged).
                    "key_generation": row.key_generation + (1 if refused else 0),
                }
            )
        if not delivered_ids and not updates:
            return
        with self.sessions.begin() as session:
            dialect = begin_record(session)
            # A meter error report can mark a row rejected while its batch is in flight (Stripe
            # answered 200, then refused it): the status guard keeps that verdict over this
            # run's "sent". Row locks are taken in id order, as `usage.rejections.mark_rejected`
            # takes them, so the two writers cannot deadlock: by the delivered rows' UPDATE
            # alone (`begin_record`), or, when rows are also updated one by one, all first.
            if updates:
                session.execute(
                    sa.select(UsageSubmission.id)
                    .where(
                        id_in(
                            UsageSubmission.id, delivered_ids + [u["id"] for u in updates], dialect
                        )
                    )
                    .order_by(UsageSubmission.id)
                    .with_for_update()
                ).all()
            if delivered_ids:
                session.execute(
                    sa.update(UsageSubmission)
                    .where(pending_among(delivered_ids, dialect))
                    .values(UsageSubmission.sent_values(now))
                    .execution_options(synchronize_session=False)
                )
            if updates:
                session.execute(
                    sa.update(UsageSubmission)
                    .where(still_pending())
                    .execution_options(synchronize_session=None),
                    updates,
                )

    def _count(self, row: OutboxRow, outcome: str, error: str | None) -> None:
        result = self.result
        if outcome in (STOPPED, SKIPPED):
            result.submissions_stopped += 1
        elif outcome in DELIVERED:
            result.submissions_sent += 1
            if outcome == MeterEventOutcome.DUPLICATE:
                result.submissions_already_delivered += 1
            billed = result.billed_value
            billed[row.event_type] = billed.get(row.event_type, 0) + row.value
        elif outcome == SubmissionStatus.FAILED.value:
            result.submissions_failed += 1
            result.last_error = error
        else:
            result.submissions_pending += 1
            result.last_error = error
