#!/usr/bin/env bash
# Runs the whole test suite on both supported stacks, each in its own virtual environment under .venvs/:
# transformers 5.x ("current") and optimum-habana 1.21.2's pins (transformers 4.55, "gaudi"), each pinned to the
# versions last tested green (constraints/STACK.txt).
# Usage: scripts/test.sh [--newest] [pytest args]
#   --newest: the newest versions pyproject.toml's ranges allow instead of the pinned ones, in .venvs/newest-STACK
#   (scripts/update_constraints.sh pins them once they pass).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venvs=${LAVCAP_VENVS:-$root/.venvs}
newest=""
prefix=""
if [ "${1:-}" = --newest ]; then
  newest=--newest
  prefix=newest-
  shift
fi
# The web demo's browser test (tests/test_web_demo.py) drives Debian's chromium; installed once, as root.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing chromium and chromium-driver (the web demo's browser test)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "== chromium is missing and needs root and apt-get to install: the browser test will fail" >&2
  fi
fi
for stack in current gaudi; do
  echo "== setting up the ${prefix}$stack stack in $venvs/${prefix}$stack"
  bash scripts/setup_env.sh "$venvs/${prefix}$stack" "$stack" $newest
done
# The tests run in a shuffled order (pytest-randomly); pytest's -q hides the seed, so it is chosen and shown here.
# A --randomly-seed in the arguments wins (the last one given counts).
seed=${LAVCAP_TEST_SEED:-$(( (RANDOM << 15) | RANDOM ))}
echo "== test order: --randomly-seed=$seed"
status=0
stack_limit=${LAVCAP_STACK_TIME_LIMIT:-2400}  # seconds per stack; a whole stack takes 5 to 20 minutes here
for stack in current gaudi; do
  other=gaudi; [ "$stack" = gaudi ] && other=current
  python="$venvs/${prefix}$stack/bin/python"
  versions=$("$python" -c 'import importlib.metadata as m; print(", ".join(f"{p} {m.version(p)}" for p in ("transformers", "accelerate", "peft", "datasets", "torch")))')
  echo "== tests on the ${prefix}$stack stack ($versions; --randomly-seed=$seed)"
  # pytest-timeout fails a test that hangs (pyproject.toml); this outer limit also ends a hang that no signal
  # reaches (a thread blocked in native code): SIGABRT makes faulthandler print every thread's stack first.
  LAVCAP_OTHER_STACK_PYTHON="$venvs/${prefix}$other/bin/python" timeout --signal=ABRT --kill-after=60 "$stack_limit" \
    "$python" -X faulthandler -m pytest -q -p no:cacheprovider --randomly-seed="$seed" "$@" \
    || status=1
done
exit $status
