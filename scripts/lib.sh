# Shared by the ops wrappers and the demos: load an env file, find the project's flask, start-up
# helpers for the local Stripe emulator. Source, don't run.

# load_env_file FILE: export every variable FILE assigns; exit 2 when it cannot be read.
load_env_file() {
    if [ ! -r "$1" ]; then
        echo "$(basename "$0"): cannot read env file $1" >&2
        exit 2
    fi
    set -a
    # shellcheck disable=SC1090
    . "$1"
    set +a
}

# run_flask ROOT ARGS...: the venv's flask when the project has one, else flask on PATH.
run_flask() {
    local root=$1 flask_bin="$1/.venv/bin/flask"
    shift
    [ -x "$flask_bin" ] || flask_bin=flask
    cd "$root"
    exec "$flask_bin" --app "${FLASK_APP:-billing}" "$@"
}

# free_port: print a free TCP port on 127.0.0.1 (needs the project's .venv).
free_port() {
    .venv/bin/python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
}

# wait_for_emulator URL: return once the Stripe emulator at URL answers (10 s at most), else exit 1.
wait_for_emulator() {
    .venv/bin/python - "$1" "$(basename "$0")" <<'PY'
import sys, time, urllib.request
for _ in range(100):
    try:
        urllib.request.urlopen(sys.argv[1] + "/_emulator/health", timeout=1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit(f"{sys.argv[2]}: the Stripe emulator did not start (see its log)")
PY
}
