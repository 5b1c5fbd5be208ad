"""Flush benchmark: billing's aggregated flush vs. a naive one-call-per-event submission.

For backlogs of 10k, 100k and 1M events (PostgreSQL, a scratch schema; the Stripe emulator in its
own process with its rate ceilings off) it prints events/s, Stripe calls, peak RSS and wall time
of each, side by side, and writes them to bench/results/flush.json. Every run happens in a fresh
child process so that peak RSS is that run's own.

The naive submitter is bounded by --naive-seconds (default 120 s): past that it stops and its wall
time for the whole backlog is extrapolated from its measured rate, and marked so.

    .venv/bin/python bench/flush.py [--sizes 10000,100000,1000000] [--orgs 100] [--hours 12]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATABASE_URL = os.environ.get(
    "BILLING_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
SCHEMA = "billing_bench_flush"
METERS = "api_call,storage_gb_hour"
RESULTS = ROOT / "bench" / "results" / "flush.json"


def _schema_url() -> str:
    return f"{DATABASE_URL}?options=-csearch_path%3D{SCHEMA}"


def _settings(api_base: str):
    from billing.config import Settings, parse_meter_map

    return Settings(
        billing_enabled=True,
        stripe_secret_key="sk_test_bench_flush_0000",
        stripe_api_base=api_base,
        stripe_meters=parse_meter_map("STRIPE_BILLING_METERS", METERS),
        stripe_meter_event_rate_per_second=100_000,
        database_url=_schema_url(),
        validate_contract_before_flush=False,
    )


def _emulator_stats(api_base: str) -> dict:
    with urllib.request.urlopen(f"{api_base}/_emulator/stats", timeout=30) as response:
        return json.load(response)


def _post(api_base: str, path: str, body: dict) -> None:
    request = urllib.request.Request(
        f"{api_base}/_emulator/{path}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=30).close()


def prepare(api_base: str, size: int, orgs: int, hours: int) -> None:
    """Fresh schema, meters and customers, and `size` events spread over orgs, types and hours."""
    from billing import db
    from billing.models import BillingAccount
    from billing.runtime import Runtime

    _post(api_base, "reset", {})
    _post(api_base, "limits", {"preset": "off"})
    admin = db.make_engine(DATABASE_URL)
    with admin.begin() as connection:
        connection.exec_driver_sql(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        connection.exec_driver_sql(f"CREATE SCHEMA {SCHEMA}")
    admin.dispose()
    runtime = Runtime(_settings(api_base))
    db.upgrade(runtime.engine)
    for event_name in METERS.split(","):
        runtime.stripe.ensure_meter(event_name)
    with runtime.session_factory.begin() as session:
        for org in range(1, orgs + 1):
            customer = runtime.stripe.create_customer(f"Bench org {org}", org)
            session.add(BillingAccount(organization_id=org, stripe_customer_id=customer.id))
    with runtime.engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO billable_events (organization_id, event_type, quantity, occurred_at, "
            "source, idempotency_key, created_at) "
            f"SELECT 1 + mod(i, {orgs}), "
            "CASE WHEN mod(i, 2) = 0 THEN 'api_call' ELSE 'storage_gb_hour' END, "
            "1 + mod(i, 7), "
            f"now() - interval '1 minute' - mod(i, {hours * 60}) * interval '1 minute', "
            f"'zeitgeist', 'bench-' || i, now() FROM generate_series(1, {int(size)}) AS i"
        )
        connection.exec_driver_sql("ANALYZE billable_events")
    runtime.close()


def run_billing(api_base: str) -> dict:
    from billing.runtime import Runtime
    from billing.services import flush_once

    runtime = Runtime(_settings(api_base))
    started = time.monotonic()
    result = flush_once(runtime)
    wall = time.monotonic() - started
    runtime.close()
    return {
        "events": result.events_claimed,
        "wall_seconds": wall,
        "ok": result.ok,
        "billed": sum(result.billed_value.values()),
    }


def run_naive(api_base: str, limit_seconds: float) -> dict:
    """One meter event per row, streamed with a server-side cursor, same concurrency as billing."""
    import sqlalchemy as sa

    from billing.models import BillableEvent, BillingAccount
    from billing.runtime import Runtime
    from billing.stripe_gateway import MeterEvent

    runtime = Runtime(_settings(api_base))
    gateway = runtime.stripe
    started = time.monotonic()
    sent = billed = 0
    query = (
        sa.select(
            BillableEvent.event_type,
            BillableEvent.quantity,
            BillableEvent.occurred_at,
            BillableEvent.idempotency_key,
            BillingAccount.stripe_customer_id,
        )
        .join(BillingAccount, BillingAccount.organization_id == BillableEvent.organization_id)
        .execution_options(yield_per=5000)
    )

    def send(row) -> int:
        gateway.send_meter_event(
            MeterEvent(
                event_name=row.event_type,
                stripe_customer_id=row.stripe_customer_id,
                value=row.quantity,
                timestamp=row.occurred_at,
                identifier=row.idempotency_key,
                idempotency_key=f"naive-{row.idempotency_key}",
            )
        )
        return row.quantity

    complete = True
    with runtime.session_factory() as session, ThreadPoolExecutor(8) as pool:
        for chunk in session.execute(query).partitions(2000):
            billed += sum(pool.map(send, chunk))
            sent += len(chunk)
            if time.monotonic() - started > limit_seconds:
                complete = False
                break
    wall = time.monotonic() - started
    runtime.close()
    return {"events": sent, "wall_seconds": wall, "complete": complete, "billed": billed}


def child(mode: str, api_base: str, naive_seconds: float) -> None:
    before = _emulator_stats(api_base)["meter_events"]["accepted"]
    outcome = run_billing(api_base) if mode == "billing" else run_naive(api_base, naive_seconds)
    outcome["stripe_calls"] = _emulator_stats(api_base)["meter_events"]["accepted"] - before
    outcome["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(outcome))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_run(mode: str, api_base: str, naive_seconds: float) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--api-base",
            api_base,
            "--naive-seconds",
            str(naive_seconds),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--orgs", type=int, default=100)
    parser.add_argument("--hours", type=int, default=12)
    parser.add_argument("--naive-seconds", type=float, default=120.0)
    parser.add_argument("--child", choices=["billing", "naive"])
    parser.add_argument("--api-base")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.api_base, args.naive_seconds)
        return 0

    port = _free_port()
    api_base = f"http://127.0.0.1:{port}"
    emulator = subprocess.Popen(
        [sys.executable, "-m", "billing.emulator", "--port", str(port), "--quiet"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rows = []
    try:
        for _ in range(100):
            try:
                _emulator_stats(api_base)
                break
            except OSError:
                time.sleep(0.1)
        for size in (int(s) for s in args.sizes.split(",")):
            row: dict = {"events": size}
            for mode in ("billing", "naive"):
                prepare(api_base, size, args.orgs, args.hours)
                outcome = _child_run(mode, api_base, args.naive_seconds)
                rate = outcome["events"] / outcome["wall_seconds"]
                projected = size / rate if outcome.get("complete", True) is False else None
                row[mode] = {
                    **outcome,
                    "events_per_second": rate,
                    "extrapolated_wall_seconds": projected,
                }
            rows.append(row)
            _print_row(row)
    finally:
        emulator.terminate()
        emulator.wait(10)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"orgs": args.orgs, "hours": args.hours, "runs": rows}, indent=2))
    print(f"written to {RESULTS}")
    return 0


def _print_row(row: dict) -> None:
    b, n = row["billing"], row["naive"]
    naive_wall = n["extrapolated_wall_seconds"] or n["wall_seconds"]
    mark = " (extrapolated)" if n["extrapolated_wall_seconds"] else ""
    print(
        f"{row['events']:>9} events | billing: {b['events_per_second']:>9.0f} ev/s, "
        f"{b['stripe_calls']:>6} calls, {b['peak_rss_mb']:>6.0f} MB RSS, "
        f"{b['wall_seconds']:>7.1f} s"
        f" | naive: {n['events_per_second']:>6.0f} ev/s, {n['stripe_calls']:>7} calls, "
        f"{n['peak_rss_mb']:>6.0f} MB RSS, {naive_wall:>7.1f} s{mark}"
        f" | speed-up x{naive_wall / b['wall_seconds']:.1f}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
