"""Time the billable_events contract checks on a 1M-row table in a scratch PostgreSQL schema.

    .venv/bin/python bench/contract.py [--rows 1000000] [--repeat 3] [--database-url URL]

Scenarios (every check runs, zeitgeist required):
- steady: the usual state, 1% of the rows pending (the last hours), the rest claimed;
- backlog: every row pending (billing just switched on), with a sprinkle of defects;
- backlog_no_unique: as backlog, without the unique constraint on idempotency_key, so the
  duplicate check has to group the whole window.
Prints the timings and writes them to bench/results/contract.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sqlalchemy as sa

from billing import db
from billing.checks.contract import run_contract_checks
from billing.config import Settings
from billing.runtime import Runtime

RESULTS = Path(__file__).with_name("results") / "contract.json"
DEFAULT_URL = os.environ.get(
    "BILLING_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
ORGS = 1000
METERS = {"api_call": "api_call", "storage_gb_hour": "storage_gb_hour"}

# Row g (1 = newest) occurred g/rows of 30 days ago; every 10th row comes from a batch producer.
FILL = """
INSERT INTO billable_events (organization_id, event_type, quantity, occurred_at, source,
                             idempotency_key, created_at, usage_submission_id, claimed_at)
SELECT (g % {orgs}) + 1,
       CASE WHEN g % 2 = 0 THEN 'api_call' ELSE 'storage_gb_hour' END,
       CASE WHEN {defects} AND g % 997 = 0 THEN 0 ELSE (g % 50) + 1 END,
       now() - (g::float8 / {rows}) * interval '30 days',
       CASE WHEN g % 10 = 0 THEN 'batch' ELSE 'zeitgeist' END,
       'bench-' || g,
       now(),
       CASE WHEN g > {pending} THEN 1 END,
       CASE WHEN g > {pending} THEN now() END
FROM generate_series(1, {rows}) AS g
"""
OUTBOX_ROW = """
INSERT INTO usage_submissions (id, organization_id, stripe_customer_id, event_type, event_name,
    value, event_count, window_start, window_end, identifier, status, attempts, created_at,
    updated_at)
VALUES (1, 1, 'cus_1', 'api_call', 'api_call', 1, 1, now(), now(), 'bench', 'sent', 1, now(), now())
"""
# The backlog's defects: unmapped event types, and organizations without a Stripe customer.
DEFECTS = [
    "UPDATE billable_events SET event_type = 'api_calls' WHERE id % 1999 = 0",
    f"DELETE FROM billing_accounts WHERE organization_id > {ORGS - 3}",
]
DROP_UNIQUE = "ALTER TABLE billable_events DROP CONSTRAINT uq_billable_events_idempotency_key"


def execute(runtime: Runtime, *statements: str) -> None:
    with runtime.engine.begin() as connection:
        for statement in statements:
            connection.execute(sa.text(statement))  # text(): `%` is not a parameter marker


def fill(runtime: Runtime, rows: int, pending: int, defects: bool) -> float:
    started = time.monotonic()
    execute(
        runtime,
        # CASCADE: the tables that reference these (usage_submission_actions) empty with them.
        "TRUNCATE billable_events, usage_submissions, billing_accounts CASCADE",
        f"INSERT INTO billing_accounts (organization_id, stripe_customer_id, created_at, "
        f"updated_at) SELECT o, 'cus_' || o, now(), now() FROM generate_series(1, {ORGS}) o",
        OUTBOX_ROW,
        FILL.format(orgs=ORGS, rows=rows, pending=pending, defects=str(defects).upper()),
        *(DEFECTS if defects else []),
    )
    with runtime.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.exec_driver_sql("VACUUM ANALYZE billable_events")
        connection.exec_driver_sql("ANALYZE billing_accounts")
    return time.monotonic() - started


def time_checks(runtime: Runtime, repeat: int) -> dict[str, Any]:
    timings = []
    for _ in range(repeat):
        started = time.monotonic()
        report = run_contract_checks(runtime, lookback_days=30, require_zeitgeist=True)
        timings.append(time.monotonic() - started)
    return {
        "seconds_min": round(min(timings), 3),
        "seconds_median": round(statistics.median(timings), 3),
        "runs": [round(t, 3) for t in timings],
        "checks": {c.check: [c.status.value, c.offending_rows] for c in report.checks},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--database-url", default=DEFAULT_URL)
    args = parser.parse_args()

    schema = f"bench_contract_{os.getpid()}"
    admin = db.make_engine(args.database_url)
    with admin.begin() as connection:
        connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    runtime = Runtime(
        Settings(
            database_url=db.with_search_path(args.database_url, schema), stripe_meters=dict(METERS)
        )
    )
    scenarios: dict[str, Any] = {}
    try:
        db.upgrade(runtime.engine)
        for name, pending, defects in (
            ("steady", args.rows // 100, False),
            ("backlog", args.rows, True),
        ):
            load = fill(runtime, args.rows, pending, defects)
            scenarios[name] = {
                "pending_rows": pending,
                "load_seconds": round(load, 1),
                **time_checks(runtime, args.repeat),
            }
            print(f"{name:18} {scenarios[name]['seconds_median']:.3f} s median", flush=True)
        execute(runtime, DROP_UNIQUE)
        scenarios["backlog_no_unique"] = {
            "pending_rows": args.rows,
            **time_checks(runtime, args.repeat),
        }
        print(
            f"{'backlog_no_unique':18} {scenarios['backlog_no_unique']['seconds_median']:.3f} "
            "s median"
        )
        with runtime.engine.connect() as connection:
            version = connection.exec_driver_sql("SHOW server_version").scalar()
    finally:
        runtime.close()
        with admin.begin() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()

    result = {
        "rows": args.rows,
        "repeat": args.repeat,
        "postgresql": version,
        "python": platform.python_version(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "scenarios": scenarios,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
