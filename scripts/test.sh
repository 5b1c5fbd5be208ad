#!/usr/bin/env bash
# Install everything, make sure PostgreSQL and Redis answer, lint and check the format, and run
# the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/unit -x).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
scripts/install_chromium.sh
scripts/services.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Four processes on two cores: much of the suite waits on subprocesses, servers and the broker.
# Every test process has its own PostgreSQL schema, Redis key prefix and Celery queue (its pid).
.venv/bin/python -m pytest -n "${BILLING_TEST_PROCESSES:-4}" "$@"
