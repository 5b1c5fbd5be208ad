"""Flush benchmark: the hourly flush of a PostgreSQL backlog to the emulator at Stripe's ceiling.

For every backlog size and organization count it builds a fresh schema, puts `size` events of
2 or 3 meters per organization over the last `--hours` whole hours into a staging table, then side
by side in one run:

- **insert**: a plain `INSERT … SELECT` of that backlog into `billable_events` (the baseline: the
  cheapest thing one can do with every row), and
- **flush**: `flush_pass` in a fresh child process (so its peak RSS is its own), against the Stripe
  emulator with `--limits` (default `live`: 1,000 meter events/s, as Stripe in live mode) and the
  client's rate limit at that ceiling, logging at INFO as in production (to a file).

It prints and writes (`--output`, default bench/results/flush.json): wall time, per-event cost
(µs/event), its ratio to the smallest size of the same organization count (1.0 = linear), the
flush/insert ratio, database time per phase (claim = pick + link rows, aggregate, outbox insert,
submit), meter-event calls / customer·meter·hour groups, 429s seen, peak RSS, and whether the
totals Stripe billed per customer and meter equal the database's. A flush child that fails
stops the bench with exit 1 and its stderr (the traceback) and log path shown; no report is written.

    .venv/bin/python bench/flush.py [--sizes 100000,1000000,5000000] [--orgs 100,1000]
        [--hours 3] [--limits live] [--quick] [--output PATH]

Two more shapes, each side by side in one run:

- `--submit` (the submit phase alone: one process's calls/s and CPU per call). The backlog (first
  of `--sizes`/`--orgs`, default 20,000 events over 1,000 organizations: 7,380 groups) is claimed
  into the outbox by a pass that sends nothing; then, `--rounds` times in turn, each variant
  re-sends every outbox row (re-armed with new identifiers between variants): `this` (the
  flush of this tree), `baseline` (the same flush of another checkout, `--baseline PATH`, e.g.
  main), and `plain` (a sequential loop of stripe-python's `meter_events.create`, one call at a
  time, three customers, no logging: what one process can do with the library alone). Each
  prints calls/s, CPU ms per call (the child's user+sys over the phase), the emulator's CPU ms per
  call, and the load average. Output: bench/results/flush-submit.json.
- `--groups N[,N…]` (claiming many distinct customer·meter·hour groups: one event per group,
  `--meters` meters, `--hours` hours). Per phase: the plain insert of the events, the claim (a
  pass that claims everything and sends nothing: wall, CPU, peak RSS, database time per
  statement kind), the status updates (a pass that loads, "sends" through a gateway that accepts
  without a call, and records every row as sent; logging at WARNING), and a plain
  `INSERT … SELECT` of the same outbox rows into a copy of the table (the baseline the claim is
  held to). Output: bench/results/flush-groups.json.

    .venv/bin/python bench/flush.py --submit [--rounds 2] [--baseline /path/to/main]
    .venv/bin/python bench/flush.py --groups 200000,1000000 [--meters 5] [--hours 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATABASE_URL = os.environ.get(
    "BILLING_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
SCHEMA = f"billing_bench_flush_{os.getpid()}"
METERS = ("api_call", "storage_gb_hour", "ai_tokens")
GROUP_METERS = (*METERS, "seats", "exports")  # --groups: up to 5 meters per organization
RESULTS = ROOT / "bench" / "results" / "flush.json"
SUBMIT_RESULTS = ROOT / "bench" / "results" / "flush-submit.json"
GROUPS_RESULTS = ROOT / "bench" / "results" / "flush-groups.json"
# What a live key gets by default (STRIPE_METER_EVENT_RATE_PER_SECOND): under the 1,000/s ceiling.
LIVE_KEY_CLIENT_RATE = 900.0
BATCH_SIZE = 5000  # STRIPE_USAGE_FLUSH_BATCH_SIZE's default
QUICK = {"sizes": "20000,100000", "orgs": "100,1000"}
SUBMIT_SHAPE = {"sizes": "20000", "orgs": "1000"}  # 7,380 groups over 3 hours

# Which phase a statement belongs to, by its text (the bench never imports flush internals).
PHASES = (
    ("claim_statement", re.compile(r"^\s*WITH picked\b", re.I)),
    ("aggregate", re.compile(r"\bsum\(", re.I)),
    ("outbox", re.compile(r"^\s*(WITH\b.*)?INSERT INTO usage_submissions", re.I | re.S)),
    ("claim", re.compile(r"FOR UPDATE|^\s*UPDATE billable_events", re.I)),
    ("record", re.compile(r"^\s*UPDATE usage_submissions", re.I)),
    ("load", re.compile(r"^\s*SELECT usage_submissions\.", re.I)),
)


def _settings(
    api_base: str, schema: str, rate: float, meters: tuple[str, ...] = METERS, **overrides: Any
):
    from billing import db
    from billing.config import Settings, parse_meter_map

    return Settings(
        billing_enabled=True,
        stripe_secret_key="sk_test_bench_flush_0000",
        stripe_api_base=api_base,
        stripe_meters=parse_meter_map("STRIPE_BILLING_METERS", ",".join(meters)),
        stripe_meter_event_rate_per_second=rate,
        database_url=db.with_search_path(DATABASE_URL, schema),
        validate_contract_before_flush=False,
        **overrides,
    )


def _control(api_base: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"{api_base}/_emulator/{path}",
        data=None if body is None else json.dumps(body).encode(),
        method="GET" if body is None else "POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


# Parent: one emulator, a fresh schema per run ---------------------------------------------------


def _fresh_runtime(api_base: str, schema: str, meters: tuple[str, ...]) -> Any:
    """A reset emulator (no rate ceilings) with the meters, and a fresh, migrated schema."""
    from billing import db
    from billing.runtime import Runtime

    _control(api_base, "reset", {})
    _control(api_base, "limits", {"preset": "off"})
    admin = db.make_engine(DATABASE_URL)
    with admin.begin() as connection:
        connection.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
    admin.dispose()
    runtime = Runtime(_settings(api_base, schema, 100_000, meters))
    db.upgrade(runtime.engine)
    for event_name in meters:
        runtime.stripe.ensure_meter(event_name)
    return runtime


def prepare(api_base: str, schema: str, size: int, orgs: int, hours: int) -> dict[str, Any]:
    """Fresh schema, meters and customers; the backlog in a staging table; then the timed
    INSERT … SELECT of it into billable_events (the baseline)."""
    from billing.models import BillingAccount

    runtime = _fresh_runtime(api_base, schema, METERS)
    with runtime.session_factory.begin() as session:
        for org in range(1, orgs + 1):
            customer = runtime.stripe.create_customer(f"Bench org {org}", org)
            session.add(BillingAccount(organization_id=org, stripe_customer_id=customer.id))
    seconds = hours * 3600
    with runtime.engine.begin() as connection:
        # Odd organizations use three meters, even ones two; events spread evenly over the
        # last `hours` whole hours, so groups = orgs * 2.5 * hours.
        connection.exec_driver_sql(
            f"CREATE TABLE bench_backlog AS SELECT 1 + mod(i, {orgs}) AS organization_id, "
            "(ARRAY['api_call','storage_gb_hour','ai_tokens'])"
            f"[1 + mod(i / {orgs}, 2 + mod(1 + mod(i, {orgs}), 2))] AS event_type, "
            "1 + mod(i, 7) AS quantity, "
            f"date_trunc('hour', now()) - interval '{hours} hours' "
            f"+ mod(i::bigint * 7919, {seconds}) * interval '1 second' AS occurred_at, "
            "'zeitgeist'::text AS source, 'bench-' || i AS idempotency_key, now() AS created_at "
            f"FROM generate_series(1, {int(size)}) AS i"
        )
        connection.exec_driver_sql("ANALYZE bench_backlog")
    insert_seconds = _insert_backlog(runtime)
    with runtime.engine.begin() as connection:
        expected = {
            (customer, event_type): int(total)
            for customer, event_type, total in connection.exec_driver_sql(
                "SELECT a.stripe_customer_id, e.event_type, sum(e.quantity) "
                "FROM billable_events e JOIN billing_accounts a USING (organization_id) "
                "GROUP BY 1, 2"
            )
        }
        groups = connection.exec_driver_sql(
            "SELECT count(*) FROM (SELECT DISTINCT organization_id, event_type, "
            "date_trunc('hour', occurred_at) FROM billable_events) AS g"
        ).scalar_one()
        connection.exec_driver_sql("CHECKPOINT")
    runtime.close()
    return {"insert_seconds": insert_seconds, "groups": int(groups), "expected": expected}


def _insert_backlog(runtime: Any) -> float:
    """The baseline: a timed plain INSERT … SELECT of the staged backlog into billable_events
    (after a checkpoint, so it does not pay for the staging's writes); seconds."""
    with runtime.engine.begin() as connection:
        connection.exec_driver_sql("CHECKPOINT")
    started = time.monotonic()
    with runtime.engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO billable_events (organization_id, event_type, quantity, occurred_at, "
            "source, idempotency_key, created_at) SELECT organization_id, event_type, quantity, "
            "occurred_at, source, idempotency_key, created_at FROM bench_backlog"
        )
    seconds = time.monotonic() - started
    with runtime.engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE bench_backlog")
        connection.exec_driver_sql("ANALYZE billable_events")
    return seconds


def check_database(schema: str) -> dict[str, int]:
    from billing import db

    engine = db.make_engine(db.with_search_path(DATABASE_URL, schema))
    with engine.connect() as connection:
        unclaimed = connection.exec_driver_sql(
            "SELECT count(*) FROM billable_events WHERE usage_submission_id IS NULL"
        ).scalar_one()
        unsent = connection.exec_driver_sql(
            "SELECT count(*) FROM usage_submissions WHERE status <> 'sent'"
        ).scalar_one()
    engine.dispose()
    return {"unclaimed": int(unclaimed), "unsent": int(unsent)}


class ChildFailed(RuntimeError):
    """The flush child exited non-zero; the message carries its stderr (the traceback)."""


def run_one(args: argparse.Namespace, api_base: str, size: int, orgs: int) -> dict[str, Any]:
    schema = SCHEMA
    prepared = prepare(api_base, schema, size, orgs, args.hours)
    _control(api_base, "limits", {"preset": args.limits})
    _control(api_base, "stats/reset", {})
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            "flush",
            "--api-base",
            api_base,
            "--schema",
            schema,
            "--rate",
            str(args.rate),
            "--log-level",
            args.log_level,
            "--sample-every",
            str(max(1, size // BATCH_SIZE // 4)),
        ],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise ChildFailed(f"flush child failed (exit {out.returncode}):\n{out.stderr.rstrip()}")
    flush = json.loads(out.stdout.strip().splitlines()[-1])
    stats = _control(api_base, "stats")
    by_status = stats["responses"].get("POST /v1/billing/meter_events", {})
    billed = {
        (customer, event): int(value)
        for customer, meters in stats["billed"].items()
        for event, value in meters.items()
    }
    database = check_database(schema)
    exact = billed == prepared["expected"] and database == {"unclaimed": 0, "unsent": 0}
    calls = sum(by_status.values())
    return {
        "events": size,
        "orgs": orgs,
        "groups": prepared["groups"],
        "calls": calls,
        "calls_per_group": calls / prepared["groups"],
        "rate_limited_429": by_status.get("429", 0),
        "insert_seconds": prepared["insert_seconds"],
        "flush_seconds": flush["wall_seconds"],
        "flush_per_insert": flush["wall_seconds"] / prepared["insert_seconds"],
        "us_per_event": flush["wall_seconds"] / size * 1e6,
        "insert_us_per_event": prepared["insert_seconds"] / size * 1e6,
        "phases_seconds": flush["phases_seconds"],
        "explain_samples": flush["explain_samples"],
        "peak_rss_mb": flush["peak_rss_mb"],
        "log_lines": flush["log_lines"],
        "log_bytes": flush["log_bytes"],
        "batches": flush["batches"],
        "totals_exact": exact,
        "database": database,
    }


# Child: one flush, instrumented from the outside ------------------------------------------------


class PhaseClock:
    """Database time per statement kind, from SQLAlchemy's cursor events.

    On PostgreSQL a batch is one statement (pick, aggregate, outbox, link). To split it, a few
    sampled batches are first run under `EXPLAIN (ANALYZE, BUFFERS)` inside a savepoint that is
    rolled back; each plan node's own time is put in its phase, and the statement time is split in
    the sampled proportions. The sampling time is measured and left out of the flush's wall time.
    """

    def __init__(self, sample_every: int) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.sampled: dict[str, float] = defaultdict(float)
        self.samples: list[dict[str, Any]] = []
        self.sampling_seconds = 0.0
        self.sample_every = sample_every  # 0: no sampling, statement times only
        self._claims = 0
        self._local = threading.local()

    def install(self, engine: Any) -> None:
        from sqlalchemy import event

        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)

    def _before(self, conn, cursor, statement, parameters, context, executemany) -> None:
        if PHASES[0][1].search(statement):
            self._claims += 1
            every = self.sample_every
            if every and (self._claims % every == 1 or every == 1):
                self._explain(cursor, statement, parameters)
        self._local.started = time.perf_counter()

    def _after(self, conn, cursor, statement, parameters, context, executemany) -> None:
        elapsed = time.perf_counter() - self._local.started
        for phase, pattern in PHASES:
            if pattern.search(statement):
                self.seconds[phase] += elapsed
                return
        self.seconds["other_sql"] += elapsed

    def _explain(self, cursor, statement, parameters) -> None:
        started = time.perf_counter()
        cursor.execute("SAVEPOINT bench_explain")
        cursor.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement, parameters)
        plan = cursor.fetchone()[0][0]
        cursor.execute("ROLLBACK TO SAVEPOINT bench_explain")
        self.sampling_seconds += time.perf_counter() - started
        own: dict[str, float] = defaultdict(float)
        _walk(plan["Plan"], "other", own)
        for trigger in plan.get("Triggers", []):  # the foreign key check of the link
            own["claim"] += trigger["Time"]
        for phase, ms in own.items():
            self.sampled[phase] += ms
        picked = _find(plan["Plan"], "CTE picked") or {}
        self.samples.append(
            {
                "batch": self._claims,
                "execution_ms": plan["Execution Time"],
                "shared_hit_buffers": plan["Plan"].get("Shared Hit Blocks", 0),
                "pick_ms": picked.get("Actual Total Time") if picked.get("Actual Rows") else None,
                "pick_buffers": picked.get("Shared Hit Blocks", 0)
                + picked.get("Shared Read Blocks", 0),
            }
        )

    def phases(self) -> dict[str, float]:
        """Seconds per phase; the one-statement claim split in the sampled proportions."""
        phases = {k: v for k, v in self.seconds.items() if k != "claim_statement"}
        statement = self.seconds.get("claim_statement", 0.0)
        total = sum(self.sampled.values())
        if not total:
            return {**phases, "claim_statement": statement} if statement else phases
        for phase, ms in self.sampled.items():
            phases[phase] = phases.get(phase, 0.0) + statement * ms / total
        return phases


