#!/usr/bin/env bash
# Create .venv (if missing) and install billing with its test and dev extras into it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]' 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
.venv/bin/python -c "import billing, celery, stripe, sqlalchemy, flask" \
    || { echo "bootstrap: installing billing into .venv failed" >&2; exit 1; }
