#!/usr/bin/env bash
# Create .venv (if missing) and install billing with its test and dev extras into it. Re-installs
# only when pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.billing-installed
wanted=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    log=$(mktemp)
    if ! .venv/bin/python -m pip install --disable-pip-version-check -e '.[dev]' >"$log" 2>&1; then
        cat "$log" >&2
        echo "bootstrap: installing billing into .venv failed (log above)" >&2
        exit 1
    fi
    rm -f "$log"
    echo "$wanted" >"$stamp"
fi
.venv/bin/python -c "import billing, celery, stripe, sqlalchemy, flask" \
    || { echo "bootstrap: billing does not import from .venv" >&2; exit 1; }
