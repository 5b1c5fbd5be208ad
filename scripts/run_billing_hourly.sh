#!/usr/bin/env bash
# The hourly usage flush for cron (13 * * * *): flask billing flush_hourly, with its exit status.
# Usage: scripts/run_billing_hourly.sh [ENV_FILE]   (or set BILLING_ENV_FILE)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
env_file=${1:-${BILLING_ENV_FILE:-}}
if [ -n "$env_file" ]; then
    if [ ! -r "$env_file" ]; then
        echo "run_billing_hourly: cannot read env file $env_file" >&2
        exit 2
    fi
    set -a
    # shellcheck disable=SC1090
    . "$env_file"
    set +a
fi
flask_bin="$root/.venv/bin/flask"
[ -x "$flask_bin" ] || flask_bin=flask
cd "$root"
exec "$flask_bin" --app "${FLASK_APP:-billing}" billing flush_hourly
