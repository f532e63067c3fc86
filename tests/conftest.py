"""Shared fixtures: one torch thread for every test; synthetic audio and frames for media and feature tests; the saved
scene model of the captioning, evaluation and quantization tests (a module may define its own `model_dir`). Hooks:
`stack_independent` tests are held to their mark; modules with integration tests run first."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

# Tiny models gain nothing from intra-op threads, and on a 2-core machine they slow down badly under load.
# Set before torch is imported; subprocesses started by tests inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from helpers import save_scene_model  # noqa: E402
from stacks import code_run_of_differing_packages  # noqa: E402

# Frames carry their index in binary, one black (0) or white (1) vertical stripe per bit, which survives any
# lossy codec; this many stripes allows 64 frames.
INDEX_BITS = 6


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread for every test, restored afterwards (benchmarks run in-process set their own); the env
    variable above may be set otherwise by the caller."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_sine():
    """make_sine(frequency, seconds, sampling_rate, channels=1, amplitude=0.5) -> float32 (samples,) when
    channels == 1, else (samples, channels) with the same tone in every channel."""

    def make(frequency: float, seconds: float, sampling_rate: int, channels: int = 1, amplitude: float = 0.5):
        time = np.arange(int(round(seconds * sampling_rate))) / sampling_rate
        tone = (amplitude * np.sin(2 * np.pi * frequency * time)).astype(np.float32)
        return tone if channels == 1 else np.repeat(tone[:, None], channels, axis=1)

    return make


@pytest.fixture
def indexed_frames():
    """indexed_frames(count, height=48, width=64) -> uint8 RGB (count, height, width, 3) where frame i shows i in
    binary as INDEX_BITS vertical stripes (least significant bit on the left)."""

    def make(count: int, height: int = 48, width: int = 64) -> np.ndarray:
        if count > 2**INDEX_BITS:
            raise ValueError(f"at most {2**INDEX_BITS} indexed frames, got {count}")
        stripe = np.arange(width) * INDEX_BITS // width  # bit shown in each column
        bits = (np.arange(count)[:, None] >> stripe[None, :]) & 1  # (count, width)
        frames = np.broadcast_to((bits * 255).astype(np.uint8)[:, None, :, None], (count, height, width, 3))
        return frames.copy()

    return make


@pytest.fixture
def read_frame_indices():
    """read_frame_indices(frames) -> int (F,): the indices that `indexed_frames` drew into decoded frames."""

    def read(frames: np.ndarray) -> np.ndarray:
        width = frames.shape[2]
        centres = ((np.arange(INDEX_BITS) + 0.5) * width / INDEX_BITS).astype(int)
        # Sample each stripe's centre column, away from edges that codecs blur.
        bits = frames[:, :, centres, :].mean(axis=(1, 3)) > 127
        return (bits * (1 << np.arange(INDEX_BITS))).sum(axis=1)

    return read


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A saved tiny model (`helpers.save_scene_model`, seed 0), one per test module that uses it."""
    folder = tmp_path_factory.mktemp("model")
    save_scene_model(folder)
    return folder


@contextlib.contextmanager
def held_to_stack_independence(item: pytest.Item, phase: str) -> Iterator[None]:
    """For a `stack_independent` test, fail `phase` if it ran a function of a package the stacks pin differently."""
    if item.get_closest_marker("stack_independent") is None:
        yield
        return
    with code_run_of_differing_packages() as ran:
        yield
    if ran:
        pytest.fail(
            f"marked stack_independent, but its {phase} ran code of {', '.join(sorted(ran))}, which the two stacks "
            "pin at different versions: remove the mark, so that it runs on both stacks",
            pytrace=False,
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    with held_to_stack_independence(item, "set-up"):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    with held_to_stack_independence(item, "call"):
        return (yield)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules with an integration test first, each kept whole, in the shuffled order otherwise (pytest-randomly
    shuffles before this hook): the long tests start early, so that both stacks of `scripts/test.sh` end on short
    ones together instead of one waiting for the other's last training run."""
    heavy = {getattr(item, "module", None) for item in items if item.get_closest_marker("integration")}
    items.sort(key=lambda item: getattr(item, "module", None) not in heavy)
