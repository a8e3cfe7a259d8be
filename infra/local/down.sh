#!/usr/bin/env bash
# Stop the Ray head and the MLflow server started by infra/local/up.sh (same DEFTX_INFRA_DIR).
# Idempotent: nothing running is not an error. The sqlite store and artifacts are kept.
set -euo pipefail

STATE="${DEFTX_INFRA_DIR:-$PWD/.deftx-infra}"

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

# Ray: only the processes of the head up.sh started (its own session, recorded in ray.sid), in the
# order `ray stop` uses (raylet, then the rest, then the GCS), SIGKILL for what outlives the grace
# period. `ray stop` would stop every Ray on the machine, including other users' and embedded ones.
descendants() { local child; for child in $(pgrep -P "$1" || true); do echo "$child"; descendants "$child"; done; }
alive_of() { local pid; for pid in $1; do if kill -0 "$pid" 2>/dev/null; then echo "$pid"; fi; done; }
stop_all() {  # pids, seconds to wait
  [[ -n "${1// }" ]] || return 0
  kill -TERM $1 2>/dev/null || true
  for _ in $(seq 1 $(( $2 * 2 ))); do [[ -z "$(alive_of "$1")" ]] && return 0; sleep 0.5; done
}
if [[ -f "$STATE/ray.sid" ]]; then
  SID="$(cat "$STATE/ray.sid")"
  if [[ "$SID" =~ ^[0-9]+$ ]] && [[ -n "$(pgrep -s "$SID" || true)" ]]; then
    MEMBERS="$(pgrep -s "$SID" || true)"
    ALL="$(for pid in $MEMBERS; do echo "$pid"; descendants "$pid"; done | sort -un | tr '\n' ' ')"
    RAYLET="$(pgrep -s "$SID" -f 'raylet/raylet ' || true)"
    GCS="$(pgrep -s "$SID" -f 'gcs/gcs_server ' || true)"
    stop_all "$RAYLET" 15
    stop_all "$(for pid in $(alive_of "$ALL"); do [[ " $GCS " == *" $pid "* ]] || echo "$pid"; done | tr '\n' ' ')" 15
    stop_all "$GCS" 15
    LEFT="$(alive_of "$ALL" | tr '\n' ' ')"
    [[ -n "${LEFT// }" ]] && kill -KILL $LEFT 2>/dev/null || true
    echo "stopped the Ray head ($(cat "$STATE/ray.address" 2>/dev/null || echo local))"
  fi
  # `ray start` recorded this head as the machine's current cluster (what `ray.init()` without an
  # address joins); forget it, as `ray stop` does, unless another head was started since
  CURRENT="${RAY_TMPDIR:-${TMPDIR:-/tmp}}/ray/ray_current_cluster"
  if [[ -f "$CURRENT" && -f "$STATE/ray.address" && "$(cat "$CURRENT")" == "$(cat "$STATE/ray.address")" ]]; then
    rm -f "$CURRENT"
  fi
elif [[ -f "$STATE/ray.pid" ]]; then   # a head started by an older up.sh: its GCS pid only
  stop_pid "$STATE/ray.pid" "the Ray GCS"
fi
rm -f "$STATE/ray.pid" "$STATE/ray.sid" "$STATE/ray.address"
echo "down"
