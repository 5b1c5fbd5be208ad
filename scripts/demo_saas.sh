#!/usr/bin/env bash
# The SaaS gate, clickable in a browser against the local Stripe emulator: one command.
#   scripts/demo_saas.sh            upgrade mode (self-service Stripe Checkout)
#   scripts/demo_saas.sh booking    booking mode (Phase 0: gated orgs go to the booking page)
# Starts the emulator (its webhooks aimed at the app), a Celery worker that processes them, and
# the demo host app on http://127.0.0.1:${APP_PORT:-5000}; Ctrl-C stops everything. Needs Redis
# (the Celery broker; scripts/services.sh starts it when it does not answer). The database is a
# SQLite file in a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
mode=${1:-upgrade}
case "$mode" in
    upgrade | booking) ;;
    *) echo "usage: scripts/demo_saas.sh [upgrade|booking]" >&2; exit 2 ;;
esac
app_port=${APP_PORT:-5000}

scripts/bootstrap.sh
scripts/services.sh
workdir=$(mktemp -d "${TMPDIR:-/tmp}/billing-saas-demo.XXXXXX")
emulator_port=$(free_port)

export DATABASE_URL="sqlite:///$workdir/billing.db"
export STRIPE_API_BASE="http://127.0.0.1:$emulator_port"
export STRIPE_SECRET_KEY=sk_test_saasdemo00000000
export STRIPE_WEBHOOK_SECRET=whsec_saasdemo00000000
# A Redis database and a queue of this run's own, so the demo never meets other workers' tasks.
export REDIS_URL=${SAAS_DEMO_REDIS_URL:-redis://127.0.0.1:6379/13}
export CELERY_BROKER_URL=$REDIS_URL
export STRIPE_BILLING_QUEUE="billing-saas-demo-$$"
export BILLING_LOG_FORMAT=${BILLING_LOG_FORMAT:-text}
export SAAS_WORKSPACE_BOOKING_URL=${SAAS_WORKSPACE_BOOKING_URL:-https://cal.com/andreas-duess-fd/fishdog-demo}

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$workdir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

.venv/bin/python -m billing.emulator --port "$emulator_port" --quiet \
    --webhook-url "http://127.0.0.1:$app_port/stripe/webhook" \
    --webhook-secret "$STRIPE_WEBHOOK_SECRET" >"$workdir/emulator.log" 2>&1 &
pids+=($!)
wait_for_emulator "$STRIPE_API_BASE"
.venv/bin/flask --app billing billing db upgrade >/dev/null
if [ "$mode" = upgrade ]; then
    STRIPE_SAAS_PRICE_ID=$(.venv/bin/flask --app billing billing entitlements demo_price \
        | .venv/bin/python -c "import json, sys; print(json.load(sys.stdin)['price_id'])")
    export STRIPE_SAAS_PRICE_ID
else
    unset STRIPE_SAAS_PRICE_ID
fi
.venv/bin/celery -A billing.celery_app worker -Q "$STRIPE_BILLING_QUEUE" --concurrency 2 \
    --loglevel WARNING >"$workdir/worker.log" 2>&1 &
pids+=($!)

cat <<EOF_INFO
== SaaS gate demo ($mode mode)
   App:      http://127.0.0.1:$app_port/   (sign in as an organization, open its workspace)
   Stripe:   the emulator at $STRIPE_API_BASE (webhooks -> /stripe/webhook, Celery worker on
             queue $STRIPE_BILLING_QUEUE)
   Grant by hand:  DATABASE_URL=$DATABASE_URL .venv/bin/flask --app billing billing entitlements grant --org-id 1
   Logs:     $workdir/{emulator,worker}.log    Ctrl-C stops everything.
EOF_INFO
.venv/bin/flask --app 'billing.demo.host_app:create_demo_app()' run \
    --host 127.0.0.1 --port "$app_port" &
pids+=($!)
wait "${pids[-1]}"
