"""The v2 sender (`STRIPE_METER_EVENT_API=v2`): pending outbox rows go out on Stripe's meter
event stream, up to 100 per request.

Rows are dealt to the submit lanes by (customer, meter), so one pair's rows are sent by one lane
in order (one request in flight per pair, in case v1's rule applies to the stream too [?]); each
lane sends its rows in requests of 100. Stripe answers `{}` and validates later, so an answered
request makes its rows `sent`; refusals arrive as error reports (`usage.rejections`). A lane
records its answered rows every `RECORD_ROWS` rows and at its end, in one set-based UPDATE that
moves only rows still `pending` (a meter error report's `rejected` stands), committed without
waiting for the WAL flush: a mark lost to a database crash leaves its rows pending, and their
re-send carries the same identifiers, which Stripe dedupes, as after a flush killed between the
answer and the record. One transaction per request cost a commit per 100 rows (10,000 for a
million groups).

A transient failure (429, 5xx, connection) re-sends the whole request within the call budget:
the rows' identifiers make the re-send harmless, as after a crash. Logging is per request
(`api: "v2"`, `events: n`); a request that fails for good logs one failure line per event.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from billing import logs
from billing.models import SubmissionStatus, UsageSubmission, begin_record, pending_among
from billing.stripe_gateway import (
    MAX_STREAM_EVENTS,
    REPOINTED_SCOPES,
    ErrorScope,
    MeterEvent,
    PermanentStripeError,
    StripeGateway,
    StripeGatewayError,
    TransientStripeError,
)
from billing.usage.result import FlushResult

API = "v2"
# Answered rows a lane holds before recording them: at most this many re-sent after a crash.
RECORD_ROWS = 1_000
# Rows the submitter hands over at a time: every lane waits for the slowest at a chunk's end,
# and each lane's last request of a chunk is short (5,000 rows over 8 lanes: 11,200 requests
# for a million groups instead of 10,000).
LOAD_ROWS = 20_000


def deal(rows: Sequence[UsageSubmission], lane_count: int) -> list[list[UsageSubmission]]:
    """The rows in id order, dealt to at most `lane_count` lanes by (customer, meter) in runs:
    each lane takes new pairs until it holds its share of the rows, so a lane's rows are mostly
    one stretch of ids. Dealt pair by pair in turn, every lane's 1,000-row record spanned
    `lane_count` times as many ids, read and written pages shared with the other lanes, and the
    records of a million rows took 1.35x as long (39.8 s against 29.6 s, one after another)."""
    share = -(-len(rows) // max(1, lane_count))
    pairs: dict[tuple[str, str], int] = {}
    lanes: list[list[UsageSubmission]] = [[]]
    for row in sorted(rows, key=lambda r: r.id):
        key = (row.stripe_customer_id, row.event_name)
        lane = pairs.get(key)
        if lane is None:
            if len(lanes[-1]) >= share and len(lanes) < lane_count:
                lanes.append([])
            lane = pairs[key] = len(lanes) - 1
        lanes[lane].append(row)
    return [lane for lane in lanes if lane]


class StreamSender:
    """Sends one pass's rows on the v2 stream with the submitter's lanes, stops and retries."""

    def __init__(
        self,
        gateway: StripeGateway,
        sessions: sessionmaker[Session],
        stops: Any,  # usage.submitting.Stops (not imported: submitting imports this module)
        result: FlushResult,
        *,
        clock: Callable[[], datetime],
        lanes: ThreadPoolExecutor,
        lane_count: int,
        retrying: Callable[[Callable[[], Any]], Any],
        call_attempts: int,
        lane_log: logs.LaneLog,
    ) -> None:
        self.gateway = gateway
        self.sessions = sessions
        self.stops = stops
        self.result = result
        self.clock = clock
        self.lanes = lanes
        self.lane_count = max(1, lane_count)
        self.retrying = retrying
        self.call_attempts = call_attempts
        self.log = lane_log
        # Lanes count into the one run result at once: a read-add-write of a total must not
        # interleave with another lane's, or a count is lost.
        self._counting = threading.Lock()

    def submit(self, rows: Sequence[UsageSubmission]) -> None:
        send_lane = logs.carry_context(self._send_lane)
        try:
            list(self.lanes.map(send_lane, deal(rows, self.lane_count)))
        finally:
            self.log.flush()  # the chunk's lines are out before the next chunk is dealt

    def _send_lane(self, rows: list[UsageSubmission]) -> None:
        answered: list[UsageSubmission] = []
        try:
            for start in range(0, len(rows), MAX_STREAM_EVENTS):
                chunk = [r for r in rows[start : start + MAX_STREAM_EVENTS] if self._sendable(r)]
                if chunk and self._send_request(chunk):
                    answered.extend(chunk)
                if len(answered) >= RECORD_ROWS:
                    self._record_sent(answered)
                    answered = []
        finally:
            if answered:
                self._record_sent(answered)

    def _sendable(self, row: UsageSubmission) -> bool:
        if self.call_attempts >= 1 and self.stops.covering(row) is None:
            return True
        with self._counting:
            self.result.submissions_stopped += 1  # left pending, untouched, for the next run
        return False

    def _send_request(self, rows: list[UsageSubmission]) -> bool:
        """Send one request (retried whole); True when Stripe answered it."""
        events = [MeterEvent.of_row(r) for r in rows]
        attempt = 0

        def send() -> None:
            nonlocal attempt
            attempt += 1
            self.log.info(
                logs.METER_SUBMIT_ATTEMPT, {"api": API, "events": len(events), "attempt": attempt}
            )
            self.gateway.send_meter_event_batch(events)

        try:
            self.retrying(send)
        except StripeGatewayError as error:
            self._failed(rows, error)
            return False
        self.log.info(logs.METER_SUBMIT_SUCCEEDED, {"api": API, "events": len(events)})
        return True

    def _record_sent(self, rows: list[UsageSubmission]) -> None:
        now = self.clock()
        with self.sessions.begin() as session:
            dialect = begin_record(session)
            sent = session.execute(
                sa.update(UsageSubmission)
                .where(pending_among([r.id for r in rows], dialect))
                .values(UsageSubmission.sent_values(now))
                .returning(UsageSubmission.id)
            ).scalars()
            recorded = set(sent)
            # Rows re-pointed at a fixed meter or customer (`Submitter._repoint`) keep the names
            # they were sent under.
            repointed = [
                {"id": r.id, "event_name": r.event_name, "stripe_customer_id": r.stripe_customer_id}
                for r in rows
                if r.id in recorded and r.last_error_scope in REPOINTED_SCOPES
            ]
            if repointed:
                session.execute(sa.update(UsageSubmission), repointed)
        self._count_sent([r for r in rows if r.id in recorded])

    def _count_sent(self, rows: list[UsageSubmission]) -> None:
        with self._counting:
            self.result.submissions_sent += len(rows)
            billed = self.result.billed_value
            for row in rows:
                billed[row.event_type] = billed.get(row.event_type, 0) + row.value

    def _failed(self, rows: list[UsageSubmission], error: StripeGatewayError) -> None:
        transient = isinstance(error, TransientStripeError)
        write = self.log.warning if transient else self.log.error
        for row in rows:
            write(
                logs.METER_SUBMIT_FAILED,
                {
                    "api": API,
                    "organization_id": row.organization_id,
                    "idempotency_key": row.idempotency_key,
                    "event_name": row.event_name,
                    "value": row.value,
                    "identifier": row.identifier,
                    "error": str(error),
                    "transient": transient,
                    "scope": error.scope,
                },
            )
        if isinstance(error, PermanentStripeError) and error.scope != ErrorScope.ROW:
            self.stops.stop(error, rows[0])  # the key or the account: rows stay pending
            with self._counting:
                self.result.submissions_stopped += len(rows)
            return
        status = SubmissionStatus.PENDING if transient else SubmissionStatus.FAILED
        now = self.clock()
        with self.sessions.begin() as session:
            dialect = begin_record(session)
            session.execute(
                sa.update(UsageSubmission)
                .where(pending_among([r.id for r in rows], dialect))
                .values(
                    status=status.value,
                    attempts=UsageSubmission.attempts + 1,
                    last_error=str(error),
                    last_error_scope=None if transient else ErrorScope.ROW.value,
                    updated_at=now,
                    key_generation=UsageSubmission.key_generation + (0 if transient else 1),
                )
            )
        with self._counting:
            if transient:
                self.result.submissions_pending += len(rows)
            else:
                self.result.submissions_failed += len(rows)
            self.result.last_error = str(error)
