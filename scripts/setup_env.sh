#!/usr/bin/env bash
# Creates (or updates) a virtual environment with torch==2.13.0 (CPU) and this package.
# Usage: scripts/setup_env.sh VENV_DIR STACK   (STACK: "current" = transformers 5.x, "gaudi" = optimum-habana's pins)
set -euo pipefail
venv=$1
stack=${2:-current}
root=$(cd "$(dirname "$0")/.." && pwd)
case "$stack" in
  current) extras="dev,app" ;;
  gaudi) extras="gaudi,dev,app" ;;
  *) echo "unknown stack '$stack' (current or gaudi)" >&2; exit 2 ;;
esac
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch first, pinned: an unpinned torch requirement would pull a multi-GB CUDA build.
"${pip[@]}" "torch==2.13.0"
# The stack's pins, as constraints: they prune pip's search at once (without them pip backtracks through many
# huggingface-hub releases for a quarter of an hour before settling on the Gaudi stack's).
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$venv/bin/python" - "$root/pyproject.toml" "$stack" >"$constraints" <<'PY'
import sys, tomllib
extras = tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]
print("\n".join(extras["gaudi"] if sys.argv[2] == "gaudi" else []))
PY
"${pip[@]}" -c "$constraints" -e "$root[$extras]" "torch==2.13.0"
