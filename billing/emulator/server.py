"""`EmulatorServer`: the emulator on its own event loop, in a background thread or in front."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

from billing.emulator.app import Emulator, Options
from billing.emulator.controls import Controls
from billing.emulator.httpserver import HTTPProtocol, serve

log = logging.getLogger("billing.emulator")
TICK_SECONDS = 1.0  # how often due work (renewals, finalizations) runs without requests


class EmulatorServer:
    """A local Stripe-speaking HTTP server.

    >>> with EmulatorServer(port=0) as server:
    ...     client = stripe.StripeClient("sk_test_x", base_addresses={"api": server.url})
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        *,
        rate_limits: str = "test",
        global_rps: float | None = None,
        path_rps: dict[str, float | None] | None = None,
        finalize_delay: int = 3600,
        invoice_auto_pay: bool = True,
        webhook_backoff_ms: float = 1000.0,
        webhook_max_attempts: int = 10,
        allow_remote_controls: bool = False,
        meter_validation: str = "async",
        error_report_delay_seconds: int = 5,
        error_report_samples: int = 5,
        error_report_identifier: str = "idempotency_key",
        summary_lag_seconds: int = 0,
        thin_webhook_url: str | None = None,
        thin_webhook_secret: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.emulator = Emulator(
            Options(
                webhook_url=webhook_url,
                webhook_secret=webhook_secret,
                rate_limits=rate_limits,
                global_rps=global_rps,
                path_rps=path_rps,
                finalize_delay=finalize_delay,
                invoice_auto_pay=invoice_auto_pay,
                webhook_backoff_ms=webhook_backoff_ms,
                webhook_max_attempts=webhook_max_attempts,
                allow_remote_controls=allow_remote_controls,
                meter_validation=meter_validation,
                error_report_delay_seconds=error_report_delay_seconds,
                error_report_samples=error_report_samples,
                error_report_identifier=error_report_identifier,
                summary_lag_seconds=summary_lag_seconds,
                thin_webhook_url=thin_webhook_url,
                thin_webhook_secret=thin_webhook_secret,
            )
        )
        self.emulator.controls = Controls(self.emulator)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.on_ready: Callable[[], None] | None = None  # called once listening

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def state(self) -> Any:
        """Direct access for assertions; hold `state.lock` while reading. Prefer the controls."""
        return self.emulator.state

    # background mode (tests, scripts) -----------------------------------------------------------

    def start(self) -> EmulatorServer:
        """Serve from a daemon thread; returns once listening (then `url` has the real port)."""
        if self._thread is not None:
            raise RuntimeError("already started")
        self._thread = threading.Thread(
            target=self._thread_main, name="stripe-emulator", daemon=True
        )
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        if not self._ready.is_set():
            raise RuntimeError("emulator did not start within 10 s")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self.emulator.webhooks.stop()

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main(install_signals=False))
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()

    # foreground mode (CLI) ----------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Serve until SIGINT/SIGTERM, then return (exit cleanly)."""
        try:
            asyncio.run(self._main(install_signals=True))
        finally:
            self.emulator.webhooks.stop()

    async def _main(self, install_signals: bool) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        if install_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._loop.add_signal_handler(sig, self._stopping.set)
        connections: set[HTTPProtocol] = set()
        server = await serve(self.emulator.handle, self.host, self.port, connections)
        self.port = server.sockets[0].getsockname()[1]
        self.emulator.set_base_url(self.url)
        ticker = asyncio.create_task(self._tick())
        self._ready.set()
        if self.on_ready is not None:
            self.on_ready()
        try:
            await self._stopping.wait()
        finally:
            ticker.cancel()
            server.close()
            for conn in list(connections):
                conn.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 2)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                self.emulator.tick()
            except Exception:  # keep ticking: one bad renewal must not stop the clock
                log.exception("due work failed")
