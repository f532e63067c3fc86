"""Every command in the README parses with the real argument parsers (the tests named there run them for real)."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from unittest import mock

import pytest

from lavcap_cli import parse_command_line
from lavcap_hf.training import parse_arguments

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
    if "lavcap_hf.cli" in words:  # accelerate launch ... -m lavcap_hf.cli <lavcap arguments>
        words = ["lavcap", *words[words.index("lavcap_hf.cli") + 1 :]]
    if words[0] == "lavcap":
        args = parse_command_line(words[1:])
        if args.command == "train":
            parse_arguments(args.arguments + ON_THIS_MACHINE)
    else:
        script = next(i for i, w in enumerate(words) if w == "examples/train.py")
        assert (README.parent / words[script]).exists()
        parse_arguments(words[script + 1 :] + ON_THIS_MACHINE)
