"""The two tested stacks as their pins describe them, and the check behind the `stack_independent` mark.

`scripts/test.sh` runs `stack_independent` tests on the current stack only and `cross_stack` ones from the gaudi stack
only (pyproject.toml's markers say why each is enough once). A `stack_independent` test is held to its mark while it
runs (tests/conftest.py): no function of a package the two stacks pin at different versions may run in its set-up or
body, so its outcome cannot depend on which stack runs it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from packaging.utils import canonicalize_name

CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints"
STACKS = ("current", "gaudi")


def pinned_versions(stack: str) -> dict[str, str]:
    """{canonical package name: version} of constraints/STACK.txt."""
    pins = {}
    for line in (CONSTRAINTS / f"{stack}.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def packages_pinned_differently() -> set[str]:
    """Canonical names of the packages one stack pins at another version than the other, or pins alone."""
    current, gaudi = (pinned_versions(stack) for stack in STACKS)
    return {name for name in current.keys() | gaudi.keys() if current.get(name) != gaudi.get(name)}


@functools.cache
def code_locations_of_differing_packages() -> dict[str, str]:
    """{installed file or folder prefix: package} for each package of `packages_pinned_differently` installed in this
    environment: its top-level modules, as paths their functions' code objects carry."""
    locations = {}
    for name in sorted(packages_pinned_differently()):
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # pinned by the other stack only: nothing of it can run here
        # Each top-level entry once: a folder (a package) or a single module file.
        tops = {
            file.parts[0]: len(file.parts) > 1 for file in distribution.files or () if file.suffix != ".pth"
        }
        for top, is_folder in tops.items():
            if top.endswith((".dist-info", ".data")) or top in ("..", "__pycache__"):
                continue
            where = distribution.locate_file(top)
            for path in {str(where), os.path.realpath(where)}:  # as imported, and with links resolved
                locations[path + os.sep if is_folder else path] = name
    return locations


@contextlib.contextmanager
def code_run_of_differing_packages() -> Iterator[set[str]]:
    """Within the block, record which packages pinned differently by the two stacks had a Python function run (in
    this process, on any thread started in the block or the current one); yields the set it fills."""
    locations = code_locations_of_differing_packages()
    prefixes = tuple(locations)
    ran: set[str] = set()

    def profile(frame, event, arg) -> None:
        if event == "call":
            filename = frame.f_code.co_filename
            if filename.startswith(prefixes):
                ran.add(next(locations[prefix] for prefix in prefixes if filename.startswith(prefix)))

    previous = sys.getprofile(), threading.getprofile()
    sys.setprofile(profile)
    threading.setprofile(profile)
    try:
        yield ran
    finally:
        sys.setprofile(previous[0])
        threading.setprofile(previous[1])
