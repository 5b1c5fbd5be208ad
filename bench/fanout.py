"""Fan-out benchmark: the hourly task's sending on 1, 2 and 4 Celery worker processes, side by side.

One backlog (`--events` over `--orgs` organizations and `--hours` hours, as `bench/flush.py`
builds it) is claimed once; before each run every outbox row is made pending again under a new
identifier, so Stripe sees new events. For each worker count W (`--workers 1,2,4`, interleaved
over `--rounds`) it starts a real prefork worker (`celery worker -c W`) on the broker
(`--broker`, default the local Redis) with `STRIPE_USAGE_FANOUT_TASKS=W-1` (W=1: today's
in-process sending, no fan-out), waits for it to be ready, queues `billing.usage.flush_hourly`
and times it to its result. The emulator runs at `--limits live` (1,000 meter events/s, 429
beyond); the client limit is `--rate` (with W>1 the shared Redis limit of every process).
`--latency-ms 0,20` holds every meter event call that long in the emulator, as a network round
trip to Stripe would (a lane then sends at most 1,000/latency calls a second); each latency is run
with every worker count in every round.

Printed, and written as JSON (`--output`, default bench/results/fanout.json): calls, 429s, wall
seconds, calls/s, worker CPU (every pool process) and emulator CPU per call, the largest pool
process's peak RSS, load average, and whether every row was sent with Stripe's totals equal to
the database's; then the ratios of W workers' calls/s to one worker's (median over the rounds).

    .venv/bin/python bench/fanout.py [--events 20000] [--orgs 1000] [--workers 1,2,4] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import flush as flush_bench  # noqa: E402  (its emulator, schema and backlog helpers)

RESULTS = ROOT / "bench" / "results" / "fanout.json"
BIN = Path(sys.executable).parent
REDIS_URL = os.environ.get("BILLING_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
METER_EVENTS = "/v1/billing/meter_events"
QUICK = {"events": 6000, "orgs": 400, "hours": 2, "rounds": 1}


def _settings(api_base: str, args: argparse.Namespace, queue: str, fanout_tasks: int):
    return flush_bench._settings(
        api_base,
        flush_bench.SCHEMA,
        args.rate,
        billing_queue=queue,
        redis_url=REDIS_URL,
        celery_broker_url=args.broker,
        celery_result_backend=REDIS_URL,
        flush_lock_key=f"billing:bench-fanout:{os.getpid()}",
        submit_fanout_tasks=fanout_tasks,
        retry_backoff_seconds=0.05,
    )


def _env(settings: Any) -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "VIRTUAL_ENV", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(
        STRIPE_BILLING_ENABLED="1",
        STRIPE_SECRET_KEY="sk_test_benchfanout0000",  # from_env wants letters and digits
        STRIPE_API_BASE=settings.stripe_api_base,
        STRIPE_BILLING_METERS=",".join(settings.stripe_meters),
        STRIPE_METER_EVENT_RATE_PER_SECOND=str(settings.stripe_meter_event_rate_per_second),
        STRIPE_BILLING_QUEUE=settings.billing_queue,
        STRIPE_USAGE_FLUSH_LOCK_KEY=settings.flush_lock_key,
        STRIPE_USAGE_FANOUT_TASKS=str(settings.submit_fanout_tasks),
        STRIPE_USAGE_FANOUT_PART_ROWS=str(settings.submit_fanout_part_rows),
        STRIPE_BILLING_VALIDATE_CONTRACT_BEFORE_FLUSH="0",
        STRIPE_BILLING_RETRY_BACKOFF_SECONDS=str(settings.retry_backoff_seconds),
        DATABASE_URL=settings.database_url,
        REDIS_URL=settings.redis_url,
        CELERY_BROKER_URL=settings.celery_broker_url,
        CELERY_RESULT_BACKEND=settings.celery_result_backend,
        BILLING_LOG_FORMAT="json",
        BILLING_LOG_LEVEL="info",
    )
    return env


def _pool_pids(worker_pid: int) -> list[int]:
    """The worker's pid and its pool children's."""
    children = Path(f"/proc/{worker_pid}/task/{worker_pid}/children").read_text().split()
    return [worker_pid, *map(int, children)]


def _pool_cpu(worker_pid: int) -> float:
    """CPU seconds of the worker and its pool children so far."""
    return sum(flush_bench._process_cpu(pid) for pid in _pool_pids(worker_pid))


def _pool_peak_rss_mb(worker_pid: int) -> float:
    """The largest peak resident set (VmHWM) of the worker and its pool children, in MB: forked
    children share the parent's pages, so a sum would count those again."""
    return max(flush_bench.process_peak_rss_mb(pid) for pid in _pool_pids(worker_pid))


