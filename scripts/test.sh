#!/usr/bin/env bash
# Install everything, make sure PostgreSQL and Redis answer, lint, and run the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/unit -x).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
scripts/install_chromium.sh
scripts/services.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
