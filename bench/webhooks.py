"""Webhook ingest benchmark: billing's endpoint (verify, store once, enqueue) against the same
endpoint running the event's handler synchronously inside the request, side by side.

Both run under gunicorn on loopback with the same worker settings; the load comes from a
separate process: `wrk` (if installed; C, so it leaves the two cores to the server) with
`webhooks_wrk.lua`, or a threaded Python client, sending pre-signed, distinct
`customer.subscription.updated` deliveries, each once, over keep-alive connections. The
handler of that event reads the subscription back from Stripe (the emulator, in its own process,
rate ceilings off), updates the billing account and refreshes entitlements: the work that the
queued endpoint leaves to a Celery worker. The per-call costs of the pieces of an accepted
delivery (signature check, the insert, Celery's publish) are measured in-process first; CPU per
delivery is read from /proc for gunicorn's processes and, as an upper bound (other users count
too), for PostgreSQL's and Redis's.

PostgreSQL gets a scratch schema, Redis a queue of this run's own (both removed at the end);
nothing consumes the queue, so its length afterwards proves every accepted event was enqueued.

    .venv/bin/python bench/webhooks.py [--requests 20000] [--sync-requests 4000]
        [--concurrency 8] [--workers N] [--worker-class C] [--threads N]
        [--load-tool wrk|python] [--output PATH]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATABASE_URL = os.environ.get(
    "BILLING_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("BILLING_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
SECRET = "whsec_bench_webhooks_0000000000"
RUN = f"{os.getpid()}"
SCHEMA = f"billing_bench_webhooks_{RUN}"
QUEUE = f"billing-bench-webhooks-{RUN}"
RESULTS = ROOT / "bench" / "results" / "webhooks.json"
ORGANIZATION_ID = 1
WARMUP_DELIVERIES = 300  # sent to each endpoint before its measured run


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _environment(api_base: str) -> dict[str, str]:
    from billing import db

    return {
        **os.environ,
        "DATABASE_URL": db.with_search_path(DATABASE_URL, SCHEMA),
        "STRIPE_SECRET_KEY": "sk_test_benchwebhooks0000",
        "STRIPE_WEBHOOK_SECRET": SECRET,
        "STRIPE_API_BASE": api_base,
        "STRIPE_METER_EVENT_RATE_PER_SECOND": "10000",
        "CELERY_BROKER_URL": REDIS_URL,
        "REDIS_URL": REDIS_URL,
        "STRIPE_BILLING_QUEUE": QUEUE,
        "BILLING_LOG_FORMAT": "json",
        "BILLING_LOG_LEVEL": "info",
        "PYTHONPATH": f"{ROOT / 'bench'}{os.pathsep}{ROOT}",
    }


# The synchronous variant, loaded by gunicorn as `webhooks:create_sync_app()` -----------------


def create_sync_app() -> Any:
    """billing's app with the one difference measured: the event is processed in the request
    (the same route, `endpoint.DirectRoute`, with a hand-off that processes instead of queuing)."""
    from billing import create_app
    from billing.runtime import Runtime
    from billing.webhooks import handlers, service
    from billing.webhooks.endpoint import DirectRoute

    def process_now(runtime: Runtime) -> service.HandOff:
        def hand_off(event_id: str, fields: dict[str, Any]) -> bool:
            service.process_event(
                runtime,
                event_id,
                handlers.HANDLERS,
                final_attempt=True,
                transient_errors=handlers.TRANSIENT_ERRORS,
            )
            service.report_queued([fields])  # the line the queued endpoint logs
            return True

        return hand_off

    app = create_app()
    route = app.wsgi_app
    if not isinstance(route, DirectRoute):
        raise RuntimeError("create_app() no longer serves webhooks through endpoint.DirectRoute")
    route.make_hand_off = process_now
    return app


# Set-up ----------------------------------------------------------------------------------------


def start_emulator(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "billing.emulator",
            "--port",
            str(port),
            "--rate-limits",
            "off",
            "--quiet",
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    _wait(lambda: urllib.request.urlopen(f"{url}/_emulator/health", timeout=1), "emulator")
    return process, url


def _wait(probe: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            probe()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.1)


def prepare(runtime: Any) -> tuple[str, str]:
    """Schema at head; org 1 linked to a customer with a subscription that grants a feature."""
    from billing import db
    from billing.models import BillingAccount

    admin = db.make_engine(DATABASE_URL)
    with admin.begin() as connection:
        connection.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE')
        connection.exec_driver_sql(f'CREATE SCHEMA "{SCHEMA}"')
    admin.dispose()
    db.upgrade(runtime.engine)
    stripe = runtime.stripe
    price = stripe.ensure_feature_price("saas", product_name="Workspace", unit_amount=4900)
    customer = stripe.create_customer("Bench org", ORGANIZATION_ID)
    subscription = stripe.client.v1.subscriptions.create(
        {"customer": customer.id, "items": [{"price": price}]}
    )
    with runtime.session_factory.begin() as session:
        session.add(
            BillingAccount(
                organization_id=ORGANIZATION_ID,
                stripe_customer_id=customer.id,
                stripe_subscription_id=subscription.id,
            )
        )
    return customer.id, subscription.id


def cleanup(runtime: Any) -> None:
    from billing import db

    runtime.close()
    admin = db.make_engine(DATABASE_URL)
    with admin.begin() as connection:
        connection.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE')
    admin.dispose()
    import redis
    from kombu.transport.redis import Channel

    client = redis.Redis.from_url(REDIS_URL)
    # The queue, and the binding sets kombu keeps under the exchange's name (Celery's is the
    # queue's).
    client.delete(
        QUEUE, Channel.keyprefix_queue % QUEUE, Channel.keyprefix_binding_permanent % QUEUE
    )
    client.close()


def delivery(customer: str, subscription: str, n: int, prefix: str) -> bytes:
    event = {
        "id": f"evt_{prefix}{n:09d}",
        "object": "event",
        "api_version": "2026-10-28.endive",
        "created": int(time.time()),
        "data": {
            "object": {
                "id": subscription,
                "object": "subscription",
                "customer": customer,
                "status": "active",
            }
        },
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": "customer.subscription.updated",
    }
    return json.dumps(event).encode()


def signed(bodies: list[bytes]) -> list[tuple[bytes, str]]:
    import stripe

    now = int(time.time())
    return [
        (body, stripe.WebhookSignature.generate_signature_header(body.decode(), SECRET, now))
        for body in bodies
    ]


# Component costs (in-process) ------------------------------------------------------------------


def component_costs(runtime: Any, customer: str, subscription: str, n: int = 2000) -> dict:
    """Wall and CPU microseconds per call of each piece of an accepted delivery."""
    from billing.task_names import WEBHOOK_PROCESS_TASK as PROCESS_TASK
    from billing.webhooks import service
    from billing.webhooks.publish import enqueuer

    deliveries = signed([delivery(customer, subscription, i, "cost") for i in range(n)])
    verified = [
        service.verify_delivery(*signed_body, runtime.settings) for signed_body in deliveries
    ]
    ids = [[one.event["id"]] for one in verified]
    enqueue = enqueuer(runtime)
    enqueue("evt_warmup")
    publisher = runtime.task_publisher
    pieces = {
        "verify": lambda i: service.verify_delivery(*deliveries[i], runtime.settings),
        "store_once": lambda i: service.store_once(
            runtime.ingest_engine, verified[i].event, verified[i].text
        ),
        "celery_publish": lambda i: enqueue(ids[i][0]),
        # What the view's background publisher does with the tasks that arrive together.
        "publish_batch_of_8": lambda i: i % 8 or publisher.send_many(PROCESS_TASK, ids[i : i + 8]),
    }
    costs: dict[str, Any] = {"calls": n}
    for name, piece in pieces.items():
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(n):
            piece(i)
        costs[f"{name}_wall_us"] = round((time.perf_counter() - wall) / n * 1e6, 1)
        costs[f"{name}_cpu_us"] = round((time.process_time() - cpu) / n * 1e6, 1)
    with runtime.engine.begin() as connection:
        connection.exec_driver_sql("TRUNCATE webhook_events")
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.delete(QUEUE)
    client.close()
    return costs


# gunicorn and the load process -------------------------------------------------------------------


def start_gunicorn(app: str, env: dict[str, str], args: argparse.Namespace, log: Path) -> tuple:
    port = _free_port()
    process = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("gunicorn")),
            app,
            "--config",
            "python:billing.gunicorn_conf",  # the README's web command
            "--bind",
            f"127.0.0.1:{port}",
            *gunicorn_overrides(args),
            "--keep-alive",
            "30",
            "--backlog",
            "2048",
        ],
        env=env,
        cwd=ROOT,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/stripe/webhook"

    def probe() -> None:
        request = urllib.request.Request(url, data=b"{}", method="POST")
        try:
            urllib.request.urlopen(request, timeout=1)
        except urllib.error.HTTPError as error:
            if error.code != 400:
                raise

    _wait(probe, "gunicorn")
    return process, url


def gunicorn_overrides(args: argparse.Namespace) -> list[str]:
    """The worker flags given on the bench's command line; the rest is billing.gunicorn_conf's."""
    flags = {
        "--workers": args.workers,
        "--worker-class": args.worker_class,
        "--threads": args.threads,
    }
    return [
        part for flag, value in flags.items() if value is not None for part in (flag, str(value))
    ]


WRK_SCRIPT = ROOT / "bench" / "webhooks_wrk.lua"


def run_load(url: str, deliveries: list[tuple[bytes, str]], args: argparse.Namespace) -> dict:
    """Send the deliveries from a separate process over `args.concurrency` keep-alive
    connections: `wrk` (C, a few µs of CPU per request, so the server keeps the cores) with a
    Lua script that sends each pre-signed delivery once; without wrk, a Python client."""
    path = Path(f"/tmp/billing-bench-webhooks-{RUN}-{time.time_ns()}.txt")
    # One delivery per line: signature header, a tab, the JSON body (no tabs or newlines in it).
    path.write_bytes(b"".join(s.encode() + b"\t" + b + b"\n" for b, s in deliveries))
    try:
        if args.load_tool == "wrk":
            return _run_wrk(url, path, len(deliveries), args)
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--load",
                url,
                "--bodies",
                str(path),
                "--concurrency",
                str(args.concurrency),
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return json.loads(out)
    finally:
        path.unlink(missing_ok=True)


def _run_wrk(url: str, bodies: Path, count: int, args: argparse.Namespace) -> dict:
    """wrk sends for a fixed time, not a count: its script stops each connection after its
    share of the deliveries (none is sent twice) and the duration only bounds the run."""
    before = os.times()
    wrk = subprocess.Popen(
        [
            args.wrk,
            "-t",
            str(args.wrk_threads),
            "-c",
            str(args.concurrency),
            "-d",
            f"{args.max_seconds}s",
            "--timeout",
            "10s",
            "-s",
            str(WRK_SCRIPT),
            url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "BENCH_BODIES": str(bodies), "BENCH_THREADS": str(args.wrk_threads)},
    )
    output: list[str] = []
    finished = 0
    assert wrk.stdout is not None
    for line in wrk.stdout:
        output.append(line)
        if line.strip() == "DONE":
            finished += 1
            if finished == args.wrk_threads:  # SIGINT: wrk stops its clock and reports now
                wrk.send_signal(signal.SIGINT)
    stderr = wrk.stderr.read() if wrk.stderr else ""
    if wrk.wait() != 0:
        raise RuntimeError(f"wrk failed:\n{''.join(output)}\n{stderr}")
    after = os.times()
    lines = [line for line in output if line.startswith("BENCH ")]
    if not lines:
        raise RuntimeError(f"wrk printed no result:\n{''.join(output)}\n{stderr}")
    result = json.loads(lines[-1][len("BENCH ") :])
    load_cpu = (
        after.children_user + after.children_system - before.children_user - before.children_system
    )
    requests = result["requests"]
    return {
        "requests": requests,
        "seconds": result["seconds"],
        "per_second": round(requests / result["seconds"], 1),
        "p50_ms": round(result["p50_us"] / 1000, 2),
        "p99_ms": round(result["p99_us"] / 1000, 2),
        "mean_ms": round(result["mean_us"] / 1000, 2),
        "statuses": result["statuses"],
        "socket_errors": result["errors"],
        "duplicates_answered": result["duplicates"],
        "unsent": count - requests,
        "load_cpu_ms_per_request": round(load_cpu / max(requests, 1) * 1000, 3),
    }


def load_main(url: str, bodies_path: str, concurrency: int) -> None:
    deliveries = [
        line.split("\t", 1) for line in Path(bodies_path).read_text().splitlines() if line
    ]
    parsed = urllib.parse.urlsplit(url)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    cursor = iter(range(len(deliveries)))
    barrier = threading.Barrier(concurrency + 1)

    def worker() -> None:
        connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
        mine: list[float] = []
        codes: dict[int, int] = {}
        barrier.wait()
        while True:
            with lock:
                index = next(cursor, None)
            if index is None:
                break
            signature, body = deliveries[index]
            started = time.perf_counter()
            connection.request(
                "POST",
                parsed.path,
                body=body.encode(),
                headers={
                    "Content-Type": "application/json",
                    "Stripe-Signature": signature,
                },
            )
            response = connection.getresponse()
            response.read()
            mine.append(time.perf_counter() - started)
            codes[response.status] = codes.get(response.status, 0) + 1
            if response.will_close:
                connection.close()
                connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
        with lock:
            latencies.extend(mine)
            for code, count in codes.items():
                statuses[code] = statuses.get(code, 0) + count

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000, 2)

    print(
        json.dumps(
            {
                "requests": len(latencies),
                "seconds": round(elapsed, 3),
                "per_second": round(len(latencies) / elapsed, 1),
                "p50_ms": pct(50),
                "p99_ms": pct(99),
                "mean_ms": round(statistics.fmean(latencies) * 1000, 2),
                "statuses": {str(k): v for k, v in sorted(statuses.items())},
                "load_cpu_ms_per_request": round(time.process_time() / len(latencies) * 1000, 3),
            }
        )
    )


def cpu_seconds(master: int) -> float:
    """User + system CPU of gunicorn's workers so far (Linux /proc; 0 elsewhere)."""
    ticks = os.sysconf("SC_CLK_TCK")
    try:
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    except OSError:
        return 0.0
    total = 0
    for pid in [str(master), *children]:
        try:
            total += _cpu_ticks(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1])
        except OSError:
            continue
    return total / ticks