# Which phase a plan node's own time belongs to: by the CTE it sits in, or its node type.
CTE_PHASES = {
    "CTE picked": "claim",
    "CTE windowed": "aggregate",
    "CTE outbox": "outbox",
    "CTE linked": "claim",
}


def _walk(node: dict[str, Any], phase: str, own: dict[str, float]) -> None:
    phase = CTE_PHASES.get(node.get("Subplan Name", ""), phase)
    if node["Node Type"] == "Aggregate" and phase == "outbox":
        phase = "aggregate"
    children = node.get("Plans", [])
    if node["Node Type"] != "CTE Scan":  # a CTE's rows are produced (and timed) in its subplan
        total = node.get("Actual Total Time", 0.0) * node.get("Actual Loops", 1)
        # A scalar subquery (InitPlan) runs inside its parent's time; a CTE is timed where a CTE
        # Scan pulls it, so only its own subplan counts it.
        inner = sum(
            c.get("Actual Total Time", 0.0) * c.get("Actual Loops", 1)
            for c in children
            if not c.get("Subplan Name", "").startswith("CTE ")
        )
        own[phase] += max(0.0, total - inner)
    for child in children:
        _walk(child, phase, own)


def _find(node: dict[str, Any], name: str) -> dict[str, Any] | None:
    if node.get("Subplan Name") == name:
        return node
    for child in node.get("Plans", []):
        found = _find(child, name)
        if found is not None:
            return found
    return None


