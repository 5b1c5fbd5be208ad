"""Flask integration: `create_app()` for the standalone app, `Billing(app)` to adopt one."""

from __future__ import annotations

import click
from flask import Blueprint, Flask
from flask.cli import run_command

from billing import logs
from billing.cli import billing_cli, build_cli
from billing.config import (
    ConfigError,
    Settings,
    config_error_line,
    load_settings,
    metrics_path_from_env,
    webhook_path_from_env,
)
from billing.ops.http import metrics_blueprint
from billing.runtime import EXTENSION_KEY, Runtime, current_runtime
from billing.webhooks.endpoint import DirectRoute
from billing.webhooks.views import make_blueprint

__all__ = ["EXTENSION_KEY", "Billing", "create_app", "current_runtime"]


class Billing:
    """Flask extension: the `flask billing` command group, the Stripe webhook endpoint
    (`STRIPE_WEBHOOK_PATH`, default `/stripe/webhook`) and the runtime handles."""

    def __init__(
        self,
        app: Flask | None = None,
        settings: Settings | None = None,
        *,
        configure_logging: bool = False,
    ) -> None:
        self._settings = settings
        self._configure_logging = configure_logging
        if app is not None:
            self.init_app(app, settings)

    def init_app(self, app: Flask, settings: Settings | None = None) -> None:
        settings = settings or self._settings or settings_for_build()
        app.extensions[EXTENSION_KEY] = _LazyRuntime(settings, self._configure_logging)
        build_cli()
        app.cli.add_command(billing_cli)
        webhook_path, metrics_path = route_paths(settings)
        if webhook_path:
            webhooks = make_blueprint(webhook_path)
            app.register_blueprint(webhooks)
            _exempt_from_host_csrf(app, webhooks)
        if metrics_path:
            app.register_blueprint(metrics_blueprint(metrics_path))


def settings_for_build() -> Settings | None:
    """The settings, read now when a server builds the app (a WSGI server, `flask run`): a bad
    one stops it before it serves, instead of a 500 on every webhook. None inside any other
    `flask` command, which reads them when it runs: `flask billing --help` works with a bad
    environment, and each command exits 1 with the configuration line."""
    context = click.get_current_context(silent=True)
    if context is not None and context.command is not run_command:
        return None
    try:
        return load_settings()
    except ConfigError as error:
        if context is None:
            raise
        raise click.ClickException(config_error_line(error)) from error


def route_paths(settings: Settings | None) -> tuple[str | None, str | None]:
    """The webhook and metrics routes. Without settings (inside a command) the two paths are read
    alone, as Flask needs them now; a bad one leaves both routes out, and the command reports it
    when it reads the settings."""
    if settings is not None:
        return settings.webhook_path, settings.metrics_path
    try:
        return webhook_path_from_env(), metrics_path_from_env()
    except ConfigError:
        return None, None


def _exempt_from_host_csrf(app: Flask, blueprint: Blueprint) -> None:
    """Stripe signs its deliveries and cannot send a CSRF token: a host app's app-wide
    `CSRFProtect` (Flask-WTF) would refuse every one with 400. Exempt the webhook blueprint
    whichever extension the host set up first: now if CSRFProtect is there already, else before
    each request (registered ahead of CSRFProtect's own check, so it runs first)."""

    def exempt() -> None:
        csrf = app.extensions.get("csrf")
        if csrf is not None:
            csrf.exempt(blueprint)  # a set of blueprint names: adding again is a no-op

    exempt()
    app.before_request(exempt)


class _LazyRuntime:
    """Reads settings on first use, so `flask billing --help` works even with a bad environment."""

    def __init__(self, settings: Settings | None, configure_logging: bool = False) -> None:
        self._settings = settings
        self._configure_logging = configure_logging
        self._runtime: Runtime | None = None

    def get(self) -> Runtime:
        if self._runtime is None:
            runtime = Runtime(self._settings or load_settings())
            if self._configure_logging:
                logs.configure_logging(runtime.settings.log_level, runtime.settings.log_format)
            self._runtime = runtime
        return self._runtime


def create_app(settings: Settings | None = None) -> Flask:
    """The standalone app (`flask --app billing run`, `gunicorn 'billing:create_app()'`); it
    configures billing's JSON logging, which a host app using `Billing(app)` does itself.

    Stripe's deliveries skip Flask's dispatch here (`DirectRoute`): the webhook endpoint is the
    hot path, and Flask's request dispatch was a large share of its CPU (docs/performance.md)."""
    settings = settings or settings_for_build()
    app = Flask("billing")
    Billing(app, settings, configure_logging=True)
    webhook_path, _ = route_paths(settings)
    if webhook_path:
        app.wsgi_app = DirectRoute(  # type: ignore[method-assign]
            app.wsgi_app, webhook_path, app.extensions[EXTENSION_KEY]
        )
    return app
