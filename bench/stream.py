"""v1 vs v2 benchmark: the same backlog of N customer·meter·hour groups flushed one meter event call
per group (v1) and on the v2 meter event stream (100 events per request), side by side in one run.

For each N (`--groups`) and API it builds a fresh schema with N/5 organizations, 5 meters and one
closed hour, one event per group, then runs `flush_pass` in this process against the emulator (a
subprocess at `--rate-limits live`: 1,000 v1 calls/s, 10,000 stream requests/s), the client's
limit under each ceiling (v1 900/s, v2 9,000 requests/s), logging at INFO to a file as in
production. It prints and writes (`--output`, default bench/results/stream.json): wall time,
requests and events sent (the emulator's counts), groups/s, the flush process's CPU per group,
peak RSS, whether Stripe's totals equal the database's, and the v2/v1 speed-up per N.

    .venv/bin/python bench/stream.py [--groups 2000,10000] [--quick] [--output PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import flush as flush_bench  # noqa: E402  (its emulator and schema helpers)

DATABASE_URL = flush_bench.DATABASE_URL
SCHEMA = f"billing_bench_stream_{os.getpid()}"
METERS = ("m_api", "m_storage", "m_tokens", "m_seats", "m_jobs")
RESULTS = ROOT / "bench" / "results" / "stream.json"
CLIENT_RATE = {"v1": 900.0, "v2": 9000.0}  # under the emulator's live ceilings
STREAM = "POST /v2/billing/meter_event_stream"
V1 = "POST /v1/billing/meter_events"


def _settings(api_base: str, api: str, **overrides: Any):
    return flush_bench._settings(
        api_base, SCHEMA, CLIENT_RATE[api], METERS, stripe_meter_event_api=api, **overrides
    )


def prepare(api_base: str, api: str, groups: int) -> dict[tuple[str, str], int]:
    """Fresh schema, meters, customers and the backlog; {(customer, meter): expected total}."""
    from billing.models import BillingAccount

    orgs = groups // len(METERS)
    runtime = flush_bench._fresh_runtime(api_base, SCHEMA, METERS)
    with runtime.session_factory.begin() as session:
        for org in range(1, orgs + 1):
            customer = runtime.stripe.create_customer(f"Bench org {org}", org)
            session.add(BillingAccount(organization_id=org, stripe_customer_id=customer.id))
    meters = ",".join(f"'{m}'" for m in METERS)
    with runtime.engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO billable_events (organization_id, event_type, quantity, occurred_at, "
            "source, idempotency_key, created_at) "
            f"SELECT 1 + (i / {len(METERS)}), (ARRAY[{meters}])[1 + mod(i, {len(METERS)})], "
            "1 + mod(i, 7), date_trunc('hour', now()) - interval '50 minutes', 'zeitgeist', "
            f"'bench-' || i, now() FROM generate_series(0, {orgs * len(METERS) - 1}) AS i"
        )
        connection.exec_driver_sql("ANALYZE billable_events")
        expected = {
            (customer, event_type): int(total)
            for customer, event_type, total in connection.exec_driver_sql(
                "SELECT a.stripe_customer_id, e.event_type, sum(e.quantity) "
                "FROM billable_events e JOIN billing_accounts a USING (organization_id) "
                "GROUP BY 1, 2"
            )
        }
    runtime.close()
    return expected


def run_one(api_base: str, api: str, groups: int, log_path: Path) -> dict[str, Any]:
    from billing.runtime import Runtime
    from billing.usage.service import flush_pass

    expected = prepare(api_base, api, groups)
    flush_bench._control(api_base, "limits", {"preset": "live"})
    flush_bench._control(api_base, "stats/reset", {})
    handler = logging.FileHandler(log_path, mode="w")
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    runtime = Runtime(_settings(api_base, api))
    try:
        cpu0 = time.process_time()
        started = time.monotonic()
        result = flush_pass(runtime)
        seconds = time.monotonic() - started
        cpu = time.process_time() - cpu0
    finally:
        root.removeHandler(handler)
        handler.close()
        runtime.close()
    stats = flush_bench._control(api_base, "stats")
    billed = {
        (customer, meter): value
        for customer, by_meter in stats["billed"].items()
        for meter, value in by_meter.items()
    }
    requests = stats["requests"].get(STREAM if api == "v2" else V1, 0)
    limited = stats["responses"].get(STREAM if api == "v2" else V1, {}).get("429", 0)
    return {
        "api": api,
        "groups": groups,
        "seconds": round(seconds, 3),
        "requests": requests,
        "events": stats["meter_events"]["accepted"],
        "rate_limited": limited,
        "groups_per_s": round(groups / seconds, 1),
        "cpu_us_per_group": round(cpu / groups * 1e6, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "sent": result.submissions_sent,
        "exact": billed == expected and result.ok,
    }


HEADER = (
    f"{'api':>3} {'groups':>8} {'seconds':>8} {'requests':>8} {'events':>8} {'429s':>5} "
    f"{'groups/s':>9} {'cpu µs/grp':>10} {'rss MB':>7} exact"
)


def _print_row(row: dict[str, Any]) -> None:
    print(
        f"{row['api']:>3} {row['groups']:>8} {row['seconds']:>8.2f} {row['requests']:>8} "
        f"{row['events']:>8} {row['rate_limited']:>5} {row['groups_per_s']:>9.0f} "
        f"{row['cpu_us_per_group']:>10.0f} {row['peak_rss_mb']:>7.0f} {row['exact']}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", default="2000,10000", help="comma-separated group counts")
    parser.add_argument("--quick", action="store_true", help="--groups 2000 (well under 1 min)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    sizes = [2000] if args.quick else [int(g) for g in args.groups.split(",")]
    port = flush_bench._free_port()
    api_base = f"http://127.0.0.1:{port}"
    emulator = subprocess.Popen(
        [sys.executable, "-m", "billing.emulator", "--port", str(port), "--quiet"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rows: list[dict[str, Any]] = []
    log_dir = args.output.parent
    log_dir.mkdir(parents=True, exist_ok=True)
    print(HEADER, flush=True)
    try:
        for _ in range(100):
            try:
                flush_bench._control(api_base, "stats")
                break
            except OSError:
                time.sleep(0.1)
        for groups in sizes:
            pair = {}
            for api in ("v1", "v2"):
                row = run_one(api_base, api, groups, log_dir / f"stream-{api}.log")
                pair[api] = row
                rows.append(row)
                _print_row(row)
            speedup = pair["v1"]["seconds"] / pair["v2"]["seconds"]
            pair["v2"]["speedup_vs_v1"] = round(speedup, 1)
            print(f"    v2 / v1 speed-up at {groups} groups: {speedup:.1f}x", flush=True)
    finally:
        emulator.terminate()
        emulator.wait(10)
        from billing import db

        admin = db.make_engine(DATABASE_URL)
        with admin.begin() as connection:
            connection.exec_driver_sql(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        admin.dispose()
    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "rows": rows,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.output}")
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
