"""Flask integration: `create_app()` for the standalone app, `Billing(app)` to adopt one."""

from __future__ import annotations

from flask import Flask, current_app

from billing.config import Settings, load_settings
from billing.runtime import Runtime

EXTENSION_KEY = "billing"


class Billing:
    """Flask extension: registers the `flask billing` command group and the runtime handles."""

    def __init__(self, app: Flask | None = None, settings: Settings | None = None) -> None:
        self._settings = settings
        if app is not None:
            self.init_app(app, settings)

    def init_app(self, app: Flask, settings: Settings | None = None) -> None:
        from billing.cli import billing_cli

        app.extensions[EXTENSION_KEY] = _LazyRuntime(settings or self._settings)
        app.cli.add_command(billing_cli)


class _LazyRuntime:
    """Reads settings on first use, so `flask billing --help` works even with a bad environment."""

    def __init__(self, settings: Settings | None) -> None:
        self._settings = settings
        self._runtime: Runtime | None = None

    def get(self) -> Runtime:
        if self._runtime is None:
            self._runtime = Runtime(self._settings or load_settings())
        return self._runtime


def current_runtime() -> Runtime:
    return current_app.extensions[EXTENSION_KEY].get()


def create_app(settings: Settings | None = None) -> Flask:
    app = Flask("billing")
    Billing(app, settings)
    return app
