"""Benchmark: sustained meter-event requests/s of the Stripe emulator on this machine.

Starts `python -m billing.emulator` in a subprocess (so server and load generator don't share a
GIL), creates a meter and customers, sets the rate ceiling (`--rate-limits`, default off), then
drives `POST /v1/billing/meter_events` from a separate load-generator process over several
keep-alive connections, with the form bodies and headers stripe-python sends (unique
identifiers, one customer per connection). Prints requests/s, p50/p99 latency, statuses and
errors, then does a shorter run through stripe-python itself for comparison, and writes the
figures to `--output` (default bench/results/emulator.json).

    python bench/emulator.py [--duration 10] [--connections 8] [--stripe-duration 3]
        [--stripe-processes 1] [--rate-limits off|live|test] [--output PATH]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import selectors
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "emulator.json"
KEY = "sk_test_bench"
EVENT = "bench_calls"


def start_emulator() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "billing.emulator",
            "--port",
            "0",
            "--rate-limits",
            "off",
            "--quiet",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 20
    for line in proc.stderr:
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            # Keep draining stderr so the server never blocks on a full pipe.
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, m.group(1)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit("emulator did not start")


def api(url: str, path: str, form: str) -> dict[str, Any]:
    req = urllib.request.Request(
        url + path, data=form.encode(), headers={"Authorization": f"Bearer {KEY}"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def control(url: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url + "/_emulator/" + path, data=data, method="GET" if body is None else "POST"
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


# load generator (runs in its own process) -------------------------------------------------------


def _request(host: str, customer: str, n: int, run: str) -> bytes:
    ident = f"{run}-{customer[-6:]}-{n}"
    body = (
        f"event_name={EVENT}&payload[stripe_customer_id]={quote(customer)}"
        f"&payload[value]=1&identifier={ident}"
    ).encode()
    ua = json.dumps(
        {
            "bindings_version": "16.1.0",
            "lang": "python",
            "httplib": "requests",
            "lang_version": platform.python_version(),
        }
    )
    head = (
        "POST /v1/billing/meter_events HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        "User-Agent: Stripe/v1 PythonBindings/16.1.0\r\n"
        "Accept-Encoding: gzip, deflate\r\nAccept: */*\r\nConnection: keep-alive\r\n"
        f"X-Stripe-Client-User-Agent: {ua}\r\n"
        f"Authorization: Bearer {KEY}\r\n"
        f"Idempotency-Key: {uuid.uuid4()}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        "Stripe-Version: 2026-10-28.endive\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class _Conn:
    def __init__(self, addr: tuple[str, int], customer: str) -> None:
        self.sock = socket.create_connection(addr)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.customer = customer
        self.buf = b""
        self.sent_at = 0.0
        self.n = 0


def load(url: str, customers: list[str], duration: float, warmup: float, out: Any) -> None:
    """One thread, non-blocking sockets: each connection has one request in flight."""
    parts = urlsplit(url)
    addr = (parts.hostname or "127.0.0.1", parts.port or 80)
    host = parts.netloc
    run = uuid.uuid4().hex[:8]
    sel = selectors.DefaultSelector()
    conns = [_Conn(addr, c) for c in customers]
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors = 0
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + duration

    def send(c: _Conn) -> None:
        c.n += 1
        c.sent_at = time.perf_counter()
        c.sock.sendall(_request(host, c.customer, c.n, run))

    for c in conns:
        sel.register(c.sock, selectors.EVENT_READ, c)
        send(c)
    live = len(conns)
    while live:
        for key, _ in sel.select(timeout=1.0):
            c = key.data
            try:
                chunk = c.sock.recv(65536)
            except BlockingIOError:
                continue
            if not chunk:
                errors += 1
                sel.unregister(c.sock)
                live -= 1
                continue
            c.buf += chunk
            end = c.buf.find(b"\r\n\r\n")
            if end < 0:
                continue
            m = re.search(rb"Content-Length: (\d+)", c.buf[:end], re.I)
            total = end + 4 + (int(m.group(1)) if m else 0)
            if len(c.buf) < total:
                continue
            now = time.perf_counter()
            status = c.buf[9:12].decode()
            c.buf = c.buf[total:]
            if c.sent_at >= measure_from and now <= stop_at:
                latencies.append(now - c.sent_at)
                statuses[status] = statuses.get(status, 0) + 1
                if status != "200":
                    errors += 1
            if now < stop_at:
                send(c)
            else:
                sel.unregister(c.sock)
                c.sock.close()
                live -= 1
    latencies.sort()
    out.put({"latencies": latencies, "statuses": statuses, "errors": errors, "duration": duration})


def _pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _latency_summary(lat: list[float], duration: float, errors: int) -> dict[str, Any]:
    """Throughput and latency figures of one run; `lat` sorted ascending, in seconds."""
    return {
        "duration_s": duration,
        "requests": len(lat),
        "requests_per_s": round(len(lat) / duration, 1),
        "p50_ms": round(_pct(lat, 0.50) * 1000, 3),
        "p99_ms": round(_pct(lat, 0.99) * 1000, 3),
        "max_ms": round(lat[-1] * 1000, 3) if lat else None,
        "errors": errors,
    }


def raw_run(url: str, customers: list[str], duration: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=load, args=(url, customers, duration, 1.0, out))
    proc.start()
    result = out.get(timeout=duration + 60)
    proc.join()
    return {
        "connections": len(customers),
        **_latency_summary(result["latencies"], duration, result["errors"]),
        "statuses": result["statuses"],
    }


# through stripe-python --------------------------------------------------------------------------


def _stripe_worker(url: str, customer: str, duration: float, out: Any) -> None:
    import stripe

    client = stripe.StripeClient(
        KEY, base_addresses={"api": url, "meter_events": url}, max_network_retries=0
    )
    run = uuid.uuid4().hex[:8]
    lat: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + duration
    n = 0
    while time.perf_counter() < stop_at:
        n += 1
        t0 = time.perf_counter()
        try:
            client.v1.billing.meter_events.create(
                {
                    "event_name": EVENT,
                    "identifier": f"sp-{run}-{n}",
                    "payload": {"stripe_customer_id": customer, "value": "1"},
                }
            )
            lat.append(time.perf_counter() - t0)
        except stripe.StripeError:
            errors += 1
    out.put((lat, errors))


def stripe_run(url: str, customers: list[str], duration: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_stripe_worker, args=(url, c, duration, out)) for c in customers]
    for p in procs:
        p.start()
    lat: list[float] = []
    errors = 0
    for _ in procs:
        part, errs = out.get(timeout=duration + 60)
        lat += part
        errors += errs
    for p in procs:
        p.join()
    lat.sort()
    return {"client_processes": len(procs), **_latency_summary(lat, duration, errors)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds (raw load)")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument(
        "--stripe-duration",
        type=float,
        default=3.0,
        help="seconds through stripe-python (0 = skip)",
    )
    ap.add_argument("--stripe-processes", type=int, default=1)
    ap.add_argument(
        "--rate-limits",
        choices=("off", "live", "test"),
        default="off",
        help="the emulator's rate ceilings during the measured runs",
    )
    ap.add_argument("--output", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    args.output = args.output.resolve()

    proc, url = start_emulator()
    try:
        control(url, "limits", {"preset": "off"})
        api(
            url,
            "/v1/billing/meters",
            f"display_name=Bench&event_name={EVENT}&default_aggregation[formula]=sum",
        )
        customers = [
            api(url, "/v1/customers", f"name=bench{i}")["id"]
            for i in range(args.connections + args.stripe_processes)
        ]
        control(url, "limits", {"preset": args.rate_limits})
        raw = raw_run(url, customers[: args.connections], args.duration)
        stats = control(url, "stats")
        through_stripe = None
        if args.stripe_duration > 0:
            through_stripe = stripe_run(url, customers[args.connections :], args.stripe_duration)
    finally:
        proc.terminate()
        code = proc.wait(timeout=10)

    result = {
        "benchmark": "emulator meter events",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "rate_limits": args.rate_limits,
        "raw_keep_alive": raw,
        "stripe_python": through_stripe,
        "server_accepted_meter_events": stats["meter_events"]["accepted"],
        "server_exit_code": code,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"raw keep-alive ({raw['connections']} connections, {raw['duration_s']:.0f} s): "
        f"{raw['requests_per_s']:.0f} req/s, p50 {raw['p50_ms']:.2f} ms, "
        f"p99 {raw['p99_ms']:.2f} ms, errors {raw['errors']}, statuses {raw['statuses']}"
    )
    if through_stripe:
        print(
            f"stripe-python ({through_stripe['client_processes']} process): "
            f"{through_stripe['requests_per_s']:.0f} req/s, "
            f"p50 {through_stripe['p50_ms']:.2f} ms, p99 {through_stripe['p99_ms']:.2f} ms, "
            f"errors {through_stripe['errors']}"
        )
    print(f"server exit code {code}; results in {args.output}")
    # Under a ceiling, 429s are the expected answer past it; anything else is an error.
    refused = sum(n for status, n in raw["statuses"].items() if status not in ("200", "429"))
    expected_429 = args.rate_limits != "off"
    failed = refused if expected_429 else raw["errors"]
    return 0 if failed == 0 and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