def child(args: argparse.Namespace) -> None:
    log_path = Path(f"/tmp/billing-bench-flush-{os.getpid()}.log")
    try:
        result, wall, clock, submitting = _timed_flush(args, log_path)
    except BaseException:
        print(f"the flush's log: {log_path}", file=sys.stderr)  # kept, for the post-mortem
        raise
    log_bytes = log_path.stat().st_size
    with log_path.open() as log_file:
        log_lines = sum(1 for _ in log_file)
    log_path.unlink()
    phases = clock.phases()
    phases["submit"] = submitting["seconds"]
    print(
        json.dumps(
            {
                "wall_seconds": wall,
                "ok": result.ok,
                "events": result.events_claimed,
                "batches": result.batches,
                "phases_seconds": phases,
                "explain_samples": clock.samples,
                "peak_rss_mb": peak_rss_mb(),
                "log_lines": log_lines,
                "log_bytes": log_bytes,
            }
        )
    )


def _timed_flush(args: argparse.Namespace, log_path: Path) -> tuple[Any, float, PhaseClock, dict]:
    from billing import logs
    from billing.runtime import Runtime
    from billing.usage.service import flush_pass
    from billing.usage.submitting import Submitter

    with log_path.open("w") as log_file:
        logs.configure_logging(args.log_level, "json", stream=log_file)
        runtime = Runtime(_settings(args.api_base, args.schema, args.rate))
        clock = PhaseClock(sample_every=args.sample_every)
        clock.install(runtime.engine)
        submitting = {"seconds": 0.0}
        submit = Submitter.submit

        def timed_submit(self, submission_ids):  # wall time sending (overlaps the claims)
            started = time.perf_counter()
            try:
                return submit(self, submission_ids)
            finally:
                submitting["seconds"] += time.perf_counter() - started

        Submitter.submit = timed_submit
        started = time.monotonic()
        result = flush_pass(runtime, contract_check=False)
        wall = time.monotonic() - started - clock.sampling_seconds
        runtime.close()
    return result, wall, clock, submitting


