#!/usr/bin/env bash
# Single-organization smoke check in Stripe test mode (flask billing smoke_org), with its exit status.
# Usage: scripts/run_billing_smoke_org.sh ORG_ID [extra smoke_org flags, e.g. --no-fail-closed]
# Set BILLING_ENV_FILE to load the billing environment from a file first.
set -euo pipefail
if [ $# -lt 1 ] || [ -z "$1" ]; then
    echo "usage: $(basename "$0") ORG_ID [--skip-contract] [--no-fail-closed] [--refresh-period] [--json]" >&2
    exit 2
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/scripts/lib.sh"
[ -z "${BILLING_ENV_FILE:-}" ] || load_env_file "$BILLING_ENV_FILE"
run_flask "$root" billing smoke_org --org-id "$1" --require-enabled --validate-contract \
    --fail-closed "${@:2}"
