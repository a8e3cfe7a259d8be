#!/usr/bin/env bash
# Stop the Ray head and the MLflow server started by infra/local/up.sh (same DEFTX_INFRA_DIR).
# Idempotent: nothing running is not an error. The sqlite store and artifacts are kept.
set -euo pipefail

STATE="${DEFTX_INFRA_DIR:-$PWD/.deftx-infra}"
export RAY_AUTH_MODE=token

stop_pid() {  # pid file, name
  if [[ -f "$1" ]]; then
    local pid
    pid="$(cat "$1")"
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -9 "$pid" 2>/dev/null || true
      echo "stopped $2 (pid $pid)"
    fi
    rm -f "$1"
  fi
}

stop_pid "$STATE/mlflow.pid" "the MLflow server"
# mlflow server runs its app in child processes: stop whatever still serves the store
pkill -f "mlflow.*--backend-store-uri sqlite:///$STATE/mlflow.db" 2>/dev/null || true

if [[ -f "$STATE/ray.pid" ]]; then
  if command -v ray >/dev/null; then
    ray stop --force >/dev/null 2>&1 || true   # stops the Ray processes of this machine
    echo "stopped the Ray head ($(cat "$STATE/ray.address" 2>/dev/null || echo local))"
  else
    echo "down.sh: 'ray' not on PATH; stopping the GCS by its pid only" >&2
    stop_pid "$STATE/ray.pid" "the Ray GCS"
  fi
  rm -f "$STATE/ray.pid" "$STATE/ray.address"
fi
echo "down"
