"""The overlap guard: one hourly flush at a time.

The lock only saves work. Correctness lives in the outbox, the claim transaction and Stripe's
identifiers, so a second flush that slipped past an expired lock bills nothing twice.

Redis (production): redis-py's `Lock` gives a non-blocking SET NX PX and atomic owner-checked
release and extend (Lua). Its owner token is a JSON `LockHolder` (host, pid, task id, since, lease,
and a random nonce that keeps tokens unique), so whoever reads the key sees who holds it.
The key lives for a short *lease* (`STRIPE_USAGE_FLUSH_LOCK_LEASE_SECONDS`, 60 s) that a heartbeat
thread re-arms every third of it: a SIGKILLed holder's lock frees itself within one lease instead of
blocking the hourly runs for the full TTL, and the key's remaining TTL tells how long ago the
holder's heartbeat last beat. `STRIPE_USAGE_FLUSH_LOCK_TTL_SECONDS` (55 min) bounds how long one
run may hold the lock at all: past it the heartbeat stops re-arming, so a hung flush whose
heartbeat thread lives on cannot block every later hour. Ownership lost either way is reported
(`lost`) and the flush stops claiming.
File (embedded default only, chosen by `STRIPE_USAGE_FLUSH_LOCK_BACKEND=file`): an OS file lock,
which the kernel drops when the holder dies.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import filelock
import redis
from redis.exceptions import LockError, LockNotOwnedError

from billing.config import DEFAULT_FLUSH_LOCK_LEASE_SECONDS
from billing.errors import OperatorError
from billing.logs import get_logger

log = get_logger("billing.locks")

# A live holder re-arms its lease every third of it; two missed beats mean the heartbeat stopped.
BEATS_PER_LEASE = 3
MISSED_BEATS_FOR_STALE = 2


class LockUnavailableError(RuntimeError, OperatorError):
    """The lock backend cannot be reached: refuse to run unguarded (a transient error: retry)."""


class FlushLock(Protocol):
    @property
    def lost(self) -> bool: ...

    def acquire(self) -> bool: ...

    def release(self) -> None: ...


@dataclass(frozen=True)
class LockHolder:
    """Who holds the lock: the Redis value (owner token) itself, as JSON."""

    host: str
    pid: int
    task_id: str | None
    since: str  # ISO 8601, UTC
    lease_seconds: float
    nonce: str

    @classmethod
    def for_this_process(cls, task_id: str | None, lease_seconds: float) -> LockHolder:
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            task_id=task_id,
            since=datetime.now(UTC).isoformat(timespec="seconds"),
            lease_seconds=lease_seconds,
            nonce=uuid.uuid4().hex,
        )

    def token(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def parse(cls, token: bytes | str) -> LockHolder | None:
        """The holder named by a token, or None for a token of another shape (an older release)."""
        try:
            fields = json.loads(token)
            return cls(**fields)
        except (TypeError, ValueError):
            return None

    def held_seconds(self, now: datetime | None = None) -> float:
        started = datetime.fromisoformat(self.since)
        return max(0.0, ((now or datetime.now(UTC)) - started).total_seconds())

    def runs_here(self) -> bool:
        return self.host == socket.gethostname()


class RedisFlushLock:
    def __init__(
        self,
        client: redis.Redis,
        key: str,
        ttl_seconds: float,
        *,
        lease_seconds: float | None = None,
        task_id: str | None = None,
    ) -> None:
        self.key = key
        self.ttl_seconds = ttl_seconds  # the most one run may hold it, heartbeat or not
        self.lease_seconds = min(lease_seconds or DEFAULT_FLUSH_LOCK_LEASE_SECONDS, ttl_seconds)
        self.task_id = task_id
        self._lock = client.lock(
            key, timeout=self.lease_seconds, blocking=False, thread_local=False
        )
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._lost = threading.Event()

    @property
    def lost(self) -> bool:
        # A heartbeat that died for any reason re-arms nothing: count the lock as lost.
        heartbeat = self._heartbeat
        died = heartbeat is not None and not heartbeat.is_alive() and not self._stop.is_set()
        return self._lost.is_set() or died

    def acquire(self) -> bool:
        holder = LockHolder.for_this_process(self.task_id, self.lease_seconds)
        try:
            acquired = bool(self._lock.acquire(blocking=False, token=holder.token()))
        except redis.RedisError as error:
            raise LockUnavailableError(
                f"Redis lock backend unreachable ({type(error).__name__}: {error}); "
                "refusing to flush without the overlap guard"
            ) from error
        if acquired:
            self._heartbeat = threading.Thread(
                target=self._keep_alive,
                args=(time.monotonic(),),
                name=f"lock-heartbeat:{self.key}",
                daemon=True,
            )
            self._heartbeat.start()
        return acquired

    def _keep_alive(self, acquired_at: float) -> None:
        interval = max(self.lease_seconds / BEATS_PER_LEASE, 0.05)
        try:
            while not self._stop.wait(interval):
                held_for = time.monotonic() - acquired_at
                if held_for + self.lease_seconds > self.ttl_seconds:
                    # Stop re-arming: the lease runs out at the TTL, and a hung run frees the lock.
                    log.warning(
                        "Stripe usage flush lock TTL reached; no longer re-armed",
                        extra={"lock_key": self.key, "held_seconds": round(held_for, 1)},
                    )
                    self._lost.set()
                    return
                self._lock.reacquire()  # owner-checked: fails if the token is no longer ours
        except Exception as error:  # any failure: the lock is no longer kept alive
            log.warning(
                "Stripe usage flush lock lost",
                extra={"lock_key": self.key, "error": f"{type(error).__name__}: {error}"},
            )
            self._lost.set()

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


# Inspecting and freeing a lock from outside (`flask billing status`, `flask billing lock release`)


@dataclass(frozen=True)
class LockState:
    key: str
    token: bytes
    holder: LockHolder | None
    expires_in_seconds: float

    @property
    def heartbeat_age_seconds(self) -> float | None:
        """Seconds since the holder last re-armed its lease (None: holder of unknown shape)."""
        if self.holder is None:
            return None
        return max(0.0, self.holder.lease_seconds - self.expires_in_seconds)

    @property
    def heartbeat_alive(self) -> bool:
        """False once two beats are missed. A token of unknown shape counts as alive: no proof."""
        age = self.heartbeat_age_seconds
        if age is None or self.holder is None:
            return True
        return age <= self.holder.lease_seconds * MISSED_BEATS_FOR_STALE / BEATS_PER_LEASE

    @property
    def holder_process_gone(self) -> bool:
        """True only with proof: the holder ran on this host and its pid no longer exists."""
        if self.holder is None or not self.holder.runs_here():
            return False
        return not _pid_exists(self.holder.pid)

    @property
    def holder_dead(self) -> bool:
        return self.holder_process_gone or not self.heartbeat_alive

    def to_dict(self) -> dict[str, Any]:
        holder = self.holder
        return {
            "key": self.key,
            "held": True,
            "holder": asdict(holder) if holder else {"token": self.token.decode(errors="replace")},
            "held_seconds": round(holder.held_seconds(), 1) if holder else None,
            "expires_in_seconds": round(self.expires_in_seconds, 1),
            "heartbeat_age_seconds": _rounded(self.heartbeat_age_seconds),
            "heartbeat_alive": self.heartbeat_alive,
            "holder_dead": self.holder_dead,
        }


def inspect_lock(client: redis.Redis, key: str) -> LockState | None:
    """The lock's current holder, or None when nobody holds it."""
    with client.pipeline(transaction=True) as pipe:
        token, expires_ms = pipe.get(key).pttl(key).execute()
    if token is None:
        return None
    expires = max(0.0, expires_ms / 1000) if expires_ms and expires_ms > 0 else 0.0
    return LockState(key, token, LockHolder.parse(token), expires)


class ReleaseOutcome(enum.StrEnum):
    NOT_HELD = "not_held"
    RELEASED = "released"
    HOLDER_ALIVE = "holder_alive"
    CHANGED_HANDS = "changed_hands"


def release_dead_holder(client: redis.Redis, state: LockState) -> ReleaseOutcome:
    """Free `state`'s lock if its holder is dead, compare-and-delete on the token read.

    Never frees a lock whose heartbeat is alive, nor one that changed hands since it was read.
    """
    if not state.holder_dead:
        return ReleaseOutcome.HOLDER_ALIVE
    lock = client.lock(state.key, thread_local=False)
    lock.local.token = state.token  # release as the dead holder: redis-py's atomic check-and-del
    try:
        lock.release()
    except LockNotOwnedError:
        return ReleaseOutcome.CHANGED_HANDS
    log.warning(
        "Stripe usage flush lock released (holder dead)",
        extra={"lock_key": state.key, **state.to_dict()},
    )
    return ReleaseOutcome.RELEASED


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
