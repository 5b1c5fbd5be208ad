"""How long after a SIGKILLed flush holder the next flush can take the lock.

For each design it starts a real process that takes the Redis flush lock (as a flush does, with
its heartbeat), lets it beat for a few seconds, SIGKILLs it, then polls as the next hourly run
would and reports the seconds until the lock is free:
- `ttl-only` (the design before the lease): the key's TTL is the full 55-minute lock TTL, re-armed
  by the heartbeat; waiting that out is not practical, so the remaining TTL right after the kill
  is reported as the wait (the key cannot be freed sooner).
- `lease` (now): the key's TTL is the lease (`--lease`, default 60 s); measured by waiting.
- `lease + release`: the same, plus `flask billing lock release --if-holder-dead` right after the
  kill (what the worker unit's ExecStartPre does on restart).
Prints a table and writes bench/results/lock_recovery.json.

    .venv/bin/python bench/lock_recovery.py [--lease 60] [--redis redis://127.0.0.1:6379/15]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from billing.config import Settings  # noqa: E402
from billing.usage.lock import RedisFlushLock, inspect_lock, release_dead_holder  # noqa: E402

HOLDER = """
import sys, time, redis
from billing.usage.lock import RedisFlushLock
lock = RedisFlushLock(redis.Redis.from_url(sys.argv[1]), sys.argv[2], float(sys.argv[3]),
                      lease_seconds=float(sys.argv[4]), task_id="bench")
assert lock.acquire()
print("held", flush=True)
time.sleep(3600)
"""


def kill_holder(url: str, key: str, ttl: float, lease: float) -> float:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, url, key, str(ttl), str(lease)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    time.sleep(min(3.0, lease))  # let the heartbeat re-arm a few times
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    return time.monotonic()


def wait_until_free(client: redis.Redis, key: str, killed_at: float, lease: float) -> float:
    lock = RedisFlushLock(client, key, 3300, lease_seconds=lease)
    while not lock.acquire():
        time.sleep(0.05)
    waited = time.monotonic() - killed_at
    lock.release()
    return waited


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lease", type=float, default=Settings().flush_lock_lease_seconds)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    args = parser.parse_args()
    client = redis.Redis.from_url(args.redis)
    ttl = Settings().flush_lock_ttl_seconds
    key = f"bench-lock-recovery:{uuid.uuid4().hex}"
    rows = []

    killed = kill_holder(args.redis, key, ttl, ttl)  # the old design: lease == TTL
    remaining = client.pttl(key) / 1000
    client.delete(key)
    rows.append({"design": "ttl-only (before)", "seconds": round(remaining, 1), "how": "key TTL"})

    killed = kill_holder(args.redis, key, ttl, args.lease)
    waited = wait_until_free(client, key, killed, args.lease)
    rows.append({"design": f"lease {args.lease:g}s", "seconds": round(waited, 2), "how": "waited"})

    killed = kill_holder(args.redis, key, ttl, args.lease)
    state = inspect_lock(client, key)
    outcome = release_dead_holder(client, state) if state else None
    waited = wait_until_free(client, key, killed, args.lease)
    rows.append(
        {
            "design": f"lease {args.lease:g}s + release --if-holder-dead",
            "seconds": round(waited, 3),
            "how": f"released ({outcome})",
        }
    )

    print(f"{'design':<45} {'next flush after SIGKILL (s)':>28}  how")
    for row in rows:
        print(f"{row['design']:<45} {row['seconds']:>28}  {row['how']}")
    base = rows[0]["seconds"]
    print(f"lease vs ttl-only: {base / rows[1]['seconds']:.0f}x sooner")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "lock_recovery.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
