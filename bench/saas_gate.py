"""Benchmark: what the `saas` gate adds to a request, on PostgreSQL with a large table.

Migrates a fresh schema, fills `entitlements` with --rows rows (half Stripe, half manual, over
many organizations), then drives a tiny host app through Flask's test client (in-process: the
figures are the gate's cost, not the network's), in interleaved rounds so noise hits each route
alike: `/open` (no gate), `/workspace` as an entitled organization (200) and as a gated one
(redirect to booking). Also times `has_entitlement` alone. Prints p50/p99 per request and the
gate's overhead, and writes them to bench/results/saas_gate.json.

    python bench/saas_gate.py [--rows 200000] [--requests 3000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid
from pathlib import Path

from flask import Flask

from billing import Billing, db
from billing.config import Settings
from billing.entitlements import SAAS_FEATURE
from billing.entitlements.gate import SaasGate, require_saas
from billing.entitlements.service import has_entitlement
from billing.runtime import Runtime

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "saas_gate.json"
DATABASE_URL = os.environ.get(
    "BILLING_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
ENTITLED, GATED = 1, 2


def fill(runtime: Runtime, rows: int) -> None:
    with runtime.engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO entitlements (organization_id, lookup_key, active, source, "
            "created_at, updated_at) "
            "SELECT 1000 + n / 2, 'saas', mod(n, 3) <> 0, CASE WHEN mod(n, 2) = 0 THEN 'stripe' "
            f"ELSE 'manual' END, now(), now() FROM generate_series(0, {rows - 1}) AS n"
        )
        connection.exec_driver_sql(
            "INSERT INTO entitlements (organization_id, lookup_key, active, source, "
            f"created_at, updated_at) VALUES ({ENTITLED}, 'saas', true, 'manual', now(), now())"
        )
        connection.exec_driver_sql("ANALYZE entitlements")


def host_app(settings: Settings) -> tuple[Flask, dict[str, int]]:
    app = Flask("bench")
    Billing(app, settings)
    who = {"organization_id": ENTITLED}
    SaasGate(app, current_organization=lambda: who["organization_id"])

    @app.get("/open")
    def open_route() -> str:
        return "ok"

    @app.get("/workspace")
    @require_saas
    def workspace() -> str:
        return "ok"

    return app, who


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(samples: list[float]) -> dict[str, float]:
    micros = [s * 1e6 for s in samples]
    return {
        "p50_us": round(percentile(micros, 50), 1),
        "p99_us": round(percentile(micros, 99), 1),
        "mean_us": round(statistics.fmean(micros), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()

    schema = f"bench_saas_gate_{uuid.uuid4().hex[:8]}"
    admin = db.make_engine(DATABASE_URL)
    with admin.begin() as connection:
        connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    settings = Settings(
        database_url=db.with_search_path(DATABASE_URL, schema),
        saas_workspace_booking_url="https://booking.test/x",
    )
    runtime = Runtime(settings)
    try:
        db.upgrade(runtime.engine)
        fill(runtime, args.rows)
        app, who = host_app(settings)
        client = app.test_client()
        timings: dict[str, list[float]] = {"open": [], "entitled": [], "gated": [], "lookup": []}
        expected = {"open": 200, "entitled": 200, "gated": 302}
        for round_number in range(args.requests + 200):  # the first 200 rounds warm up
            for name, org, path in (
                ("open", ENTITLED, "/open"),
                ("entitled", ENTITLED, "/workspace"),
                ("gated", GATED, "/workspace"),
            ):
                who["organization_id"] = org
                started = time.perf_counter()
                status = client.get(path).status_code
                elapsed = time.perf_counter() - started
                assert status == expected[name], (name, status)
                if round_number >= 200:
                    timings[name].append(elapsed)
            started = time.perf_counter()
            assert has_entitlement(runtime, ENTITLED, SAAS_FEATURE)
            if round_number >= 200:
                timings["lookup"].append(time.perf_counter() - started)
        figures = {name: summary(samples) for name, samples in timings.items()}
        figures["gate_overhead_p50_us"] = round(
            figures["entitled"]["p50_us"] - figures["open"]["p50_us"], 1
        )
        figures["rows"] = args.rows + 1
        figures["requests_per_route"] = args.requests
    finally:
        runtime.close()
        with admin.begin() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()

    for name in ("open", "entitled", "gated", "lookup"):
        f = figures[name]
        print(f"{name:9s} p50 {f['p50_us']:8.1f} us   p99 {f['p99_us']:8.1f} us")
    print(
        f"gate overhead (entitled p50 - open p50): {figures['gate_overhead_p50_us']} us "
        f"over {figures['rows']} entitlement rows"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
