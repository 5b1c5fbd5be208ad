"""`python -m billing.emulator`: listens, logs a line per request, stops cleanly on SIGTERM; its
meter-validation flags reach the settings."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from billing.emulator.cli import build_parser

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


def _settings(url: str) -> dict:
    with urllib.request.urlopen(url + "/_emulator/settings", timeout=5) as resp:
        return json.loads(resp.read())


def test_cli_meter_validation_flags_reach_the_settings():
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "billing.emulator",
            "--port",
            "0",
            "--quiet",
            "--meter-validation",
            "sync",
            "--error-report-delay-seconds",
            "2",
            "--error-report-samples",
            "3",
            "--error-report-identifier",
            "identifier",
            "--summary-lag-seconds",
            "60",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stderr.readline()
        m = re.search(r"listening on (http://\S+) .*meter validation sync", line)
        assert m, line
        got = _settings(m.group(1))
        assert (
            got["meter_validation"],
            got["error_report_delay_seconds"],
            got["error_report_samples"],
            got["error_report_identifier"],
            got["summary_lag_seconds"],
        ) == ("sync", 2, 3, "identifier", 60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_defaults_are_async_like_live_stripe_and_bad_values_are_refused(capsys):
    args = build_parser().parse_args([])
    assert (
        args.meter_validation,
        args.error_report_delay_seconds,
        args.error_report_samples,
        args.summary_lag_seconds,
    ) == ("async", 5, 5, 0)
    for bad in (
        ["--meter-validation", "later"],
        ["--error-report-samples", "0"],
        ["--summary-lag-seconds", "-1"],
        ["--error-report-delay-seconds", "soon"],
    ):
        with pytest.raises(SystemExit) as refused:
            build_parser().parse_args(bad)
        assert refused.value.code == 2
    assert "--error-report-samples" in capsys.readouterr().err
