"""The README's web command: gunicorn with `billing.gunicorn_conf` serving the webhook endpoint.
(That an exiting process publishes what was still waiting for its batch is shown in
test_sender.py, with a linger long enough to be sure something was.)"""

from __future__ import annotations

import gc
import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import requests

from billing import gunicorn_conf, logs
from billing.config import Settings
from tests.e2e.test_refuse_to_start import BAD_SETTINGS, IDS
from tests.fixtures.processes import free_port, unit_command, venv_root
from tests.fixtures.webhooks import make_event, post, queued_event_ids, rows, wait_until
from tests.process import BIN, ROOT, billing_env


@dataclass
class Served:
    url: str
    metrics_url: str
    output: str = ""
    returncode: int | None = None
    stop_seconds: float | None = None  # from SIGTERM to the arbiter's exit


def readme_command(port: int, workers: int, worker_class: str | None = None) -> list[str]:
    """The README's web command on `port`; `worker_class` overrides billing.gunicorn_conf's, as
    its flag would."""
    override = ["--worker-class", worker_class] if worker_class else []
    return [
        str(BIN / "gunicorn"),
        "-c",
        "python:billing.gunicorn_conf",
        "--workers",
        str(workers),
        *override,
        "--bind",
        f"127.0.0.1:{port}",
        "billing:create_app()",
    ]


