"""What `scripts/test.sh` runs on one stack only, and the check that holds `stack_independent` tests to their mark."""

from __future__ import annotations

import re
import threading
import tomllib
from pathlib import Path

import numpy as np
import pytest
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


def test_the_gaudi_stack_leaves_out_exactly_the_marks_of_tests_run_once() -> None:
    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    once = {marker.split(":")[0] for marker in markers if "scripts/test.sh runs it" in marker}
    assert once == {"stack_independent", "cross_stack"}
    selection = re.search(r'^run_once="(.+)"', (ROOT / "scripts" / "test.sh").read_text(), flags=re.M)
    assert selection and set(selection.group(1).split(" or ")) == once
