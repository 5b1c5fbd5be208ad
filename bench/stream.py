"""v1 vs v2 benchmark: the same backlog of N customer·meter·hour groups flushed one meter event call
per group (v1) and on the v2 meter event stream (100 events per request), side by side in one run.

For each N (`--groups`) and API it builds a fresh schema with N/5 organizations (their customers
made by the emulator's bulk control, `POST /_emulator/customers`, and their billing accounts
written by one `INSERT … SELECT`), 5 meters and one closed hour, one event per group, then runs
`flush_pass` in a fresh child process (its peak RSS is its own) against the emulator (a
subprocess at `--rate-limits live`: 1,000 v1 calls/s, 10,000 stream requests/s), the client's
limit under each ceiling (v1 900/s, v2 9,000 requests/s), logging at INFO to a file as in
production. It prints and writes (`--output`, default bench/results/stream.json): wall time,
its split (claim batches, stream requests, recording their rows), requests and events sent (the
emulator's counts), groups/s, the flush process's CPU per group, peak RSS, whether Stripe's
totals equal the database's, and the v2/v1 speed-up per N; beside each flush, the seconds of a
plain `INSERT … SELECT` of its N events and the flush's multiple of it (machines of this kind
differ by up to 3x: the multiple travels, the seconds do not).

v1 at a million groups takes about 19 minutes (its 900/s client limit): `--v1-groups M` flushes M
groups with v1 *and* v2 side by side (the measured ratio), and v2 alone at each `--groups` N,
whose v1 time is then extrapolated linearly from v1's time per group at M (printed as such).
`--profile PATH` writes a cProfile of the largest v2 flush's main thread, and `PATH.laneN` one per
lane run (open with `python -m pstats`).

    .venv/bin/python bench/stream.py [--groups 2000,10000] [--v1-groups M] [--quick]
        [--profile PATH] [--output PATH]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
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


def prepare(api_base: str, groups: int) -> dict[str, float]:
    """Fresh schema, meters, customers and the backlog; seconds each setup step took."""
    orgs = groups // len(METERS)
    runtime = flush_bench._fresh_runtime(api_base, SCHEMA, METERS)
    started = time.monotonic()
    made = flush_bench._control(
        api_base,
        "customers",
        {"count": orgs, "name": "Bench org {n}", "metadata": {"organization_id": "{n}"}},
    )
    customers_seconds = time.monotonic() - started
    meters = ",".join(f"'{m}'" for m in METERS)
    started = time.monotonic()
    with runtime.engine.begin() as connection:
        # Customer i of the answer is organization i + 1.
        connection.exec_driver_sql(
            "INSERT INTO billing_accounts (organization_id, stripe_customer_id, created_at, "
            "updated_at) SELECT n, id, now(), now() "
            "FROM unnest(%(ids)s::text[]) WITH ORDINALITY AS t(id, n)",
            {"ids": made["ids"]},
        )
        events_started = time.monotonic()
        connection.exec_driver_sql(
            "INSERT INTO billable_events (organization_id, event_type, quantity, occurred_at, "
            "source, idempotency_key, created_at) "
            f"SELECT 1 + (i / {len(METERS)}), (ARRAY[{meters}])[1 + mod(i, {len(METERS)})], "
            "1 + mod(i, 7), date_trunc('hour', now()) - interval '50 minutes', 'zeitgeist', "
            f"'bench-' || i, now() FROM generate_series(0, {orgs * len(METERS) - 1}) AS i"
        )
        events_seconds = time.monotonic() - events_started
        connection.exec_driver_sql("ANALYZE billing_accounts")
        connection.exec_driver_sql("ANALYZE billable_events")
        connection.exec_driver_sql("CHECKPOINT")
    runtime.close()
    return {
        "customers_seconds": round(customers_seconds, 2),
        "rows_seconds": round(time.monotonic() - started, 2),
        # The machine's pace beside the flush: a plain INSERT … SELECT of the same N events.
        "insert_events_seconds": round(events_seconds, 2),
    }


def expected_totals() -> dict[tuple[str, str], int]:
    """{(customer, event name): total} as the database holds it."""
    from billing import db

    engine = db.make_engine(db.with_search_path(DATABASE_URL, SCHEMA))
    try:
        with engine.begin() as connection:
            return {
                (customer, event_type): int(total)
                for customer, event_type, total in connection.exec_driver_sql(
                    "SELECT a.stripe_customer_id, e.event_type, sum(e.quantity) "
                    "FROM billable_events e JOIN billing_accounts a USING (organization_id) "
                    "GROUP BY 1, 2"
                )
            }
    finally:
        engine.dispose()


class Phases:
    """Wall seconds inside the claim, the stream requests and the recording of their rows
    (the last two summed over the lanes, so they can exceed the wall time)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, owner: Any, name: str, phase: str) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - started

        setattr(owner, name, timed)


