#!/usr/bin/env bash
# With RAY_AUTH_MODE=token, `ray start --head` refuses to start unless a token already exists
# (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); only ray.init creates one by itself.
# On a fresh machine, create ~/.ray/auth_token (ray's own generator; nothing is printed).
# Run from the project's virtualenv (`ray` on PATH); up.sh calls it before starting the head.
set -euo pipefail
if [[ -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" && ! -s "$HOME/.ray/auth_token" ]]; then
  ray get-auth-token --generate >/dev/null
  echo "created a Ray authentication token in $HOME/.ray/auth_token"
fi
