#!/usr/bin/env bash
# Start a Ray head and an MLflow tracking server on 127.0.0.1 for deftx (idempotent: a service that
# is already up is left alone). Run from the project's virtualenv (`ray` and `mlflow` on PATH), e.g.
#   PATH="$PWD/.venv/bin:$PATH" infra/local/up.sh
# Settings (environment): DEFTX_INFRA_DIR (state: pid files, logs, sqlite store, artifacts;
# default ./.deftx-infra), RAY_PORT (GCS, 6379), RAY_DASHBOARD_PORT (8265), RAY_NUM_CPUS (all),
# MLFLOW_PORT (5000). Stop everything with infra/local/down.sh (same settings).
set -euo pipefail

STATE="${DEFTX_INFRA_DIR:-$PWD/.deftx-infra}"
RAY_PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
NUM_CPUS="${RAY_NUM_CPUS:-$(nproc)}"
export RAY_AUTH_MODE=token   # ray start, the job CLI and ray.init must agree
# Keep 127.0.0.1 as the node address (on Linux Ray otherwise swaps in the machine's routable address):
# every Ray server then listens on loopback only, and clients can dial 127.0.0.1 (see deftx/ray_env.py).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0

for tool in ray mlflow curl; do
  command -v "$tool" >/dev/null || { echo "up.sh: '$tool' not found on PATH (activate the deftx virtualenv)" >&2; exit 2; }
done
mkdir -p "$STATE"
STATE="$(cd "$STATE" && pwd)"

alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_http() {  # url, seconds, name: any HTTP answer counts (the dashboard answers 401 without a token)
  for _ in $(seq 1 "$2"); do
    [[ "$(curl -s -o /dev/null -w '%{http_code}' "$1" || true)" != "000" ]] && return 0
    sleep 1
  done
  echo "up.sh: $3 did not answer at $1 within $2 s (log in $STATE)" >&2
  return 1
}

# -- Ray head ---------------------------------------------------------------------------------
if alive "$STATE/ray.pid" && ray status --address "127.0.0.1:$RAY_PORT" >/dev/null 2>&1; then
  echo "Ray head already running at 127.0.0.1:$RAY_PORT"
else
  "$(dirname "$0")/ensure-ray-token.sh"
  # its own session (setsid): down.sh stops exactly the processes of this head, no other Ray
  setsid -w ray start --head --node-ip-address=127.0.0.1 --port="$RAY_PORT" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
    --num-cpus="$NUM_CPUS" --disable-usage-stats >"$STATE/ray-start.log" 2>&1 </dev/null \
    || { echo "up.sh: ray start failed:" >&2; tail -20 "$STATE/ray-start.log" >&2; exit 1; }
  GCS_PID="$(pgrep -f "gcs_server.*--gcs_server_port=$RAY_PORT" | head -1)"
  [[ -n "$GCS_PID" ]] || { echo "up.sh: no GCS process after ray start (log: $STATE/ray-start.log)" >&2; exit 1; }
  echo "$GCS_PID" >"$STATE/ray.pid"
  ps -o sid= -p "$GCS_PID" | tr -d ' ' >"$STATE/ray.sid"
  echo "127.0.0.1:$RAY_PORT" >"$STATE/ray.address"
  wait_http "http://127.0.0.1:$DASHBOARD_PORT/api/version" 60 "the Ray dashboard"
  echo "Ray head started at 127.0.0.1:$RAY_PORT (dashboard http://127.0.0.1:$DASHBOARD_PORT)"
fi

# -- MLflow tracking server -------------------------------------------------------------------
if alive "$STATE/mlflow.pid"; then
  echo "MLflow server already running (pid $(cat "$STATE/mlflow.pid"))"
else
  mkdir -p "$STATE/mlartifacts"
  nohup mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "sqlite:///$STATE/mlflow.db" --artifacts-destination "$STATE/mlartifacts" \
    >"$STATE/mlflow.log" 2>&1 &
  echo $! >"$STATE/mlflow.pid"
  wait_http "http://127.0.0.1:$MLFLOW_PORT/health" 90 "the MLflow server"
  echo "MLflow server started at http://127.0.0.1:$MLFLOW_PORT (store $STATE/mlflow.db)"
fi

cat <<ENV
# use them with:
export RAY_AUTH_MODE=token
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0   # for ray CLI commands given --address 127.0.0.1:$RAY_PORT
export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT   # ray job submit / ray job status
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
ENV
