"""What the benchmark scripts share: device sync, peak memory, machine name, the clock option, random-weight models."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import time
from collections.abc import Callable
from typing import Any

import torch

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "process": time.process_time}
"""`wall`: elapsed time. `process`: CPU time of this process, all its threads together. On a machine shared with
other jobs, the process clock of single-threaded CPU work is what an idle core would take (up to cache and memory
bandwidth effects), while wall time also counts the waits for the CPU; it says nothing about GPU work or about
other processes (DataLoader workers)."""


CLOCK_HELP = "wall: elapsed time; process: CPU time, for one thread on a shared machine (see measure.CLOCKS)"


def add_clock_argument(parser: argparse.ArgumentParser, help: str = CLOCK_HELP) -> None:
    """`--clock wall|process` (default wall)."""
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help=help)


def check_clock(parser: argparse.ArgumentParser, clock: str, device: str) -> None:
    """Refuse `--clock process` for GPU runs: the process clock does not see GPU work."""
    if clock == "process" and device.startswith("cuda"):
        parser.error("--clock process measures CPU time; GPU runs need --clock wall")


def build_model(config: Any, device: torch.device | str, dtype: torch.dtype) -> Any:
    """`LavCapForConditionalGeneration(config)` with random weights, created on `device` in `dtype` (a 7B model is
    not built in fp32 on the CPU first)."""
    from lavcap_hf import LavCapForConditionalGeneration

    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LavCapForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default_dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def reset_peak_rss() -> float | None:
    """Reset this process's resident-set peak (VmHWM) to its current size; return that size in MiB.

    Freed heap is first handed back to the OS (`malloc_trim`), so that memory the allocator kept from earlier work
    cannot absorb the next peak unseen. None where /proc/self/clear_refs is not available (not Linux).
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current resident set
        return status_mib("VmRSS")
    except OSError:
        return None


def peak_rss_growth(baseline: float | None) -> float:
    """Peak resident set (MiB) since `reset_peak_rss` returned `baseline`, minus `baseline`; NaN without one."""
    return float("nan") if baseline is None else status_mib("VmHWM") - baseline


def peak_memory_mib(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """Run `fn` once; return its result and the peak memory (MiB) it added.

    CUDA: `torch.cuda.max_memory_allocated` minus what was allocated before. CPU: growth of the resident set's
    peak (`reset_peak_rss`), which also sees allocations made outside torch (numpy, PyAV, PIL).
    """
    if device.type == "cuda":
        gc.collect()
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        synchronize(device)
        return result, (torch.cuda.max_memory_allocated(device) - before) / 2**20
    baseline = reset_peak_rss()
    result = fn()
    return result, peak_rss_growth(baseline)


# -- hardware limits ----------------------------------------------------------------------------------------------

GPU_PEAKS = {
    # name fragment: (memory bandwidth in TB/s, dense bf16 tensor TFLOP/s), from the vendors' data sheets (SXM).
    "H200": (4.8, 989.0),
    "H100": (3.35, 989.0),
    "A100": (2.04, 312.0),
    "L40S": (0.864, 362.0),
}
"""Peaks the limits are computed from, by a fragment of `torch.cuda.get_device_name()`."""


def add_peak_arguments(parser: argparse.ArgumentParser) -> None:
    """`--peak-bandwidth` / `--peak-tflops`: the device's peaks, where `GPU_PEAKS` does not know it (e.g. a CPU)."""
    parser.add_argument(
        "--peak-bandwidth", type=float, help="memory bandwidth in TB/s (default: by GPU name)"
    )
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 TFLOP/s (default: by GPU name)")


def device_peaks(
    device: torch.device, bandwidth: float | None, tflops: float | None
) -> tuple[float | None, float | None]:
    """(bytes/s, FLOP/s) of `device`: as given, else from `GPU_PEAKS` for a known CUDA GPU, else None."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = next((peaks for fragment, peaks in GPU_PEAKS.items() if fragment in name), (None, None))
        bandwidth = bandwidth if bandwidth is not None else known[0]
        tflops = tflops if tflops is not None else known[1]
    return (
        bandwidth * 1e12 if bandwidth is not None else None,
        tflops * 1e12 if tflops is not None else None,
    )


def format_limit(seconds: float | None, measured: float) -> tuple[str, str]:
    """(limit in ms, measured / limit) as printed; "-" where the limit is unknown."""
    if seconds is None or seconds <= 0:
        return "-", "-"
    return f"{1e3 * seconds:.1f}", f"{measured / seconds:.1f}x"