def _cpu_ticks(stat_tail: str) -> int:
    """A process's user + system CPU and that of its children it has reaped (/proc/PID/stat,
    after the name): PostgreSQL's backends that exit during a run (autovacuum workers, closed
    connections) leave their CPU in the postmaster's counts instead of out of the total."""
    fields = stat_tail.split()
    return sum(int(field) for field in fields[11:15])  # utime, stime, cutime, cstime


SERVICES = ("postgres", "redis-server")


def services_cpu_seconds() -> float:
    """CPU of every PostgreSQL and Redis process on the machine (other users' too: an upper
    bound of what a delivery costs them)."""
    ticks, total = os.sysconf("SC_CLK_TCK"), 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            head, tail = stat.read_text().rsplit(")", 1)
        except OSError:
            continue
        if head.split("(", 1)[1] in SERVICES:
            total += _cpu_ticks(tail)
    return total / ticks


def measure(
    name: str,
    app: str,
    env: dict,
    args: argparse.Namespace,
    count: int,
    customer: str,
    subscription: str,
    log: Path,
) -> dict:
    process, url = start_gunicorn(app, env, args, log)
    try:
        warmup = signed(
            [delivery(customer, subscription, i, f"{name}w") for i in range(WARMUP_DELIVERIES)]
        )
        run_load(url, warmup, args)
        deliveries = signed([delivery(customer, subscription, i, name) for i in range(count)])
        before, load_before = cpu_seconds(process.pid), os.getloadavg()[0]
        services_before = services_cpu_seconds()
        result = run_load(url, deliveries, args)
        result["server_cpu_ms_per_request"] = round(
            (cpu_seconds(process.pid) - before) / result["requests"] * 1000, 3
        )
        result["postgres_redis_cpu_ms_per_request"] = round(
            (services_cpu_seconds() - services_before) / result["requests"] * 1000, 3
        )
        result["load_average_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        return result
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def count_rows(runtime: Any, status: str | None = None) -> int:
    import sqlalchemy as sa

    from billing.models import WebhookEvent

    query = sa.select(sa.func.count()).select_from(WebhookEvent)
    if status:
        query = query.where(WebhookEvent.status == status)
    with runtime.session_factory() as session:
        return int(session.scalar(query))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--sync-requests", type=int, default=4_000)
    # 8 connections keep the two cores busy: 12 and 16 gave the same deliveries/s side by side,
    # the extra ones only waiting in the server (p99 18, 26 and 32 ms); see docs/performance.md.
    parser.add_argument("--concurrency", type=int, default=8)
    # Unset: billing.gunicorn_conf's (the README's web command).
    parser.add_argument("--workers", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--worker-class")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--load-tool",
        choices=("wrk", "python"),
        default=None,
        help="wrk if installed (default), else a threaded Python client",
    )
    parser.add_argument("--wrk", default=shutil.which("wrk") or "wrk", help=argparse.SUPPRESS)
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument(
        "--max-seconds",
        type=int,
        default=120,
        help="wrk's run time bound (a run ends when every delivery is answered)",
    )
    parser.add_argument("--load", help=argparse.SUPPRESS)
    parser.add_argument("--bodies", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        load_main(args.load, args.bodies, args.concurrency)
        return
    if args.load_tool is None:
        args.load_tool = "wrk" if shutil.which(args.wrk) else "python"

    import redis

    from billing.config import Settings
    from billing.runtime import Runtime

    emulator_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    emulator, api_base = start_emulator(emulator_env)
    env = _environment(api_base)
    try:
        runtime = Runtime(Settings.from_env(env))
    except Exception:  # a refused setting must not leave the emulator running
        emulator.terminate()
        raise
    log = Path(f"/tmp/billing-bench-webhooks-{RUN}.log")
    try:
        customer, subscription = prepare(runtime)
        costs = component_costs(runtime, customer, subscription)
        print(
            "per call (wall/CPU µs): "
            + ", ".join(
                f"{name} {costs[name + '_wall_us']}/{costs[name + '_cpu_us']}"
                for name in ("verify", "store_once", "celery_publish", "publish_batch_of_8")
            ),
            flush=True,
        )
        queued = measure(
            "queued", "billing:create_app()", env, args, args.requests, customer, subscription, log
        )
        stored = count_rows(runtime)
        queue_length = redis.Redis.from_url(REDIS_URL).llen(QUEUE)
        synchronous = measure(
            "sync",
            "webhooks:create_sync_app()",
            env,
            args,
            args.sync_requests,
            customer,
            subscription,
            log,
        )
        processed_sync = count_rows(runtime, "processed")
    finally:
        emulator.terminate()
        emulator.wait(timeout=30)
        cleanup(runtime)
    result = {
        "machine": {"cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2)},
        "gunicorn": {"config": "billing.gunicorn_conf", "overrides": gunicorn_overrides(args)},
        "load_tool": args.load_tool,
        "concurrency": args.concurrency,
        "warmup_deliveries": WARMUP_DELIVERIES,
        "component_costs": costs,
        "queued": {**queued, "rows_stored": stored, "tasks_enqueued": queue_length},
        "synchronous": {**synchronous, "rows_processed": processed_sync},
        "throughput_ratio": round(queued["per_second"] / synchronous["per_second"], 2),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{'endpoint':<12} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'server CPU ms/req':>18}"
        "  statuses"
    )
    for name in ("queued", "synchronous"):
        row = result[name]
        print(
            f"{name:<12} {row['per_second']:>9} {row['p50_ms']:>8} {row['p99_ms']:>8} "
            f"{row['server_cpu_ms_per_request']:>18}  {row['statuses']}  "
            f"load {row['load_average_1m']}"
        )
    print(
        f"queued/synchronous throughput: {result['throughput_ratio']}x; rows stored {stored}, "
        f"tasks enqueued {queue_length}; written to {args.output}"
    )


if __name__ == "__main__":
    main()
