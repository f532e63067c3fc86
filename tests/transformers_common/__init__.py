"""Transformers' own common tests (model, configuration, processor), run against this package.

Usage (in a test module)::

    from transformers_common import import_common_tests

    common = import_common_tests()  # skips the module when the package index cannot be reached
    class LavCapModelTest(common.test_modeling_common.ModelTesterMixin, common.generation_tester_mixin,
                          unittest.TestCase): ...
    ConfigTester = common.test_configuration_common.ConfigTester
    ProcessorTesterMixin = common.test_processing_common.ProcessorTesterMixin

The mixins ship in the transformers sdist on the package index, not in the wheel. At test time the sdist matching
the installed transformers version is downloaded once per virtual environment (`pip download`, cached under
`<sys.prefix>/transformers-sdist-cache/`, a file lock keeps parallel test processes from racing), its top-level
`tests/*.py` files are extracted into a package named `transformers_sdist_tests` (a name that cannot collide
with this repository's `tests`), and the modules are imported from there. Nothing of the sdist is copied into
this repository.

The sdist lacks four modules its test files import (`tests/generation/test_utils.py`,
`tests/exporters/test_export.py`, `tests/utils/test_configuration_utils.py` and the CI helper
`utils/fetch_hub_objects_for_ci.py`). This package supplies minimal replacements written here (`shims/`),
registered under the names the sdist imports before its modules are loaded. Those replacements run no tests of
their own: generation behaviour is covered by this project's tests.

Stacks: the 5.x and 4.55 sdists have the same layout (top-level `tests/*.py`, no subfolders). 4.55's
`test_modeling_common.py` does not import `exporters.test_export`, its `test_processing_common.py` does not
import the CI helper but downloads a 10 MB video from a third-party site at import time when PyAV is installed;
`import_common_tests` imports it as if PyAV were absent, so only that one in-memory video input is missing.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import transformers
from filelock import FileLock

from .shims import configuration_test_utils, export_tester, fetch_hub_objects, generation_test_utils

PACKAGE = "transformers_sdist_tests"
"""Import name of the extracted `tests/` folder of the transformers sdist."""

COMMON_MODULES = ("test_modeling_common", "test_configuration_common", "test_processing_common")

# Names the sdist's test modules import but the sdist does not contain, and the modules standing in for them.
SHIMS: dict[str, types.ModuleType] = {
    f"{PACKAGE}.generation.test_utils": generation_test_utils,
    f"{PACKAGE}.exporters.test_export": export_tester,
    f"{PACKAGE}.utils.test_configuration_utils": configuration_test_utils,
    "fetch_hub_objects_for_ci": fetch_hub_objects,
}

# pip's messages when it cannot reach the index (as opposed to finding no such release there).
UNREACHABLE_MARKERS = (
    "NewConnectionError",
    "ConnectTimeoutError",
    "Max retries exceeded",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "ProxyError",
    "SSLError",
)


@dataclass(frozen=True)
class CommonTests:
    """The imported common-test modules of the installed transformers version."""

    test_modeling_common: types.ModuleType
    test_configuration_common: types.ModuleType
    test_processing_common: types.ModuleType

    @property
    def generation_tester_mixin(self) -> type:
        """The (empty) `GenerationTesterMixin` that `test_modeling_common` checks generative testers inherit."""
        return generation_test_utils.GenerationTesterMixin


def sdist_cache_dir() -> Path:
    """Where the extracted sdist tests of each transformers version live: inside the virtual environment, so the
    download happens once per environment and goes away with it."""
    return Path(sys.prefix) / "transformers-sdist-cache"


def import_common_tests() -> CommonTests:
    """Import transformers' `test_modeling_common`, `test_configuration_common` and `test_processing_common` for
    the installed version, downloading its sdist on first use.

    Skips the calling test module (pytest) only when the package index cannot be reached.
    """
    package_dir = _extracted_tests(transformers.__version__)
    _register_package(package_dir)
    modules = {name: _import_common_module(name) for name in COMMON_MODULES}
    return CommonTests(**modules)


def _extracted_tests(version: str) -> Path:
    """`<cache>/transformers-<version>/transformers_sdist_tests/`, downloading and extracting the sdist if absent."""
    version_dir = sdist_cache_dir() / f"transformers-{version}"
    package_dir = version_dir / PACKAGE
    if package_dir.is_dir():
        return package_dir
    version_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(version_dir / "download.lock"), timeout=900):
        if package_dir.is_dir():  # another process finished it while this one waited
            return package_dir
        with tempfile.TemporaryDirectory(dir=version_dir) as scratch:
            archive = _download_sdist(version, Path(scratch))
            staging = Path(scratch) / PACKAGE
            _extract_tests(archive, staging)
            os.replace(staging, package_dir)  # atomic: readers see all of it or nothing
    return package_dir


def _download_sdist(version: str, destination: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--retries", "2",
        "--timeout", "30", "--disable-pip-version-check", "-d", str(destination), f"transformers=={version}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        output = result.stdout + result.stderr
        if any(marker in output for marker in UNREACHABLE_MARKERS):
            pytest.skip(
                f"transformers' common tests need the transformers {version} sdist and the package index "
                "cannot be reached",
                allow_module_level=True,
            )
        raise RuntimeError(f"could not download the transformers {version} sdist:\n{output[-3000:]}")
    archives = list(destination.glob("transformers-*.tar.gz"))
    if len(archives) != 1:
        raise RuntimeError(f"expected one transformers sdist in {destination}, found {archives}")
    return archives[0]


def _extract_tests(archive: Path, package_dir: Path) -> None:
    """Extract the sdist's top-level `tests/*.py` files into `package_dir`, made a package by an empty
    `__init__.py` (`test_configuration_common` executes it once more through `direct_transformers_import`)."""
    package_dir.mkdir()
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and _is_top_level_test_file(m.name)]
        if not any(Path(m.name).name == "test_modeling_common.py" for m in members):
            raise RuntimeError(f"{archive.name} has no tests/test_modeling_common.py")
        for member in members:
            source = tar.extractfile(member)
            assert source is not None  # regular files always have content
            (package_dir / Path(member.name).name).write_bytes(source.read())
    (package_dir / "__init__.py").write_text("")


def _is_top_level_test_file(name: str) -> bool:
    parts = Path(name).parts  # ("transformers-5.24.0", "tests", "test_x.py")
    return len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py")


def _register_package(package_dir: Path) -> None:
    """Make `transformers_sdist_tests` (and the shims under the names it imports) importable."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACKAGE, package_dir / "__init__.py", submodule_search_locations=[str(package_dir)]
        )
        assert spec is not None and spec.loader is not None
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        spec.loader.exec_module(package)
    for name, module in SHIMS.items():
        _install_module(name, module)


def _install_module(name: str, module: types.ModuleType) -> None:
    """Register `module` as `name`, creating empty parent packages (`pkg.generation`) as needed."""
    parts = name.split(".")
    for depth in range(1, len(parts)):
        parent = ".".join(parts[:depth])
        if parent not in sys.modules:
            package = types.ModuleType(parent)
            package.__path__ = []
            sys.modules[parent] = package
            if depth > 1:
                setattr(sys.modules[".".join(parts[: depth - 1])], parts[depth - 1], package)
    sys.modules[name] = module
    if len(parts) > 1:
        setattr(sys.modules[".".join(parts[:-1])], parts[-1], module)


def _import_common_module(name: str) -> types.ModuleType:
    qualified = f"{PACKAGE}.{name}"
    if qualified in sys.modules:
        return sys.modules[qualified]
    if name != "test_processing_common":
        return importlib.import_module(qualified)
    # 4.55 downloads a video from a third-party site at import when PyAV is installed (see the module docstring).
    # Modules of transformers that check PyAV themselves are imported first, so only the sdist module sees False.
    importlib.import_module("transformers.video_utils")
    importlib.import_module("transformers.processing_utils")
    with mock.patch("transformers.utils.is_av_available", return_value=False):
        return importlib.import_module(qualified)