def start_web(settings: Settings, command: list[str], **env: str) -> subprocess.Popen:
    """`command`, configured by `settings` and then `env`."""
    environ = billing_env(
        settings, BILLING_LOG_FORMAT="json", STRIPE_WEBHOOK_SECRET=settings.stripe_webhook_secret
    )
    environ.pop("PROMETHEUS_MULTIPROC_DIR", None)  # only a test's own
    environ.update(env)
    return subprocess.Popen(
        command, cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@contextmanager
def serving(settings: Settings, command: list[str], port: int, **env: str) -> Iterator[Served]:
    """`command` serving on `port`, answering; stopped gracefully (SIGTERM) after."""
    served = Served(
        f"http://127.0.0.1:{port}{settings.webhook_path}",
        f"http://127.0.0.1:{port}{settings.metrics_path}",
    )
    server = start_web(settings, command, **env)
    try:
        deadline = time.monotonic() + 30
        while True:  # an unsigned POST is refused once a worker answers
            try:
                if requests.post(served.url, data=b"{}", timeout=5).status_code == 400:
                    break
            except (requests.ConnectionError, requests.Timeout):  # not up, or still loading
                pass
            assert time.monotonic() < deadline, "gunicorn did not start"
            time.sleep(0.1)
        yield served
    finally:
        stopping = time.monotonic()
        server.send_signal(signal.SIGTERM)
        stdout, stderr = server.communicate(timeout=60)
        served.output = stdout + stderr
        served.returncode = server.returncode
        served.stop_seconds = time.monotonic() - stopping


@contextmanager
def web_command(
    settings: Settings, workers: int, worker_class: str | None = None, **env: str
) -> Iterator[Served]:
    """The README's web command on a free port (see `serving`)."""
    port = free_port()
    with serving(settings, readme_command(port, workers, worker_class), port, **env) as served:
        yield served


def test_gunicorn_serves_the_endpoint_and_every_accepted_delivery_is_queued_once(
    webhook_runtime, webhook_settings, broker_client
):
    ids = [f"evt_gunicorn_{n}" for n in range(20)]
    with web_command(webhook_settings, workers=2) as served:
        answers = [post(served.url, make_event("customer.updated", event_id)) for event_id in ids]
    assert served.returncode == 0, served.output
    assert [(a.status_code, a.json()["outcome"]) for a in answers] == [(200, "accepted")] * 20
    assert sorted(queued_event_ids(broker_client, webhook_settings.billing_queue)) == sorted(ids)
    assert {r.stripe_event_id for r in rows(webhook_runtime)} == set(ids)
    accepted = [
        json.loads(line) for line in served.output.splitlines() if logs.WEBHOOK_ACCEPTED in line
    ]
    assert sorted(record["event_id"] for record in accepted) == sorted(ids)


@pytest.mark.parametrize("worker_class", [None, "gevent"], ids=["default", "gevent"])
def test_a_delivery_waiting_on_the_database_leaves_its_worker_serving(
    webhook_runtime, webhook_settings, broker_client, worker_class
):
    """One worker answers another request while a delivery's insert waits on a table lock, then
    stores and queues that delivery: on another of its threads (the default, gthread), or
    because psycopg2 yields to gevent's hub while it waits (gevent)."""
    waiting_inserts = (
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE wait_event_type = 'Lock' AND strpos(query, 'billing_insert_') > 0"
    )
    with (
        web_command(webhook_settings, workers=1, worker_class=worker_class) as served,
        ThreadPoolExecutor(1) as pool,
    ):
        with webhook_runtime.engine.begin() as locking:
            locking.exec_driver_sql("LOCK TABLE webhook_events IN SHARE MODE")
            delivery = pool.submit(post, served.url, make_event("customer.updated", "evt_waits"))

            def insert_waits() -> bool:
                with webhook_runtime.engine.connect() as connection:
                    return connection.exec_driver_sql(waiting_inserts).scalar_one() == 1

            wait_until(insert_waits, timeout=10, what="the delivery's insert waiting on the lock")
            assert requests.post(served.url, data=b"{}", timeout=5).status_code == 400
            assert not delivery.done()
        assert delivery.result(timeout=30).json()["outcome"] == "accepted"
    assert served.returncode == 0, served.output
    assert queued_event_ids(broker_client, webhook_settings.billing_queue) == ["evt_waits"]


@pytest.mark.parametrize("worker_class", [None, "gevent"], ids=["default", "gevent"])
def test_an_idle_keep_alive_connection_does_not_hold_a_graceful_stop(
    webhook_settings, worker_class
):
    """gunicorn's own workers wait at most `keepalive` (2 s) for a connection's next request, so
    a restart does not wait out `graceful_timeout` (30 s) for a client that keeps its
    connection open and idle. gunicorn's `gevent_pywsgi` worker waits with no limit (measured:
    30.1 s against 2.7 s; bench/results/webhooks.md)."""
    # The server stops first (contexts exit in reverse), with the client's connection still open.
    with (
        requests.Session() as client,
        web_command(webhook_settings, workers=1, worker_class=worker_class) as served,
    ):
        answer = client.post(served.url, data=b"{}", timeout=5)
        assert answer.status_code == 400
        assert answer.headers.get("Connection", "").lower() != "close"
    assert served.returncode == 0, served.output
    assert served.stop_seconds is not None and served.stop_seconds < 10, served.output


def test_each_worker_freezes_what_the_loaded_app_holds():
    """Full collections then skip the app's modules and objects (they cost 70 to 310 ms)."""
    try:
        gunicorn_conf.post_worker_init(worker=None)
        assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()


def test_a_worker_freezes_the_publishers_modules_too():
    """The app does not import Celery or kombu (the CLI need not pay for them), but the web
    worker publishes every delivery: they are loaded before the freeze, not on the first one."""
    probe = (
        "import sys, billing.app\n"
        "assert 'celery' not in sys.modules\n"
        "from billing import gunicorn_conf\n"
        "gunicorn_conf.post_worker_init(worker=None)\n"
        "names = ('celery', 'kombu', 'billing.publish_transport')\n"
        "print(sorted(m for m in names if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['billing.publish_transport', 'celery', 'kombu']"


@pytest.mark.parametrize(("name", "value", "line"), BAD_SETTINGS, ids=IDS)
def test_a_bad_setting_stops_the_web_command_before_it_listens(webhook_settings, name, value, line):
    """The master checks the settings before it binds or forks (gunicorn_conf.on_starting): with
    a bad one nothing answers (a worker used to boot, answer /metrics with 200 and every webhook
    with a 500), and stderr's last line is the CLI's own, with no traceback."""
    port = free_port()
    started = time.monotonic()
    server = start_web(webhook_settings, readme_command(port, workers=2), **{name: value})
    try:
        stdout, stderr = server.communicate(timeout=20)
    finally:
        server.kill()
    assert server.returncode == 1, stdout + stderr
    assert time.monotonic() - started < 15
    assert "Traceback" not in stderr and "Booting worker" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith(f"Error: configuration error: {line}")
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", port))


DELIVERIES = 40
SCRAPES = 8


def received_total(metrics_url: str) -> float:
    body = requests.get(metrics_url, timeout=10).text
    return float(re.search(r"^billing_webhooks_received_total (\S+)$", body, re.M).group(1))


def deliver_and_scrape(served: Served) -> list[float]:
    """DELIVERIES signed deliveries, a connection each (`requests.post`), so every worker takes
    some; then the counter as SCRAPES scrapes see it."""
    for n in range(DELIVERIES):
        answer = post(served.url, make_event("customer.updated", f"evt_metrics_{n}"))
        assert answer.status_code == 200, answer.text
    return [received_total(served.metrics_url) for _ in range(SCRAPES)]


def worker_pids(output: str) -> set[str]:
    return set(re.findall(r"Booting worker with pid: (\d+)", output))


def test_every_scrape_counts_every_workers_deliveries(
    webhook_runtime, webhook_settings, broker_client, tmp_path
):
    """Four workers and no PROMETHEUS_MULTIPROC_DIR: the master makes a private directory for the
    workers' counters before any of them starts, so each scrape sums them all (it used to return
    one random worker's: 10, 8, 10), and removes it at exit."""
    with web_command(webhook_settings, workers=4, TMPDIR=str(tmp_path)) as served:
        seen = deliver_and_scrape(served)
        created = list(tmp_path.iterdir())
    assert seen == [DELIVERIES] * SCRAPES
    assert len(created) == 1 and created[0].name.startswith("billing-web-metrics-")
    assert served.returncode == 0, served.output
    assert list(tmp_path.iterdir()) == []  # removed at exit
    assert len(worker_pids(served.output)) == 4


def unit_environment(unit: str, substitutions: dict[str, str]) -> dict[str, str]:
    """A systemd unit's `Environment=` assignments, with `substitutions` made."""
    text = (ROOT / "ops" / "systemd" / unit).read_text()
    for old, new in substitutions.items():
        text = text.replace(old, new)
    lines = [line.removeprefix("Environment=") for line in text.splitlines()]
    return dict(line.split("=", 1) for line in lines if re.fullmatch(r"[A-Z_]+=\S*", line))


def test_the_web_unit_sums_its_workers_into_its_own_directory_and_stops_gracefully(
    webhook_runtime, webhook_settings, broker_client, tmp_path
):
    """ops/systemd/billing-web.service's own command line and environment: the workers count into
    the unit's PROMETHEUS_MULTIPROC_DIR (used as it is, left to systemd to remove), every scrape
    sums them, and SIGTERM (KillMode=mixed: the master) stops it within TimeoutStopSec."""
    port = free_port()
    runtime_directory = tmp_path / "billing-web"  # what RuntimeDirectory= creates, empty
    (runtime_directory / "metrics").mkdir(parents=True)
    paths = {"/run/billing-web": str(runtime_directory), "127.0.0.1:8000": f"127.0.0.1:{port}"}
    command = unit_command("billing-web.service", venv_root(), paths)
    env = unit_environment("billing-web.service", paths)
    assert env == {"PROMETHEUS_MULTIPROC_DIR": str(runtime_directory / "metrics")}
    with serving(webhook_settings, command, port, **env) as served:
        seen = deliver_and_scrape(served)
    assert seen == [DELIVERIES] * SCRAPES
    assert served.returncode == 0 and served.stop_seconds < 45, served.output
    pids = worker_pids(served.output)
    assert len(pids) == 4  # gunicorn_conf's workers
    counters = {path.name for path in (runtime_directory / "metrics").glob("counter_*.db")}
    assert {f"counter_{pid}.db" for pid in pids} <= counters


def test_an_exited_worker_is_marked_dead(monkeypatch):
    """Its live gauges leave the sum (prometheus-client's multiprocess rule); its counters stay."""
    from billing import metrics

    dead: list[int] = []
    monkeypatch.setattr(metrics, "mark_process_dead", dead.append)
    gunicorn_conf.child_exit(server=None, worker=SimpleNamespace(pid=4242))
    assert dead == [4242]