def child(args: argparse.Namespace) -> None:
    """One flush pass in this process; prints its figures as one JSON line."""
    from billing.runtime import Runtime
    from billing.stripe_gateway import StripeGateway
    from billing.usage import claiming, streaming, submitting
    from billing.usage.service import flush_pass

    phases = Phases()
    phases.wrap(claiming.Claimer, "claim_batch", "claim")
    phases.wrap(submitting.Submitter, "load", "load")
    phases.wrap(StripeGateway, "send_meter_event_batch", "stream_requests")
    phases.wrap(StripeGateway, "send_meter_event", "v1_calls")
    phases.wrap(streaming.StreamSender, "_record_sent", "record")
    phases.wrap(submitting.Submitter, "record", "record")
    handler = logging.FileHandler(args.log, mode="w")
    # Milliseconds since the child started, to read the claim/send overlap off the log.
    handler.setFormatter(logging.Formatter("%(relativeCreated)9.0f %(threadName)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    runtime = Runtime(_settings(args.api_base, args.api))
    profile = cProfile.Profile() if args.profile else None
    lane_profiles: list[cProfile.Profile] = []
    if profile:  # cProfile sees one thread: each lane's work gets a profile of its own
        send_lane = streaming.StreamSender._send_lane

        def profiled_lane(self: Any, rows: Any) -> None:
            lane = cProfile.Profile()
            lane_profiles.append(lane)
            lane.runcall(send_lane, self, rows)

        streaming.StreamSender._send_lane = profiled_lane
    try:
        cpu0 = time.process_time()
        started = time.monotonic()
        if profile:
            profile.enable()
        result = flush_pass(runtime, contract_check=False)
        if profile:
            profile.disable()
        seconds = time.monotonic() - started
        cpu = time.process_time() - cpu0
    finally:
        root.removeHandler(handler)
        handler.close()
        runtime.close()
    if profile:
        profile.dump_stats(args.profile)
        for index, lane in enumerate(lane_profiles):
            lane.dump_stats(f"{args.profile}.lane{index}")
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu_seconds": cpu,
                "peak_rss_mb": flush_bench.peak_rss_mb(),
                "phases_seconds": {k: round(v, 2) for k, v in phases.seconds.items()},
                "batches": result.batches,
                "sent": result.submissions_sent,
                "ok": result.ok,
            }
        )
    )


def run_one(
    api_base: str,
    api: str,
    groups: int,
    log_dir: Path,
    emulator_pid: int,
    profile: Path | None = None,
) -> dict[str, Any]:
    setup = prepare(api_base, groups)
    expected = expected_totals()
    flush_bench._control(api_base, "limits", {"preset": "live"})
    flush_bench._control(api_base, "stats/reset", {})
    load1 = os.getloadavg()[0]
    command = [
        sys.executable,
        __file__,
        "--child",
        api,
        "--api-base",
        api_base,
        "--schema",
        SCHEMA,
        "--log",
        str(log_dir / f"stream-{api}.log"),
    ]
    if profile:
        command += ["--profile", str(profile)]
    emulator_cpu = flush_bench._process_cpu(emulator_pid)
    out = subprocess.run(command, capture_output=True, text=True)
    emulator_cpu = flush_bench._process_cpu(emulator_pid) - emulator_cpu
    if out.returncode != 0:
        raise flush_bench.ChildFailed(f"{api} flush failed:\n{out.stderr.rstrip()}")
    flushed = json.loads(out.stdout.strip().splitlines()[-1])
    stats = flush_bench._control(api_base, "stats")
    billed = {
        (customer, meter): value
        for customer, by_meter in stats["billed"].items()
        for meter, value in by_meter.items()
    }
    requests = stats["requests"].get(STREAM if api == "v2" else V1, 0)
    limited = stats["responses"].get(STREAM if api == "v2" else V1, {}).get("429", 0)
    seconds = flushed["seconds"]
    return {
        "api": api,
        "groups": groups,
        "setup_seconds": setup,
        "seconds": round(seconds, 3),
        "x_insert_events": round(seconds / setup["insert_events_seconds"], 2),
        "phases_seconds": flushed["phases_seconds"],
        "batches": flushed["batches"],
        "requests": requests,
        "events": stats["meter_events"]["accepted"],
        "rate_limited": limited,
        "groups_per_s": round(groups / seconds, 1),
        "cpu_us_per_group": round(flushed["cpu_seconds"] / groups * 1e6, 1),
        "emulator_cpu_us_per_group": round(emulator_cpu / groups * 1e6, 1),
        "peak_rss_mb": round(flushed["peak_rss_mb"], 1),
        "sent": flushed["sent"],
        "load1_before": load1,
        "load1_after": os.getloadavg()[0],
        "exact": billed == expected and flushed["ok"],
    }


