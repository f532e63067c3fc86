#!/usr/bin/env bash
# Runs every test, both tiers (pyproject.toml's `integration` mark included), on both supported stacks, each in its
# own virtual environment under .venvs/: transformers 5.x ("current") and optimum-habana 1.21.2's pins (transformers
# 4.55, "gaudi"), each pinned to the versions last tested green (constraints/STACK.txt). The two stacks are set up and
# tested side by side, one core each (the tests run one torch thread each). Tests whose outcome cannot depend on the
# stack run on one of them (the `stack_independent` and `cross_stack` marks, see pyproject.toml).
# Usage: scripts/test.sh [--newest] [pytest args]
#   --newest: the newest versions pyproject.toml's ranges allow instead of the pinned ones, in .venvs/newest-STACK
#   (scripts/update_constraints.sh pins them once they pass).
# `pytest` alone (no script) runs the fast tier only, on both cores of one stack.
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
stacks=(current gaudi)
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT

# Each job's output goes to its own file and is printed whole when the job is done.
run_in_background() {  # NAME COMMAND...: run COMMAND with its output in $logs/NAME.log, its status in $logs/NAME.status
  local name=$1
  shift
  ( set +e; "$@" >"$logs/$name.log" 2>&1; echo $? >"$logs/$name.status" ) &
}
report() {  # NAME: print the log of NAME; return its status
  cat "$logs/$1.log"
  return "$(cat "$logs/$1.status")"
}

# The web demo's browser test (tests/test_web_demo.py) drives Debian's chromium; installed once, as root, while the
# stacks are set up.
install_chromium() {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
}
jobs=()
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing chromium and chromium-driver (the web demo's browser test)"
    run_in_background chromium install_chromium
    jobs+=(chromium)
  else
    echo "== chromium is missing and needs root and apt-get to install: the browser test will fail" >&2
  fi
fi
for stack in "${stacks[@]}"; do
  echo "== setting up the ${prefix}$stack stack in $venvs/${prefix}$stack"
  run_in_background "setup-$stack" bash scripts/setup_env.sh "$venvs/${prefix}$stack" "$stack" $newest
  jobs+=("setup-$stack")
done
wait
status=0
for job in "${jobs[@]}"; do
  report "$job" || { echo "== $job failed" >&2; status=1; }
done
[ $status = 0 ] || exit $status
echo "== set up in ${SECONDS} s"

# The tests run in a shuffled order (pytest-randomly); pytest's -q hides the seed, so it is chosen and shown here.
# A --randomly-seed in the arguments wins (the last one given counts).
seed=${LAVCAP_TEST_SEED:-$(( (RANDOM << 15) | RANDOM ))}
echo "== test order: --randomly-seed=$seed"
stack_limit=${LAVCAP_STACK_TIME_LIMIT:-2400}  # seconds per stack; a whole stack takes 5 to 15 minutes here
# The marks of tests that one stack runs for both (pyproject.toml says why each is enough once), by the stack that runs
# them: each stack leaves out the other's.
once_on_current="stack_independent"
once_on_gaudi="cross_stack"
for stack in "${stacks[@]}"; do
  other=gaudi; [ "$stack" = gaudi ] && other=current
  python="$venvs/${prefix}$stack/bin/python"
  versions=$("$python" -c 'import importlib.metadata as m; print(", ".join(f"{p} {m.version(p)}" for p in ("transformers", "accelerate", "peft", "datasets", "torch")))')
  echo "== tests on the ${prefix}$stack stack ($versions; --randomly-seed=$seed): started"
  # -m: both tiers, less the tests the other stack runs for both; -n 0: one process per stack (the two stacks share
  # the cores); the 15 slowest tests are listed (--durations), so a CI log shows where the time went. pytest-timeout
  # fails a test that hangs (pyproject.toml); the outer limit also ends a hang that no signal reaches (a thread
  # blocked in native code): SIGABRT makes faulthandler print every thread's stack first.
  selection="not $once_on_gaudi"; [ "$stack" = gaudi ] && selection="not $once_on_current"
  run_in_background "tests-$stack" env LAVCAP_OTHER_STACK_PYTHON="$venvs/${prefix}$other/bin/python" \
    timeout --signal=ABRT --kill-after=60 "$stack_limit" \
    "$python" -X faulthandler -m pytest -q -p no:cacheprovider -m "$selection" -n 0 --durations=15 \
    --randomly-seed="$seed" "$@"
done
wait
for stack in "${stacks[@]}"; do
  echo "== tests on the ${prefix}$stack stack (--randomly-seed=$seed)"
  report "tests-$stack" || status=1
done
echo "== done in ${SECONDS} s"
exit $status