# Children of the side-by-side shapes: one phase each, timed from the inside --------------------


def _cpu_seconds() -> tuple[float, float]:
    """(user + system, system) CPU seconds of this process so far, every thread included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, usage.ru_stime


def peak_rss_mb() -> float:
    """This process's peak resident set since it was started (exec'd), in MB.

    Not `ru_maxrss`: Linux carries it across exec, so a child started by this bench reported the
    bench's own peak (432 MB for a million groups, whose expected totals the parent holds), not
    its own (VmHWM, and an outside sampler of VmRSS every 0.5 s: 155 MB)."""
    try:
        return process_peak_rss_mb("self")
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def process_peak_rss_mb(pid: int | str) -> float:
    """A process's peak resident set (VmHWM from /proc), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmHWM for process {pid}")


def _timed(fn: Any) -> tuple[Any, dict[str, float]]:
    (cpu0, sys0), started = _cpu_seconds(), time.perf_counter()
    value = fn()
    wall = time.perf_counter() - started
    cpu1, sys1 = _cpu_seconds()
    return value, {"wall_seconds": wall, "cpu_seconds": cpu1 - cpu0, "sys_seconds": sys1 - sys0}


def child_phase(args: argparse.Namespace) -> None:
    """`claim`: a pass that claims everything and sends nothing; `submit`: a pass whose only
    work is re-sending the pending outbox rows (logging as `--log-level` says, to a file);
    `status`: the same with a gateway that accepts every event without a call."""
    from billing import logs
    from billing.runtime import Runtime
    from billing.stripe_gateway import MeterEventOutcome
    from billing.usage.service import flush_pass

    meters = GROUP_METERS[: args.meters] if args.child != "submit" else METERS
    log_path = Path(f"/tmp/billing-bench-flush-{os.getpid()}.log")
    level = args.log_level if args.child == "submit" else "WARNING"
    with log_path.open("w") as log_file:
        logs.configure_logging(level, "json", stream=log_file)
        runtime = Runtime(_settings(args.api_base, args.schema, args.rate, meters))
        # The claim's one statement is split into its phases by sampling every batch's plan.
        clock = PhaseClock(sample_every=args.sample_every if args.child == "claim" else 0)
        clock.install(runtime.engine)
        gateway = runtime.stripe  # built before the clock starts
        if args.child == "status":
            gateway.send_meter_event = lambda event: MeterEventOutcome.ACCEPTED
        attempts = 0 if args.child == "claim" else 5
        result, figures = _timed(
            lambda: flush_pass(runtime, contract_check=False, call_attempts=attempts)
        )
        figures["wall_seconds"] -= clock.sampling_seconds
        runtime.close()
    with log_path.open() as log_file:
        log_lines = sum(1 for _ in log_file)
    log_path.unlink()
    print(
        json.dumps(
            {
                **figures,
                "events": result.events_claimed,
                "batches": result.batches,
                "sent": result.submissions_sent,
                "pending": result.submissions_pending,
                "phases_seconds": clock.phases(),
                "peak_rss_mb": peak_rss_mb(),
                "log_lines": log_lines,
            }
        )
    )


