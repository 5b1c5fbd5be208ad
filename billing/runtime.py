"""The process-wide handles (engine, sessions, Redis, Stripe gateway) built from one Settings.

Flask keeps one in `app.extensions["billing"]` (`current_runtime()`); a Celery worker process builds
its own on first use (`get_runtime()`).
Handles are created lazily so that `--help` and config errors never need a database or Redis.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from billing import db
from billing.broker import TaskPublisher, make_sender
from billing.config import Settings, load_settings
from billing.stripe_gateway import StripeGateway

if TYPE_CHECKING:
    import redis
    from celery import Celery

T = TypeVar("T")


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._shared: dict[str, Any] = {}
        self._shared_lock = threading.Lock()
        _all_runtimes.add(self)

    @cached_property
    def engine(self) -> Engine:
        return db.make_engine(self.settings.database_url)

    @cached_property
    def ingest_engine(self) -> Engine:
        """The webhook view's own small pool (`db.make_autocommit_engine`)."""
        return db.make_autocommit_engine(self.engine)

    @cached_property
    def session_factory(self) -> sessionmaker[Session]:
        return db.make_session_factory(self.engine)

    @cached_property
    def redis(self) -> redis.Redis:
        import redis

        return redis.Redis.from_url(
            self.settings.redis_url, socket_connect_timeout=5, socket_timeout=30
        )

    @cached_property
    def stripe(self) -> StripeGateway:
        return StripeGateway.from_settings(self.settings)

    @cached_property
    def task_sender(self) -> Celery:
        """Publishes tasks to this runtime's broker (the web process's webhook enqueue)."""
        return make_sender(self.settings)

    @cached_property
    def task_publisher(self) -> TaskPublisher:
        """Publishes tasks to the billing queue (`billing.broker.TaskPublisher`)."""
        return TaskPublisher(self.task_sender, self.settings.billing_queue)

    def shared(self, name: str, build: Callable[[], T]) -> T:
        """A handle a feature keeps per runtime (the webhook publisher), built on first use and
        closed with the runtime, first: it may still use the others. The runtime itself knows no
        feature."""
        with self._shared_lock:
            if name not in self._shared:
                self._shared[name] = build()
            return cast(T, self._shared[name])

    def close(self) -> None:
        for handle in reversed(list(self._shared.values())):
            handle.close()  # a publisher publishes what is pending first
        self._shared.clear()
        for engine in _engines(self):
            engine.dispose()
        if "redis" in self.__dict__:
            self.redis.close()
        if "task_publisher" in self.__dict__:
            self.task_publisher.close()
        if "task_sender" in self.__dict__:
            self.task_sender.close()


def _engines(runtime: Runtime) -> list[Engine]:
    """The engines this runtime has built so far."""
    built = runtime.__dict__
    return [built[name] for name in ("engine", "ingest_engine") if name in built]


EXTENSION_KEY = "billing"


def current_runtime() -> Runtime:
    """The runtime of the Flask app in context (`Billing(app)` installed it)."""
    from flask import current_app

    return current_app.extensions[EXTENSION_KEY].get()


_process_runtime: Runtime | None = None
_process_lock = threading.Lock()
_all_runtimes: weakref.WeakSet[Runtime] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child (Celery prefork) must not use its parent's database connections: drop
    them without closing (closing would end the parent's sessions) and start afresh."""
    global _process_runtime, _process_lock
    for runtime in list(_all_runtimes):
        for engine in _engines(runtime):
            engine.dispose(close=False)
    _process_runtime = None
    _process_lock = threading.Lock()  # the parent may have held it while forking


os.register_at_fork(after_in_child=_after_fork_in_child)


def get_runtime() -> Runtime:
    """The runtime of this (worker) process, built from the environment on first use."""
    global _process_runtime
    with _process_lock:
        if _process_runtime is None:
            _process_runtime = Runtime(load_settings())
        return _process_runtime


def set_runtime(runtime: Runtime | None) -> None:
    """Install a runtime for this process (tests, or a Flask app that also runs tasks eagerly)."""
    global _process_runtime
    with _process_lock:
        _process_runtime = runtime
