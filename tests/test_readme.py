"""Every command in the README parses with the real argument parsers (the tests named there run them for real)."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from stacks import pinned_versions

from lavcap_cli import parse_command_line
from lavcap_hf.training.arguments import parse_arguments

README = Path(__file__).resolve().parents[1] / "README.md"


# The recipe trains in bf16 on a GPU; TrainingArguments refuses bf16 on a machine without one unless told it is CPU.
ON_THIS_MACHINE = ["--use_cpu", "true"]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split("#")[0].strip()
            if command:
                commands.append(command)
    return commands


def test_readme_has_the_two_setup_commands() -> None:
    commands = readme_commands()
    assert commands[:2] == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert (README.parent / script).exists()


@pytest.mark.parametrize("command", [c for c in readme_commands() if not c.startswith("bash ")])
def test_readme_command_parses(command: str) -> None:
    # transformers 4.55's TrainingArguments(bf16=True) exports ACCELERATE_MIXED_PRECISION, which later Trainers in
    # this process would pick up: the environment is restored afterwards.
    with mock.patch.dict(os.environ):
        parse_readme_command(command)


def parse_readme_command(command: str) -> None:
    words = shlex.split(command)
    if "lavcap_hf" in words:  # accelerate launch ... -m lavcap_hf <lavcap arguments>
        words = ["lavcap", *words[words.index("lavcap_hf") + 1 :]]
    if words[0] == "lavcap":
        args = parse_command_line(words[1:])
        if args.command == "train":
            parse_arguments(args.arguments + ON_THIS_MACHINE)
    else:
        script = next(i for i, w in enumerate(words) if w == "examples/train.py")
        assert (README.parent / words[script]).exists()
        parse_arguments(words[script + 1 :] + ON_THIS_MACHINE)


PYPROJECT = README.parent / "pyproject.toml"
STACK_EXTRAS = {"current": ("dev", "app", "quantization"), "gaudi": ("gaudi", "dev", "app", "quantization")}


@pytest.mark.parametrize("stack", sorted(STACK_EXTRAS))
def test_the_pinned_stack_satisfies_every_range_of_the_package(stack: str) -> None:
    """Each requirement of the package and of the stack's extras is pinned, at a version its range allows: a range
    changed in pyproject.toml without re-pinning (scripts/update_constraints.sh) fails here."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    requirements = [*project["dependencies"]]
    for extra in STACK_EXTRAS[stack]:
        requirements += project["optional-dependencies"][extra]
    pins = pinned_versions(stack)
    for requirement in map(Requirement, requirements):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"constraints/{stack}.txt does not pin {requirement.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints/{stack}.txt pins {name}=={pins[name]}, outside the package's range {requirement}"
        )


def test_the_readme_names_the_pinned_versions() -> None:
    table = re.search(r"\| stack \| (.+?) \|\n\| [-| ]+\|\n((?:\|.*\|\n)+)", README.read_text())
    assert table, "README: the table of tested versions is missing"
    packages = [name.strip() for name in table.group(1).split("|")]
    rows = {cells[0]: cells[1:] for cells in (
        [cell.strip() for cell in row.strip("|").split("|")] for row in table.group(2).splitlines()
    )}  # fmt: skip
    assert sorted(rows) == sorted(STACK_EXTRAS)
    for stack, versions in rows.items():
        pins = pinned_versions(stack)
        assert dict(zip(packages, versions, strict=True)) == {name: pins[name] for name in packages}, stack


EXAMPLE_SCRIPTS = sorted((README.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLE_SCRIPTS, ids=lambda path: path.name)
def test_no_example_script_shadows_an_installed_module(script: Path) -> None:
    """`python examples/X.py` puts examples/ first on the import path: a script named like a module the package
    imports would be imported in its place (examples/evaluate.py broke `import evaluate`, and with it every command
    running examples/train.py)."""
    assert importlib.util.find_spec(script.stem) is None, (
        f"{script.name} shadows the installed module {script.stem}"
    )


@pytest.mark.integration
@pytest.mark.parametrize("script", EXAMPLE_SCRIPTS, ids=lambda path: path.name)
def test_each_example_script_runs_as_the_readme_runs_it(script: Path) -> None:
    """`python examples/X.py --help`, as the README and examples/README.md run the scripts (from the repository root)."""
    done = subprocess.run(
        [sys.executable, str(script.relative_to(README.parent)), "--help"],
        capture_output=True,
        text=True,
        cwd=README.parent,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "usage:" in done.stdout