HEADER = (
    f"{'api':>3} {'groups':>8} {'seconds':>8} {'requests':>8} {'events':>8} {'429s':>5} "
    f"{'groups/s':>9} {'cpu µs/grp':>10} {'emu µs/grp':>10} {'rss MB':>7} {'claim s':>7} "
    f"{'send s':>7} {'record s':>8} {'insert s':>8} {'x ins':>6} {'load1':>5} exact"
)


def _print_row(row: dict[str, Any]) -> None:
    phases = row["phases_seconds"]
    print(
        f"{row['api']:>3} {row['groups']:>8} {row['seconds']:>8.2f} {row['requests']:>8} "
        f"{row['events']:>8} {row['rate_limited']:>5} {row['groups_per_s']:>9.0f} "
        f"{row['cpu_us_per_group']:>10.0f} {row['emulator_cpu_us_per_group']:>10.0f} "
        f"{row['peak_rss_mb']:>7.0f} "
        f"{phases.get('claim', 0):>7.1f} "
        f"{phases.get('stream_requests', phases.get('v1_calls', 0)):>7.1f} "
        f"{phases.get('record', 0):>8.1f} {row['setup_seconds']['insert_events_seconds']:>8.2f} "
        f"{row['x_insert_events']:>6.1f} {row['load1_before']:>5.1f} {row['exact']}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", default="2000,10000", help="comma-separated group counts")
    parser.add_argument(
        "--v1-groups",
        type=int,
        help="v1 (and v2 beside it) at this size only; v1 at --groups extrapolated from it",
    )
    parser.add_argument("--quick", action="store_true", help="--groups 2000 (well under 1 min)")
    parser.add_argument("--profile", type=Path, help="cProfile of the largest v2 flush")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=("v1", "v2"), help=argparse.SUPPRESS)
    parser.add_argument("--api-base", help=argparse.SUPPRESS)
    parser.add_argument("--schema", help=argparse.SUPPRESS)
    parser.add_argument("--log", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        global SCHEMA
        SCHEMA, args.api = args.schema, args.child
        child(args)
        return 0
    sizes = [2000] if args.quick else [int(g) for g in args.groups.split(",")]
    runs = [(n, ("v1", "v2")) for n in sizes]
    if args.v1_groups:
        runs = [(args.v1_groups, ("v1", "v2"))] + [(n, ("v2",)) for n in sizes]
    emulator, api_base = flush_bench.start_emulator()
    rows: list[dict[str, Any]] = []
    log_dir = args.output.parent
    log_dir.mkdir(parents=True, exist_ok=True)
    largest = max(n for n, _ in runs)
    print(HEADER, flush=True)
    try:
        v1_per_group: float | None = None
        for groups, apis in runs:
            pair = {}
            for api in apis:
                profile = args.profile if api == "v2" and groups == largest else None
                row = run_one(api_base, api, groups, log_dir, emulator.pid, profile)
                pair[api] = row
                rows.append(row)
                _print_row(row)
            if "v1" in pair:
                v1_per_group = pair["v1"]["seconds"] / groups
                speedup = pair["v1"]["seconds"] / pair["v2"]["seconds"]
                pair["v2"]["speedup_vs_v1"] = round(speedup, 1)
                print(f"    v2 / v1 speed-up at {groups} groups (measured): {speedup:.1f}x")
            elif v1_per_group is not None:
                v1_seconds = v1_per_group * groups
                speedup = v1_seconds / pair["v2"]["seconds"]
                pair["v2"] |= {
                    "v1_seconds_extrapolated": round(v1_seconds, 1),
                    "speedup_vs_v1_extrapolated": round(speedup, 1),
                }
                print(
                    f"    v1 at {groups} groups extrapolated from {args.v1_groups}: "
                    f"{v1_seconds:.0f} s; v2 / v1 {speedup:.1f}x (extrapolated)",
                    flush=True,
                )
    except flush_bench.ChildFailed as failure:
        print(failure, file=sys.stderr)
        return 1
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
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.output}")
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
