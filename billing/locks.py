"""The overlap guard: one hourly flush at a time.

The lock only saves work. Correctness lives in the outbox, the claim transaction and Stripe's
identifiers, so a second flush that slipped past an expired lock bills nothing twice.

Redis (production): redis-py's `Lock` gives a random owner token, a non-blocking SET NX PX, and
atomic owner-checked release and extend (Lua). The TTL counts from acquisition, not from enqueue; a
SIGKILLed holder's lock expires after the TTL; a heartbeat re-arms the TTL while the flush is alive
and reports when ownership is lost, so the flush can stop instead of running unguarded.
File (embedded default only, chosen by `STRIPE_USAGE_FLUSH_LOCK_BACKEND=file`): an OS file lock,
which the kernel drops when the holder dies.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import filelock
import redis
from redis.exceptions import LockError, LockNotOwnedError

from billing.logs import get_logger

log = get_logger("billing.locks")


class LockUnavailableError(RuntimeError):
    """The lock backend cannot be reached: refuse to run unguarded."""


class FlushLock(Protocol):
    @property
    def lost(self) -> bool: ...

    def acquire(self) -> bool: ...

    def release(self) -> None: ...


class RedisFlushLock:
    def __init__(self, client: redis.Redis, key: str, ttl_seconds: int) -> None:
        self.key = key
        self.ttl_seconds = ttl_seconds
        self._lock = client.lock(key, timeout=ttl_seconds, blocking=False, thread_local=False)
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._lost = threading.Event()

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def acquire(self) -> bool:
        try:
            acquired = bool(self._lock.acquire(blocking=False))
        except redis.RedisError as error:
            raise LockUnavailableError(
                f"Redis lock backend unreachable ({type(error).__name__}: {error}); "
                "refusing to flush without the overlap guard"
            ) from error
        if acquired:
            self._heartbeat = threading.Thread(
                target=self._keep_alive, name=f"lock-heartbeat:{self.key}", daemon=True
            )
            self._heartbeat.start()
        return acquired

    def _keep_alive(self) -> None:
        interval = max(self.ttl_seconds / 3, 0.05)
        while not self._stop.wait(interval):
            try:
                self._lock.reacquire()  # owner-checked: fails if the token is no longer ours
            except (LockError, redis.RedisError) as error:
                log.warning(
                    "Stripe usage flush lock lost",
                    extra={"lock_key": self.key, "error": str(error)},
                )
                self._lost.set()
                return

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        try:
            self._lock.release()  # compare-and-delete: never frees another holder's lock
        except LockNotOwnedError:
            log.warning(
                "Stripe usage flush lock expired before release", extra={"lock_key": self.key}
            )
        except (LockError, redis.RedisError) as error:
            log.warning(
                "Stripe usage flush lock release failed",
                extra={"lock_key": self.key, "error": str(error)},
            )


class FileFlushLock:
    def __init__(self, key: str, directory: Path | None = None) -> None:
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        self.path = (directory or Path(tempfile.gettempdir())) / f"billing-flush-{digest}.lock"
        self._lock = filelock.FileLock(str(self.path), timeout=0, thread_local=False)

    @property
    def lost(self) -> bool:
        return False

    def acquire(self) -> bool:
        try:
            self._lock.acquire()
        except filelock.Timeout:
            return False
        return True

    def release(self) -> None:
        self._lock.release()


@contextlib.contextmanager
def held(lock: FlushLock) -> Iterator[bool]:
    """Yields True while holding `lock`, or False (holding nothing) when another run has it."""
    if not lock.acquire():
        yield False
        return
    try:
        yield True
    finally:
        lock.release()