def _start_worker(settings: Any, processes: int, log_path: Path) -> subprocess.Popen:
    command = [
        str(BIN / "celery"),
        "-A",
        "billing.celery_app",
        "worker",
        "-Q",
        settings.billing_queue,
        "-n",
        f"bench-{uuid.uuid4().hex[:6]}@%h",
        "-P",
        "prefork",
        "-c",
        str(processes),
        "--without-mingle",
        "--without-gossip",
        "--loglevel",
        "INFO",
    ]
    log = log_path.open("w")
    worker = subprocess.Popen(command, env=_env(settings), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while " ready." not in log_path.read_text():
        if worker.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the worker did not start; its log: {log_path}")
        time.sleep(0.1)
    return worker


def run_one(args: argparse.Namespace, api_base: str, emulator_pid: int, workers: int, tag: str):
    from billing.broker import make_sender
    from billing.task_names import FLUSH_HOURLY_TASK

    calls = flush_bench._rearm(tag)
    queue = f"bench-fanout-{os.getpid()}-{tag}"
    settings = _settings(api_base, args, queue, workers - 1)
    log_path = Path(tempfile.gettempdir()) / f"billing-bench-fanout-{tag}.log"
    worker = _start_worker(settings, workers, log_path)
    try:
        flush_bench._control(api_base, "stats/reset", {})
        load_before = os.getloadavg()[0]
        cpu_before, emulator_before = _pool_cpu(worker.pid), flush_bench._process_cpu(emulator_pid)
        sender = make_sender(settings)
        sender.conf.result_backend = REDIS_URL
        started = time.monotonic()
        try:
            outcome = sender.send_task(FLUSH_HOURLY_TASK, queue=queue).get(timeout=3600)
        finally:
            sender.close()
        wall = time.monotonic() - started
        cpu = _pool_cpu(worker.pid) - cpu_before
        peak_rss = _pool_peak_rss_mb(worker.pid)
        emulator_cpu = flush_bench._process_cpu(emulator_pid) - emulator_before
    finally:
        worker.terminate()
        worker.wait(30)
    stats = flush_bench._control(api_base, "stats")
    by_status = stats["responses"].get(f"POST {METER_EVENTS}", {})
    unsent = int(flush_bench._sql("SELECT count(*) FROM usage_submissions WHERE status <> 'sent'"))
    accepted = by_status.get("200", 0)
    return {
        "workers": workers,
        "fanout_tasks": workers - 1,
        "calls": calls,
        "rate_limited_429": by_status.get("429", 0),
        "wall_seconds": wall,
        "calls_per_second": calls / wall,
        "worker_cpu_ms_per_call": cpu / calls * 1000,
        "emulator_cpu_ms_per_call": emulator_cpu / calls * 1000,
        "peak_rss_mb": peak_rss,
        "load1_before": load_before,
        "load1_after": os.getloadavg()[0],
        "exact": outcome["ok"]
        and outcome["submissions_sent"] == calls
        and accepted == calls
        and unsent == 0,
    }


HEADER = (
    f"{'round':>5} {'ms/call':>7} {'workers':>7} | "
    f"{'calls':>6} {'429':>5} {'wall s':>7} {'calls/s':>8} | "
    f"{'worker CPU ms/call':>18} {'emulator':>8} | {'RSS MB':>6} | {'load1':>5} | exact"
)


def _print(row: dict[str, Any], round_: int) -> None:
    print(
        f"{round_:>5} {row['latency_ms']:>7g} {row['workers']:>7} | "
        f"{row['calls']:>6} {row['rate_limited_429']:>5} "
        f"{row['wall_seconds']:>7.2f} {row['calls_per_second']:>8.0f} | "
        f"{row['worker_cpu_ms_per_call']:>18.3f} {row['emulator_cpu_ms_per_call']:>8.3f} | "
        f"{row['peak_rss_mb']:>6.0f} | "
        f"{row['load1_before']:>5.1f} | {'yes' if row['exact'] else 'NO'}",
        flush=True,
    )


def _set_latency(api_base: str, latency_ms: float) -> None:
    flush_bench._control(api_base, "faults", {"clear": True})
    if latency_ms:
        rule = {"path": METER_EVENTS, "method": "POST", "latency_ms": latency_ms}
        flush_bench._control(api_base, "faults", rule)


def ratios(rows: list[dict[str, Any]]) -> list[tuple[float, int, float]]:
    """(latency ms, W, W workers' calls/s over one worker's at that latency), medians of the
    rounds."""
    by_shape: dict[tuple[float, int], list[float]] = {}
    for row in rows:
        key = (row["latency_ms"], row["workers"])
        by_shape.setdefault(key, []).append(row["calls_per_second"])
    medians = {key: flush_bench._median(v) for key, v in by_shape.items()}
    return [
        (latency, workers, median / medians[(latency, 1)])
        for (latency, workers), median in sorted(medians.items())
        if workers != 1 and medians.get((latency, 1))
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--orgs", type=int, default=1000)
    parser.add_argument("--hours", type=int, default=3)
    parser.add_argument("--workers", default="1,2,4", help="comma-separated process counts")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--limits", choices=("live", "off"), default="live")
    parser.add_argument("--rate", type=float, default=1000.0, help="the client's limit, calls/s")
    parser.add_argument(
        "--latency-ms", default="0", help="comma-separated round trips of a meter event call"
    )
    parser.add_argument("--broker", default=REDIS_URL, help="CELERY_BROKER_URL of the workers")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK} (under a minute)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    counts = [int(w) for w in args.workers.split(",")]
    latencies = [float(ms) for ms in args.latency_ms.split(",")]

    emulator, api_base = flush_bench.start_emulator()
    rows: list[dict[str, Any]] = []
    try:
        prepared = flush_bench.prepare(
            api_base, flush_bench.SCHEMA, args.events, args.orgs, args.hours
        )
        from billing.runtime import Runtime
        from billing.usage.service import flush_pass

        runtime = Runtime(
            _settings(api_base, args, "unused", 0).replace(
                stripe_meter_event_rate_per_second=100_000
            )
        )
        claimed = flush_pass(runtime, contract_check=False)  # claimed (and sent) once, no limits
        runtime.close()
        print(
            f"{args.events} events over {args.orgs} organizations and {args.hours} h: "
            f"{prepared['groups']} groups ({claimed.submissions_sent} outbox rows); machine "
            f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; emulator {args.limits}",
            flush=True,
        )
        flush_bench._control(api_base, "limits", {"preset": args.limits})
        print(HEADER, flush=True)
        for round_ in range(1, args.rounds + 1):
            for latency in latencies:
                _set_latency(api_base, latency)
                for workers in counts:
                    tag = f"r{round_}l{latency:g}w{workers}"
                    row = run_one(args, api_base, emulator.pid, workers, tag)
                    row.update(round=round_, latency_ms=latency)
                    rows.append(row)
                    _print(row, round_)
    finally:
        emulator.terminate()
        emulator.wait(10)
        flush_bench._drop_schema()
    summary = ratios(rows)
    for latency, workers, ratio in summary:
        print(f"calls/s {workers} workers vs 1 at {latency:g}ms: {ratio:.2f}x (median of rounds)")
    report = {
        "benchmark": "hourly task sending on 1, 2, 4 worker processes",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "shape": {"events": args.events, "orgs": args.orgs, "hours": args.hours},
        "limits": args.limits,
        "latencies_ms": latencies,
        "client_rate_per_second": args.rate,
        "runs": rows,
        "ratios": {f"{w}_vs_1_at_{ms:g}ms": ratio for ms, w, ratio in summary},
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.output}")
    return 0 if all(row["exact"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
