#!/usr/bin/env bash
# The main job on a fresh machine: set up .venvs/current (torch==2.13.0 CPU + this package), then `lavcap demo`.
# Extra arguments go to `lavcap demo` (e.g. --output DIR, --steps N).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${LAVCAP_VENVS:-$root/.venvs}/current
bash "$root/scripts/setup_env.sh" "$venv" current
"$venv/bin/lavcap" demo "$@"
