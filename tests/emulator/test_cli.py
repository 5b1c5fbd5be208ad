"""`python -m billing.emulator`: listens, logs a line per request, stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_cli_serves_logs_and_stops_on_sigterm():
    proc = subprocess.Popen(
        [sys.executable, "-m", "billing.emulator", "--port", "0", "--rate-limits", "off"],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = None
        for line in proc.stderr:  # the first line announces the address
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                url = m.group(1)
                break
        assert url, "no 'listening on' line"
        req = urllib.request.Request(
            url + "/v1/customers",
            data=b"email=a%40example.com",
            headers={"Authorization": "Bearer sk_test_cli"},
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert json.loads(resp.read())["email"] == "a@example.com"
        line = proc.stderr.readline()
        assert '"POST /v1/customers" 200' in line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
