#!/usr/bin/env bash
# The hourly usage flush for cron (13 * * * *): flask billing flush_hourly, with its exit status.
# Usage: scripts/run_billing_hourly.sh [ENV_FILE]   (or set BILLING_ENV_FILE)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/scripts/lib.sh"
env_file=${1:-${BILLING_ENV_FILE:-}}
[ -z "$env_file" ] || load_env_file "$env_file"
run_flask "$root" billing flush_hourly
