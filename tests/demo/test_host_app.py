"""The demo host app as `scripts/demo_saas.sh` serves it: `flask run`, text logs."""

from __future__ import annotations

import urllib.error
import urllib.request

from billing import db
from tests.fixtures.processes import BIN, Processes, free_port, wait_for_http


def test_each_request_is_logged_once(tmp_path):
    database_url = f"sqlite:///{tmp_path / 'billing.db'}"
    engine = db.make_engine(database_url)
    db.upgrade(engine)
    engine.dispose()
    port = free_port()
    env = {
        "PATH": str(BIN) + ":/usr/bin:/bin",
        "HOME": str(tmp_path),
        "DATABASE_URL": database_url,
        "STRIPE_WEBHOOK_SECRET": "whsec_demo00000000",
        "BILLING_LOG_FORMAT": "text",  # what the script sets
    }
    started = Processes(tmp_path)
    app = started.start(
        "demo",
        [
            str(BIN / "flask"),
            "--app",
            "billing.demo.host_app:create_demo_app()",
            "run",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(base + "/?probe=ready")
        # The webhook view builds billing's runtime, the first thing that logs through billing.
        try:
            urllib.request.urlopen(urllib.request.Request(base + "/stripe/webhook", b"{}"))
        except urllib.error.HTTPError as refused:
            assert refused.code == 400  # no signature
        with urllib.request.urlopen(base + "/?probe=after-runtime") as response:
            assert response.status == 200
    finally:
        started.stop_all()
    log = app.log_path.read_text()  # type: ignore[attr-defined]
    for request in ("GET /?probe=after-runtime HTTP/1.1", "POST /stripe/webhook HTTP/1.1"):
        assert sum(request in line for line in log.splitlines()) == 1, log
    assert log.count("Stripe webhook rejected") == 1, log
