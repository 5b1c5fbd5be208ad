#!/usr/bin/env bash
# The main job on the embedded default: no PostgreSQL, Redis or Stripe account needed.
# Installs billing into .venv, starts the local Stripe emulator, migrates a SQLite file, seeds demo
# usage, runs the hourly flush once (`flask billing flush_hourly`) and compares Stripe's billed
# totals with the database. Usage: scripts/demo.sh [ORGS] [EVENTS] [HOURS]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
orgs=${1:-5}
events=${2:-2000}
hours=${3:-6}

scripts/bootstrap.sh
workdir=$(mktemp -d "${TMPDIR:-/tmp}/billing-demo.XXXXXX")
port=$(free_port)

export FLASK_APP=billing
export DATABASE_URL="sqlite:///$workdir/billing.db"
export STRIPE_API_BASE="http://127.0.0.1:$port"
export STRIPE_SECRET_KEY=sk_test_embeddeddemo0000
export STRIPE_WEBHOOK_SECRET=whsec_embeddeddemo0000
export STRIPE_BILLING_ENABLED=1
export STRIPE_BILLING_METERS=api_call,storage_gb_hour
export STRIPE_USAGE_FLUSH_LOCK_BACKEND=file
export BILLING_LOG_FORMAT=${BILLING_LOG_FORMAT:-text}

.venv/bin/python -m billing.emulator --port "$port" >"$workdir/emulator.log" 2>&1 &
emulator_pid=$!
trap 'kill "$emulator_pid" 2>/dev/null || true; wait "$emulator_pid" 2>/dev/null || true' EXIT
wait_for_emulator "$STRIPE_API_BASE"

echo "== Stripe emulator at $STRIPE_API_BASE; SQLite database in $workdir"
.venv/bin/flask billing db upgrade
echo "== Seeding $events events for $orgs organizations over the past $hours hours"
.venv/bin/flask billing seed_demo --orgs "$orgs" --events "$events" --hours "$hours" --seed 1 >"$workdir/seed.json"
echo "== Hourly flush (flask billing flush_hourly)"
.venv/bin/flask billing flush_hourly 2>"$workdir/flush.log" | tee "$workdir/flush.json"
echo "== Billed in Stripe vs. seeded in the database"
.venv/bin/python - "$STRIPE_API_BASE" "$workdir/seed.json" <<'PY'
import json, sys, urllib.request
stats = json.load(urllib.request.urlopen(sys.argv[1] + "/_emulator/stats"))
seeded = json.load(open(sys.argv[2]))["quantity_by_event_type"]
billed = {}
for per_meter in stats["billed"].values():
    for name, value in per_meter.items():
        billed[name] = billed.get(name, 0) + value
for name in sorted(seeded):
    mark = "ok" if billed.get(name) == seeded[name] else "MISMATCH"
    print(f"{name:>16}: seeded {seeded[name]:>8}  billed {billed.get(name, 0):>8}  {mark}")
sys.exit(0 if billed == seeded else 1)
PY
