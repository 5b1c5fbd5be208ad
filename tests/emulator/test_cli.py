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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from billing.emulator.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def emulator_process(*flags: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`python -m billing.emulator --port 0 FLAGS`, its URL from the first log line; stopped
    with SIGTERM by the test (it must exit 0), killed if the test fails first."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "billing.emulator", "--port", "0", *flags],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = proc.stderr.readline()
        m = re.search(r"listening on (http://\S+)", first)
        assert m, f"no 'listening on' line: {first!r}"
        yield proc, first
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stop(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=10)


def test_cli_serves_logs_and_stops_on_sigterm():
    with emulator_process("--rate-limits", "off") as (proc, first):
        url = re.search(r"listening on (http://\S+)", first).group(1)
        req = urllib.request.Request(
            url + "/v1/customers",
            data=b"email=a%40example.com",
            headers={"Authorization": "Bearer sk_test_cli"},
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert json.loads(resp.read())["email"] == "a@example.com"
        line = proc.stderr.readline()
        assert '"POST /v1/customers" 200' in line
        assert stop(proc) == 0


def test_cli_meter_validation_flags_reach_the_settings():
    flags = [
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
    ]
    with emulator_process(*flags) as (proc, first):
        m = re.search(r"listening on (http://\S+) .*meter validation sync", first)
        assert m, first
        with urllib.request.urlopen(m.group(1) + "/_emulator/settings", timeout=5) as resp:
            got = json.loads(resp.read())
        assert {k: v for k, v in got.items() if k not in ("finalize_delay", "api_version")} == {
            "invoice_auto_pay": True,
            "meter_validation": "sync",
            "error_report_delay_seconds": 2,
            "error_report_samples": 3,
            "error_report_identifier": "identifier",
            "summary_lag_seconds": 60,
        }
        assert stop(proc) == 0


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
