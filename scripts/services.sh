#!/usr/bin/env bash
# Make sure the PostgreSQL, Redis and RabbitMQ that the tests use answer; start them when they do
# not. BILLING_TEST_DATABASE_URL / BILLING_TEST_REDIS_URL / BILLING_TEST_AMQP_URL name them
# (defaults: the local ones). RabbitMQ is optional: the scale-out test against it skips without.
set -euo pipefail
cd "$(dirname "$0")/.."

DB_URL=${BILLING_TEST_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/test}
REDIS_URL=${BILLING_TEST_REDIS_URL:-redis://127.0.0.1:6379/15}
AMQP_URL=${BILLING_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672//}

answers() {  # answers postgres|redis|rabbitmq: exit 0 when the service takes a connection
    .venv/bin/python - "$1" "$DB_URL" "$REDIS_URL" "$AMQP_URL" <<'PY'
import sys
kind, db_url, redis_url, amqp_url = sys.argv[1:]
try:
    if kind == "postgres":
        import psycopg2
        psycopg2.connect(db_url.replace("postgresql+psycopg2://", "postgresql://"), connect_timeout=2).close()
    elif kind == "rabbitmq":
        import kombu
        with kombu.Connection(amqp_url, connect_timeout=2) as connection:
            connection.ensure_connection(max_retries=1)
    else:
        import redis
        redis.Redis.from_url(redis_url, socket_connect_timeout=2).ping()
except Exception as error:  # noqa: BLE001 - any failure means "not answering"
    print(f"{kind} not answering: {error}", file=sys.stderr)
    sys.exit(1)
PY
}

wait_for() {
    for _ in $(seq 1 30); do
        answers "$1" 2>/dev/null && return 0
        sleep 1
    done
    echo "services: $1 did not start answering within 30 s" >&2
    return 1
}

start_postgres() {
    if [ -d /etc/postgresql ] && command -v pg_ctlcluster >/dev/null; then
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start
    elif command -v pg_ctl >/dev/null && [ -n "${PGDATA:-}" ]; then
        # pg_ctl refuses to run as root.
        runuser -u postgres -- pg_ctl -D "$PGDATA" -l "$PGDATA/server.log" start
    else
        echo "services: PostgreSQL is not installed. Install it: apt-get install -y postgresql" >&2
        return 1
    fi
}

start_redis() {
    if ! command -v redis-server >/dev/null; then
        echo "services: Redis is not installed. Install it: apt-get install -y redis-server" >&2
        return 1
    fi
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log
}

start_rabbitmq() {
    if ! command -v rabbitmq-server >/dev/null; then
        echo "services: RabbitMQ is not installed (apt-get install -y rabbitmq-server);" \
            "the RabbitMQ scale-out test will skip" >&2
        return 1
    fi
    rabbitmq-server -detached
}

for service in postgres redis; do
    if ! answers "$service"; then
        echo "services: starting $service"
        "start_$service"
        wait_for "$service"
    fi
done
if ! answers rabbitmq 2>/dev/null; then
    echo "services: starting rabbitmq"
    if start_rabbitmq; then
        wait_for rabbitmq || echo "services: RabbitMQ did not answer; its test will skip" >&2
    fi
fi
echo "services: PostgreSQL and Redis answer"
