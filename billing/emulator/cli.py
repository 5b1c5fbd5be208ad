"""`python -m billing.emulator` / `billing-stripe-emulator`: run the emulator in the foreground."""

from __future__ import annotations

import argparse
import logging
import secrets
import sys

from billing.emulator.limits import PRESETS
from billing.emulator.server import EmulatorServer


def _path_rps(text: str) -> tuple[str, float | None]:
    path, sep, rate = text.partition("=")
    if not sep or not path.startswith("/"):
        raise argparse.ArgumentTypeError("expected PATH=RPS, e.g. /v1/billing/meter_events=1000")
    return path, None if rate in ("", "0", "off") else float(rate)


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="billing-stripe-emulator",
        description="A local, stateful Stripe API emulator for tests, benchmarks and demos. "
        "Test controls live under /_emulator/ (see billing/emulator/README.md).",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=12111, help="port, 0 = any free (default 12111)")
    p.add_argument("--webhook-url", help="POST signed events to this endpoint")
    p.add_argument("--webhook-secret", help="whsec_... signing secret (generated if omitted)")
    p.add_argument(
        "--rate-limits",
        choices=sorted(PRESETS),
        default="test",
        help="rate-ceiling preset: test = 25 req/s shared (Stripe test mode, the "
        "default), live = 100 req/s shared + 1,000/s meter events, off = none",
    )
    p.add_argument(
        "--global-rps", type=float, metavar="N", help="override the shared ceiling (0 = none)"
    )
    p.add_argument(
        "--path-rps",
        type=_path_rps,
        action="append",
        default=[],
        metavar="PATH=N",
        help="own ceiling for a path prefix, repeatable (e.g. /v1/billing/meter_events=5000)",
    )
    p.add_argument(
        "--finalize-delay",
        type=int,
        default=3600,
        metavar="SECONDS",
        help="draft renewal invoice → finalized, in emulator seconds (default 3600)",
    )
    p.add_argument(
        "--no-invoice-auto-pay",
        action="store_true",
        help="leave finalized invoices open instead of paying them at once",
    )
    p.add_argument(
        "--webhook-backoff-ms",
        type=float,
        default=1000.0,
        help="first webhook retry delay, doubling per attempt (default 1000)",
    )
    p.add_argument("--webhook-max-attempts", type=int, default=10)
    p.add_argument(
        "--meter-validation",
        choices=("async", "sync"),
        default="async",
        help="async (default, as live Stripe): well-formed meter events are answered 200 and "
        "checked later, failures arrive as a thin error-report event; sync: a 400 at once",
    )
    p.add_argument(
        "--error-report-delay-seconds",
        type=_non_negative,
        default=5,
        metavar="SECONDS",
        help="first rejected meter event → its thin error report (default 5)",
    )
    p.add_argument(
        "--error-report-samples",
        type=_positive,
        default=5,
        metavar="N",
        help="sample errors per error code in one report; error_count counts all (default 5)",
    )
    p.add_argument(
        "--error-report-identifier",
        choices=("idempotency_key", "identifier"),
        default="idempotency_key",
        help="what a sample's request.identifier carries: the request's Idempotency-Key "
        "(default, as Stripe's reference says) or the meter event's identifier",
    )
    p.add_argument(
        "--summary-lag-seconds",
        type=_non_negative,
        default=0,
        metavar="SECONDS",
        help="meter events reach summaries and draft invoices this long after receipt "
        "(default 0; Stripe publishes no figure, e.g. 60 to rehearse)",
    )
    p.add_argument("--thin-webhook-url", help="thin events' destination (default --webhook-url)")
    p.add_argument("--thin-webhook-secret", help="its whsec_... secret (default --webhook-secret)")
    p.add_argument(
        "--allow-remote-controls",
        action="store_true",
        help="answer /_emulator/ controls from non-loopback peers too",
    )
    p.add_argument("--quiet", action="store_true", help="no per-request log lines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    log = logging.getLogger("billing.emulator")
    secret = args.webhook_secret
    if args.webhook_url and not secret:
        secret = "whsec_" + secrets.token_hex(24)
    global_rps = None if args.global_rps is None else (args.global_rps or 0)
    server = EmulatorServer(
        args.host,
        args.port,
        args.webhook_url,
        secret,
        rate_limits=args.rate_limits,
        global_rps=global_rps,
        path_rps=dict(args.path_rps) or None,
        finalize_delay=args.finalize_delay,
        invoice_auto_pay=not args.no_invoice_auto_pay,
        webhook_backoff_ms=args.webhook_backoff_ms,
        webhook_max_attempts=args.webhook_max_attempts,
        allow_remote_controls=args.allow_remote_controls,
        meter_validation=args.meter_validation,
        error_report_delay_seconds=args.error_report_delay_seconds,
        error_report_samples=args.error_report_samples,
        error_report_identifier=args.error_report_identifier,
        summary_lag_seconds=args.summary_lag_seconds,
        thin_webhook_url=args.thin_webhook_url,
        thin_webhook_secret=args.thin_webhook_secret,
    )

    def announce() -> None:
        log.warning(
            "Stripe emulator listening on %s (api version %s, rate limits %s, meter validation %s)",
            server.url,
            server.emulator.state.settings.api_version,
            server.emulator.limiter.describe(),
            args.meter_validation,
        )
        if args.webhook_url:
            log.warning("webhooks → %s signed with %s", args.webhook_url, secret)

    server.on_ready = announce
    try:
        server.serve_forever()
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", args.host, args.port, exc)
        return 1
    log.warning("Stripe emulator stopped")
    return 0
