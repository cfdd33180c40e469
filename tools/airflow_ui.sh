#!/usr/bin/env bash
# `make airflow`: Airflow's UI on this machine. `airflow standalone` (scheduler, DAG processor, triggerer and
# API server with the UI) on 127.0.0.1:${AIRFLOW_PORT:-8080}, its SQLite database and logs in airflow_home/
# (git-ignored, shared with `make demo`), the DAGs of dags/ in embedded mode (each task a subprocess of
# .venv), artifacts under artifacts/. No login: the simple auth manager makes everyone an admin. Ctrl-C stops it.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$ROOT/.venv/bin"
PORT="${AIRFLOW_PORT:-8080}"
[ -x "$BIN/airflow" ] || { echo "airflow_ui.sh: $BIN/airflow missing: run 'make test' or 'make demo' once to build .venv" >&2; exit 2; }
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
    echo "airflow_ui.sh: port $PORT on 127.0.0.1 is taken; choose another: AIRFLOW_PORT=8081 make airflow" >&2
    exit 2
fi

export AIRFLOW_HOME="$ROOT/airflow_home"
export AIRFLOW__CORE__DAGS_FOLDER="$ROOT/dags"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=True
export AIRFLOW__API__HOST=127.0.0.1
export AIRFLOW__API__PORT="$PORT"
export AIRFLOW__API__BASE_URL="http://127.0.0.1:$PORT"  # tasks reach the execution API here (default :8080)
export AIRFLOW_VAR_EUPE_WORKDIR="$ROOT"  # relative paths in the form (configs/..., data) are read from here
export PATH="$BIN:$PATH"  # standalone starts its components as `airflow <command>`
mkdir -p "$AIRFLOW_HOME"

cat <<EOF
Airflow UI: http://127.0.0.1:$PORT/  (ready when the log below prints "Airflow is ready", about a minute)
Login: none needed (simple auth manager, every visitor is an admin; bound to 127.0.0.1 only).
Fine-tune: Dags > eupe_domain_finetune > Trigger, fill the form, Trigger. Artifacts: $ROOT/artifacts/
AIRFLOW_HOME=$AIRFLOW_HOME (SQLite database, task logs). Stop: Ctrl-C.
EOF
exec "$BIN/airflow" standalone
