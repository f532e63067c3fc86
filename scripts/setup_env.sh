#!/usr/bin/env bash
# Creates (or updates) a virtual environment with torch==2.13.0 (CPU) and this package.
# Usage: scripts/setup_env.sh VENV_DIR STACK [--newest]
#   STACK: "current" = transformers 5.x, "gaudi" = optimum-habana 1.21.2's pins (transformers 4.55).
#   By default every package is pinned to the versions last tested green (constraints/STACK.txt), so a fresh machine
#   gets what the suite last passed on. --newest takes the newest versions pyproject.toml's ranges allow instead
#   (for the Gaudi stack: within optimum-habana's pins), to see drift before users meet it.
set -euo pipefail
venv=$1
stack=${2:-current}
newest=${3:-}
root=$(cd "$(dirname "$0")/.." && pwd)
case "$stack" in
  current) extras="dev,app,quantization" ;;
  gaudi) extras="gaudi,dev,app,quantization" ;;
  *) echo "unknown stack '$stack' (current or gaudi)" >&2; exit 2 ;;
esac
case "$newest" in
  "" | --newest) ;;
  *) echo "unknown option '$newest' (--newest or nothing)" >&2; exit 2 ;;
esac
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch first, pinned: an unpinned torch requirement would pull a multi-GB CUDA build.
"${pip[@]}" "torch==2.13.0"
if [ -z "$newest" ]; then
  "${pip[@]}" -c "$root/constraints/$stack.txt" -e "$root[$extras]" "torch==2.13.0"
  exit 0
fi
# The newest versions: the Gaudi stack's pins (pyproject's gaudi extra) as constraints prune pip's search at once
# (without them pip backtracks through many huggingface-hub releases for a quarter of an hour).
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$venv/bin/python" - "$root/pyproject.toml" "$stack" >"$constraints" <<'PY'
import sys, tomllib
extras = tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]
print("\n".join(extras["gaudi"] if sys.argv[2] == "gaudi" else []))
PY
"${pip[@]}" --upgrade --upgrade-strategy eager -c "$constraints" -e "$root[$extras]" "torch==2.13.0"