def child_plain(args: argparse.Namespace) -> None:
    """stripe-python alone: `meter_events.create` in a sequential loop, one call at a time,
    over three customers, a default client (its own HTTP session), no logging, no database."""
    import stripe

    client = stripe.StripeClient(
        "sk_test_bench_flush_0000",
        base_addresses={"api": args.api_base, "meter_events": args.api_base},
        max_network_retries=0,
    )
    customers = [c.id for c in client.v1.customers.list({"limit": 3}).data]
    stamp = int(time.time()) - 60
    tag = f"plain-{os.getpid()}"
    limited = 0

    def loop() -> None:
        nonlocal limited
        for i in range(args.calls):
            params = {
                "event_name": METERS[0],
                "identifier": f"{tag}-{i}",
                "timestamp": stamp,
                "payload": {"stripe_customer_id": customers[i % 3], "value": "1"},
            }
            while True:
                try:
                    client.v1.billing.meter_events.create(
                        params, {"idempotency_key": f"{tag}-{i}", "max_network_retries": 0}
                    )
                    break
                except stripe.RateLimitError:
                    limited += 1

    _, figures = _timed(loop)
    print(json.dumps({**figures, "sent": args.calls, "retried_429": limited}))


# Parent of the side-by-side shapes --------------------------------------------------------------


def _process_cpu(pid: int) -> float:
    """User + system CPU seconds of another process (the emulator), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _run_child(
    args: argparse.Namespace, api_base: str, mode: str, *, code: Path | None = None, **extra: Any
) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--api-base",
        api_base,
        "--schema",
        SCHEMA,
        "--rate",
        str(args.rate),
        "--log-level",
        args.log_level,
        "--meters",
        str(args.meters),
    ]
    if code is not None:
        command += ["--code", str(code)]
    for name, value in extra.items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise ChildFailed(f"{mode} child failed (exit {out.returncode}):\n{out.stderr.rstrip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _sql(statement: str) -> Any:
    from billing import db

    engine = db.make_engine(db.with_search_path(DATABASE_URL, SCHEMA))
    try:
        with engine.begin() as connection:
            result = connection.exec_driver_sql(statement)
            return result.scalar_one() if result.returns_rows else None
    finally:
        engine.dispose()


def _rearm(tag: str) -> int:
    """Every outbox row pending again under a new identifier: Stripe sees new events."""
    _sql(
        "UPDATE usage_submissions SET status = 'pending', sent_at = NULL, attempts = 0, "
        f"identifier = left(identifier, 80) || '-{tag}'"
    )
    _sql("CHECKPOINT")
    return int(_sql("SELECT count(*) FROM usage_submissions"))


SUBMIT_HEADER = (
    f"{'round':>5} {'variant':>8} | {'calls':>6} {'429':>4} {'wall s':>7} {'calls/s':>8} | "
    f"{'CPU ms/call':>11} {'sys':>5} {'emulator':>8} | {'log lines':>9} {'load1':>5} | exact"
)


def run_submit(args: argparse.Namespace, api_base: str, emulator_pid: int) -> dict[str, Any]:
    size, orgs = int(args.sizes.split(",")[0]), int(args.orgs.split(",")[0])
    prepared = prepare(api_base, SCHEMA, size, orgs, args.hours)
    claimed = _run_child(args, api_base, "claim")
    print(
        f"{size} events over {orgs} organizations: {prepared['groups']} groups, "
        f"{claimed['events']} claimed into the outbox in {claimed['wall_seconds']:.1f} s",
        flush=True,
    )
    _control(api_base, "limits", {"preset": args.limits})
    variants = ["baseline", "this", "plain"] if args.baseline else ["this", "plain"]
    rows: list[dict[str, Any]] = []
    print(SUBMIT_HEADER, flush=True)
    for round_ in range(1, args.rounds + 1):
        for variant in variants:
            calls = _rearm(f"r{round_}{variant[0]}")
            _control(api_base, "stats/reset", {})
            load_before, emulator_before = os.getloadavg()[0], _process_cpu(emulator_pid)
            if variant == "plain":
                out = _run_child(args, api_base, "plain", calls=calls)
            else:
                code = args.baseline if variant == "baseline" else None
                out = _run_child(args, api_base, "submit", code=code)
            emulator_cpu = _process_cpu(emulator_pid) - emulator_before
            stats = _control(api_base, "stats")
            by_status = stats["responses"].get("POST /v1/billing/meter_events", {})
            accepted = by_status.get("200", 0)
            unsent = int(_sql("SELECT count(*) FROM usage_submissions WHERE status <> 'sent'"))
            exact = accepted == calls and (variant == "plain" or unsent == 0)
            row = {
                "round": round_,
                "variant": variant,
                "calls": calls,
                "rate_limited_429": by_status.get("429", 0),
                "wall_seconds": out["wall_seconds"],
                "calls_per_second": calls / out["wall_seconds"],
                "cpu_ms_per_call": out["cpu_seconds"] / calls * 1000,
                "sys_ms_per_call": out["sys_seconds"] / calls * 1000,
                "emulator_cpu_ms_per_call": emulator_cpu / calls * 1000,
                "log_lines": out.get("log_lines", 0),
                "load1_before": load_before,
                "load1_after": os.getloadavg()[0],
                "exact": exact,
            }
            rows.append(row)
            print(
                f"{round_:>5} {variant:>8} | {calls:>6} {row['rate_limited_429']:>4} "
                f"{row['wall_seconds']:>7.2f} {row['calls_per_second']:>8.0f} | "
                f"{row['cpu_ms_per_call']:>11.3f} {row['sys_ms_per_call']:>5.2f} "
                f"{row['emulator_cpu_ms_per_call']:>8.3f} | {row['log_lines']:>9} "
                f"{load_before:>5.1f} | {'yes' if exact else 'NO'}",
                flush=True,
            )
    summary = _submit_ratios(rows)
    for line in summary["lines"]:
        print(line)
    return {
        "shape": {"events": size, "orgs": orgs, "hours": args.hours, "groups": prepared["groups"]},
        "baseline": str(args.baseline) if args.baseline else None,
        "runs": rows,
        "ratios": summary["ratios"],
        "exact": all(row["exact"] for row in rows),
    }


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _submit_ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per variant, and `this` against the others (ratios from the same run)."""
    medians = {
        variant: {
            key: _median([r[key] for r in rows if r["variant"] == variant])
            for key in ("calls_per_second", "cpu_ms_per_call")
        }
        for variant in dict.fromkeys(r["variant"] for r in rows)
    }
    ratios: dict[str, float] = {}
    lines = []
    this = medians["this"]
    for other in (v for v in medians if v != "this"):
        speed = this["calls_per_second"] / medians[other]["calls_per_second"]
        cpu = this["cpu_ms_per_call"] / medians[other]["cpu_ms_per_call"]
        ratios[f"this_per_{other}_calls_per_second"] = speed
        ratios[f"this_per_{other}_cpu_per_call"] = cpu
        lines.append(f"this / {other}: calls/s x{speed:.2f}, CPU per call x{cpu:.2f} (medians)")
    return {"ratios": ratios, "medians": medians, "lines": lines}


