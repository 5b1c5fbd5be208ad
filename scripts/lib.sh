# Shared by the ops wrappers: load an env file and find the project's flask. Source, don't run.

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
