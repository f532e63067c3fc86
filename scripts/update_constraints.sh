#!/usr/bin/env bash
# Re-pins the tested stacks: runs the whole suite on the newest versions pyproject.toml's ranges allow
# (scripts/test.sh --newest) and, only if every test passes on both stacks, writes those versions to
# constraints/current.txt and constraints/gaudi.txt. Commit the result as its own change, with the tallies.
# Extra arguments go to pytest.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venvs=${LAVCAP_VENVS:-$root/.venvs}
bash scripts/test.sh --newest "$@"
for stack in current gaudi; do
  {
    echo "# The $stack stack as last tested green: every package scripts/setup_env.sh installs, pinned."
    echo "# Written by scripts/update_constraints.sh after a green run of the suite on the newest versions the ranges allow;"
    echo "# pyproject.toml keeps the ranges. Do not edit by hand."
    # torch's local label (+cpu) is dropped: setup_env.sh installs torch==2.13.0 first, whichever build that is.
    "$venvs/newest-$stack/bin/python" -m pip list --format=freeze --exclude-editable --disable-pip-version-check \
      | grep -v -i -E '^(pip|setuptools|wheel)==' | sed -E 's/^(torch==[^+]+)\+.*/\1/'
  } >"constraints/$stack.txt"
  echo "== constraints/$stack.txt: $(grep -c '==' "constraints/$stack.txt") packages pinned"
done