def prepare_groups(api_base: str, groups: int, meters: int, hours: int) -> dict[str, Any]:
    """One event per organization·meter·hour (so events = groups); accounts written directly
    (nothing is sent to Stripe in this shape, the meters only have to exist); then the timed
    plain insert of the events."""
    orgs = max(1, groups // meters // hours)
    names = GROUP_METERS[:meters]
    runtime = _fresh_runtime(api_base, SCHEMA, names)
    kinds = "ARRAY[" + ",".join(f"'{n}'" for n in names) + "]"
    with runtime.engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO billing_accounts (organization_id, stripe_customer_id, created_at, "
            f"updated_at) SELECT i, 'cus_bench_' || i, now(), now() "
            f"FROM generate_series(1, {orgs}) AS i"
        )
        # Row i: organization 1 + i / (meters * hours), meter i % meters, hour (i / meters) % hours.
        connection.exec_driver_sql(
            f"CREATE TABLE bench_backlog AS SELECT 1 + i / {meters * hours} AS organization_id, "
            f"({kinds})[1 + mod(i, {meters})] AS event_type, 1 + mod(i, 7) AS quantity, "
            f"date_trunc('hour', now()) - interval '{hours} hours' "
            f"+ mod(i / {meters}, {hours}) * interval '1 hour' "
            "+ mod(i, 3000) * interval '1 second' AS occurred_at, "
            "'zeitgeist'::text AS source, 'bench-' || i AS idempotency_key, now() AS created_at "
            f"FROM generate_series(0, {orgs * meters * hours - 1}) AS i"
        )
        connection.exec_driver_sql("ANALYZE bench_backlog")
    insert_seconds = _insert_backlog(runtime)
    with runtime.engine.begin() as connection:
        connection.exec_driver_sql("CHECKPOINT")
    runtime.close()
    return {"orgs": orgs, "events": orgs * meters * hours, "insert_events_seconds": insert_seconds}


def _plain_outbox_insert() -> float:
    """A plain INSERT … SELECT of the outbox rows into a copy of the table (its indexes too)."""
    _sql("CREATE TABLE outbox_copy (LIKE usage_submissions INCLUDING ALL)")
    _sql("CHECKPOINT")
    started = time.monotonic()
    _sql("INSERT INTO outbox_copy SELECT * FROM usage_submissions")
    seconds = time.monotonic() - started
    _sql("DROP TABLE outbox_copy")
    _sql("CHECKPOINT")
    return seconds


GROUPS_HEADER = (
    f"{'groups':>9} {'code':>8} | {'insert ev s':>11} {'plain outbox s':>14} | "
    f"{'claim s':>8} {'x plain':>7} {'CPU s':>6} {'RSS MB':>6} | "
    f"{'pick+link':>9} {'aggr':>5} {'outbox':>6} | "
    f"{'status s':>8} {'x plain':>7} {'record s':>8} {'CPU s':>6} {'RSS MB':>6} | "
    f"{'outbox+record x plain':>21} | {'us/group':>8} {'load1':>5} | exact"
)


def run_groups(args: argparse.Namespace, api_base: str) -> dict[str, Any]:
    codes: list[tuple[str, Path | None]] = [("this", None)]
    if args.baseline:
        codes.insert(0, ("baseline", args.baseline))
    rows: list[dict[str, Any]] = []
    print(GROUPS_HEADER, flush=True)
    for groups in (int(g) for g in args.groups.split(",")):
        for name, code in codes:
            prepared = prepare_groups(api_base, groups, args.meters, args.hours)
            load_before = os.getloadavg()[0]
            claim = _run_child(args, api_base, "claim", code=code)
            plain = _plain_outbox_insert()
            status = _run_child(args, api_base, "status", code=code)
            outbox = int(_sql("SELECT count(*) FROM usage_submissions"))
            unsent = int(_sql("SELECT count(*) FROM usage_submissions WHERE status <> 'sent'"))
            unclaimed = int(
                _sql("SELECT count(*) FROM billable_events WHERE usage_submission_id IS NULL")
            )
            exact = outbox == prepared["events"] and unsent == 0 and unclaimed == 0
            claimed, recorded = claim["phases_seconds"], status["phases_seconds"]
            # The goal: the outbox insert and the status updates (the record's UPDATEs
            # and the row locks it takes first, which the statement regex files under "claim")
            # against the plain insert.
            outbox_and_record = (
                claimed.get("outbox", 0.0)
                + recorded.get("record", 0.0)
                + recorded.get("claim", 0.0)
            )
            row = {
                "groups": prepared["events"],
                "code": name,
                "orgs": prepared["orgs"],
                "insert_events_seconds": prepared["insert_events_seconds"],
                "plain_outbox_insert_seconds": plain,
                "claim": claim,
                "claim_per_plain": claim["wall_seconds"] / plain,
                "status": status,
                "status_per_plain": status["wall_seconds"] / plain,
                "outbox_and_record_per_plain": outbox_and_record / plain,
                "us_per_group": (claim["wall_seconds"] + status["wall_seconds"])
                / prepared["events"]
                * 1e6,
                "outbox_rows": outbox,
                "load1_before": load_before,
                "load1_after": os.getloadavg()[0],
                "exact": exact,
            }
            rows.append(row)
            print(
                f"{row['groups']:>9} {name:>8} | {row['insert_events_seconds']:>11.2f} "
                f"{plain:>14.2f} | {claim['wall_seconds']:>8.2f} {row['claim_per_plain']:>7.2f} "
                f"{claim['cpu_seconds']:>6.1f} {claim['peak_rss_mb']:>6.0f} | "
                f"{claimed.get('claim', 0.0):>9.2f} {claimed.get('aggregate', 0.0):>5.2f} "
                f"{claimed.get('outbox', 0.0):>6.2f} | "
                f"{status['wall_seconds']:>8.2f} {row['status_per_plain']:>7.2f} "
                f"{recorded.get('record', 0.0):>8.2f} "
                f"{status['cpu_seconds']:>6.1f} {status['peak_rss_mb']:>6.0f} | "
                f"{row['outbox_and_record_per_plain']:>21.2f} | "
                f"{row['us_per_group']:>8.1f} {load_before:>5.1f} | {'yes' if exact else 'NO'}",
                flush=True,
            )
    return {"meters": args.meters, "hours": args.hours, "runs": rows}


# Output -----------------------------------------------------------------------------------------


def _delegate(args: argparse.Namespace) -> int:
    """`--workers` runs bench/fanout.py on the first --sizes/--orgs shape; `--api` runs
    bench/stream.py on --groups (both APIs side by side: the ratio is the point)."""
    if args.workers:
        from bench import fanout

        shape = ["--workers", args.workers, "--limits", args.limits, "--rounds", str(args.rounds)]
        shape += ["--latency-ms", args.latency_ms]
        if args.sizes:
            shape += ["--events", args.sizes.split(",")[0]]
        if args.orgs:
            shape += ["--orgs", args.orgs.split(",")[0]]
        return fanout.main(shape + (["--quick"] if args.quick else []))
    from bench import stream

    return stream.main(
        ["--groups", args.groups or "2000,10000"] + (["--quick"] if args.quick else [])
    )


def start_emulator() -> tuple[subprocess.Popen, str]:
    """The emulator in a subprocess on a free port, answering: (process, its base URL)."""
    port = _free_port()
    api_base = f"http://127.0.0.1:{port}"
    emulator = subprocess.Popen(
        [sys.executable, "-m", "billing.emulator", "--port", str(port), "--quiet"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            _control(api_base, "stats")
            break
        except OSError:
            time.sleep(0.1)
    return emulator, api_base


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HEADER = (
    f"{'events':>9} {'orgs':>5} | {'insert s':>8} {'flush s':>8} {'flush/ins':>9} | "
    f"{'us/ev':>6} {'lin':>5} | {'claim':>6} {'aggr':>5} {'outbox':>6} {'submit':>7} | "
    f"{'pick ms first..last':>19} | "
    f"{'calls':>6} {'groups':>6} {'c/g':>5} {'429':>4} | {'RSS MB':>6} | exact"
)


def _pick_ms(row: dict[str, Any]) -> str:
    """The lock-and-pick step of the first and last sampled batch: flat if the plan is right."""
    samples = [x for x in row["explain_samples"] if x["pick_ms"] is not None]
    if not samples:
        return f"{'-':>19}"
    first, last = samples[0], samples[-1]
    return f"{first['pick_ms']:>8.1f}..{last['pick_ms']:<9.1f}"


def _print_row(row: dict[str, Any]) -> None:
    p = row["phases_seconds"]
    print(
        f"{row['events']:>9} {row['orgs']:>5} | {row['insert_seconds']:>8.2f} "
        f"{row['flush_seconds']:>8.2f} {row['flush_per_insert']:>9.2f} | "
        f"{row['us_per_event']:>6.1f} {row['linearity']:>5.2f} | {p.get('claim', 0):>6.1f} "
        f"{p.get('aggregate', 0):>5.1f} {p.get('outbox', 0):>6.1f} "
        f"{p.get('submit', 0):>7.1f} | {_pick_ms(row)} | {row['calls']:>6} {row['groups']:>6} "
        f"{row['calls_per_group']:>5.2f} {row['rate_limited_429']:>4} | "
        f"{row['peak_rss_mb']:>6.0f} | {'yes' if row['totals_exact'] else 'NO'}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=None, help="comma-separated event counts")
    parser.add_argument("--orgs", default=None, help="comma-separated organization counts")
    parser.add_argument("--hours", type=int, default=None, help="default 3 (--groups: 1)")
    parser.add_argument(
        "--limits",
        choices=("live", "test", "off"),
        default="live",
        help="the emulator's rate ceilings during the flush",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=LIVE_KEY_CLIENT_RATE,
        help="the client's meter-event rate limit (STRIPE_METER_EVENT_RATE_...)",
    )
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"sizes {QUICK['sizes']}, orgs {QUICK['orgs']} (under a minute)",
    )
    shapes = parser.add_mutually_exclusive_group()
    shapes.add_argument(
        "--submit",
        action="store_true",
        help="the submit phase alone, side by side with --baseline and the plain loop",
    )
    shapes.add_argument(
        "--groups", help="comma-separated counts of distinct groups to claim (one event each)"
    )
    shapes.add_argument(
        "--workers",
        help="comma-separated worker process counts: the fan-out, side by side (bench/fanout.py)",
    )
    parser.add_argument(
        "--api",
        choices=("v1", "v2"),
        help="with --groups: that many groups on v1 and v2 side by side (bench/stream.py)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="--submit: interleaved rounds")
    parser.add_argument(
        "--latency-ms",
        default="0",
        help="with --workers: comma-separated round trips of a meter event call (e.g. 0,20)",
    )
    parser.add_argument(
        "--baseline", type=Path, help="another checkout (e.g. main) whose flush runs beside"
    )
    parser.add_argument("--meters", type=int, default=5, help="--groups: meters per organization")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument(
        "--child",
        choices=("flush", "claim", "submit", "status", "plain"),
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--code", help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--sample-every", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--api-base", help=argparse.SUPPRESS)
    parser.add_argument("--schema", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.workers or args.api:  # shapes with benches of their own
        return _delegate(args)
    if args.child:
        if args.code:  # the baseline's billing package, not this tree's
            sys.path.insert(0, args.code)
        {"flush": child, "plain": child_plain}.get(args.child, child_phase)(args)
        return 0
    if args.quick:
        args.sizes, args.orgs = QUICK["sizes"], QUICK["orgs"]
    defaults = (
        SUBMIT_SHAPE if args.submit else {"sizes": "100000,1000000,5000000", "orgs": "100,1000"}
    )
    args.sizes = args.sizes or defaults["sizes"]
    args.orgs = args.orgs or defaults["orgs"]
    args.hours = args.hours or (1 if args.groups else 3)
    if args.baseline is not None and not (args.baseline / "billing").is_dir():
        parser.error(f"--baseline {args.baseline}: no billing package there")
    output = args.output or (
        SUBMIT_RESULTS if args.submit else GROUPS_RESULTS if args.groups else RESULTS
    )

    emulator, api_base = start_emulator()
    report: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "hours": args.hours,
        "limits": args.limits,
        "client_rate_per_second": args.rate,
        "load1_at_start": os.getloadavg()[0],
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        if args.submit:
            report |= {
                "benchmark": "the submit phase, side by side",
                **run_submit(args, api_base, emulator.pid),
            }
            exact = report["exact"]
        elif args.groups:
            report |= {"benchmark": "claiming many distinct groups", **run_groups(args, api_base)}
            exact = all(row["exact"] for row in report["runs"])
        else:
            report |= {
                "benchmark": "hourly flush of a billable_events backlog",
                "runs": run_backlogs(args, api_base),
            }
            exact = all(row["totals_exact"] for row in report["runs"])
    except ChildFailed as failure:
        print(failure, file=sys.stderr)
        return 1
    finally:
        emulator.terminate()
        emulator.wait(10)
        _drop_schema()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {output}")
    return 0 if exact else 1


def run_backlogs(args: argparse.Namespace, api_base: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    smallest: dict[int, float] = {}
    print(HEADER, flush=True)
    for orgs in (int(o) for o in args.orgs.split(",")):
        for size in (int(s) for s in args.sizes.split(",")):
            row = run_one(args, api_base, size, orgs)
            smallest.setdefault(orgs, row["us_per_event"])
            row["linearity"] = row["us_per_event"] / smallest[orgs]
            rows.append(row)
            _print_row(row)
    return rows


def _drop_schema() -> None:
    from billing import db

    admin = db.make_engine(DATABASE_URL)
    with admin.begin() as connection:
        connection.exec_driver_sql(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    admin.dispose()


if __name__ == "__main__":
    sys.exit(main())
