"""What `scripts/test.sh` runs on one stack only, and the check that holds `stack_independent` tests to their mark."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
import transformers
from conftest import held_to_stack_independence
from stacks import code_run_of_differing_packages, packages_pinned_differently

ROOT = Path(__file__).resolve().parents[1]


def test_the_stacks_differ_in_the_libraries_the_gaudi_stack_exists_for() -> None:
    assert {"transformers", "accelerate", "peft", "datasets"} <= packages_pinned_differently()
    assert not {"torch", "numpy", "av", "pycocoevalcap"} & packages_pinned_differently()


def test_a_function_of_a_package_pinned_differently_is_seen_running_on_any_thread() -> None:
    with code_run_of_differing_packages() as ran:
        torch.ones(3).sum()
        np.arange(3).sum()
    assert ran == set()
    with code_run_of_differing_packages() as ran:
        thread = threading.Thread(target=transformers.utils.logging.get_verbosity)
        thread.start()
        thread.join()
    assert ran == {"transformers"}


def test_a_stack_independent_test_that_runs_transformers_fails(request: pytest.FixtureRequest) -> None:
    request.node.add_marker(pytest.mark.stack_independent)
    with held_to_stack_independence(request.node, "call"):
        torch.ones(3).sum()  # passes
    with pytest.raises(pytest.fail.Exception, match=r"its call ran code of .*\btransformers\b"):
        with held_to_stack_independence(request.node, "call"):
            transformers.AutoConfig.for_model("llama")


def test_each_mark_of_tests_run_once_is_left_out_by_the_other_stack_only() -> None:
    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    said = dict(
        re.findall(
            r"^(\w+):.*scripts/test\.sh runs it (?:on|from) the (\w+) stack only", "\n".join(markers), re.M
        )
    )
    assert said == {"stack_independent": "current", "cross_stack": "gaudi"}
    script = (ROOT / "scripts" / "test.sh").read_text()
    assert dict((stack, mark) for mark, stack in said.items()) == dict(
        re.findall(r'^once_on_(\w+)="(\w+)"$', script, re.M)
    )
    assert (
        'selection="not $once_on_gaudi"; [ "$stack" = gaudi ] && selection="not $once_on_current"' in script
    )
