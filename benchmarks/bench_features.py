"""Benchmark the data pipeline: decode clips, fbank and frame preprocessing, in clips per second.

Clips: mp4 files (H.264 video, AAC audio) written by `lavcap_hf.data.synthetic.generate_dataset`; by default 10 s,
25 fps, 360 x 360 px, 44.1 kHz audio (about what a YouTube clip of AudioCaps holds), which the decoder resamples.

Table 1, per core: one process pinned to one CPU (`os.sched_setaffinity`, so FFmpeg's and numpy's threads share
that core too), milliseconds per clip for each stage, median over the clips and `--repeats` passes:
- decode audio: `lavcap_hf.model.media_decoding.load_media(need_frames=False)`, 16 kHz mono float32;
- decode frames: `load_media(need_audio=False)`, 20 uint8 RGB frames spread over the clip;
- fbank: `LavCapFeatureExtractor` on the waveform, (1024, 64) normalised log-mel;
- frames: `LavCapFeatureExtractor.preprocess_videos`, (20, 3, 224, 224) CLIP pixel values;
then clips per second for the sum, and the peak resident-set growth of one clip (`measure.peak_memory_mib`).

Table 2, the training data pipeline: `torch.utils.data.DataLoader` over `lavcap_hf.data.dataset.LavCapDataset` (decoding in
`__getitem__`) with `lavcap_hf.data.collator.LavCapDataCollator` as `collate_fn` (fbank, frames, prompts, in the workers),
for each `--workers` count and both collators (`train`: captions, labels, SpecAugment; `eval`: prompts only).
Per row, medians of `--repeats` passes after a warm-up pass (persistent workers, so worker start-up is not counted):
clips per second (wall time: what a training step waits for, and what parallel workers improve on free cores), CPU
milliseconds per clip of the main process and the workers together (what the pipeline costs, whatever the load), and
the peak resident-set growth of one worker (of the main process for 0 workers).

    python benchmarks/bench_features.py [--num-clips 16] [--workers 0 2] [--clips-dir DIR]
    python benchmarks/bench_features.py --quick --repeats 1   # 4 short, small clips: a smoke run in seconds
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from measure import CLOCKS, add_clock_argument, cpu_name, peak_memory_mib, peak_rss_growth, reset_peak_rss
from torch.utils.data import DataLoader

from lavcap_hf import LavCapConfig, LavCapProcessor
from lavcap_hf.data.clips import load_manifest
from lavcap_hf.data.collator import LavCapDataCollator
from lavcap_hf.data.dataset import LavCapDataset
from lavcap_hf.data.synthetic import generate_dataset
from lavcap_hf.model.media_decoding import load_media
from lavcap_hf.testing.tokenizers import word_level_tokenizer

STAGES = ("decode audio", "decode frames", "fbank", "frames")
PROFILES: dict[str, dict[str, Any]] = {
    "full": {
        "num_clips": 16,
        "duration": 10.0,
        "fps": 25,
        "frame_size": 360,
        "sampling_rate": 44100,
        "batch_size": 8,
    },
    "quick": {
        "num_clips": 4,
        "duration": 2.0,
        "fps": 10,
        "frame_size": 64,
        "sampling_rate": 16000,
        "batch_size": 2,
    },
}


def make_clips(args: argparse.Namespace, out_dir: Path) -> Path:
    """Write `args.num_clips` synthetic mp4 clips under `out_dir`; return their manifest."""
    generate_dataset(
        out_dir,
        num_train=args.num_clips,
        num_test=0,
        duration_range=(args.duration, args.duration),
        sampling_rate=args.sampling_rate,
        fps=args.fps,
        size=args.frame_size,
    )
    return out_dir / "train.jsonl"


def make_processor(captions: list[str]) -> LavCapProcessor:
    """The paper's processor: 1024 x 64 fbank, 20 frames of 224 px, 64 + 20 placeholders."""
    return LavCapProcessor.from_model_config(LavCapConfig(), word_level_tokenizer(captions))


@contextlib.contextmanager
def one_core() -> Iterator[int]:
    """Pin this process (and the threads it starts) to one CPU within the block; yields the CPU's number."""
    if not hasattr(os, "sched_setaffinity"):
        yield -1
        return
    cpus = os.sched_getaffinity(0)
    core = min(cpus)
    os.sched_setaffinity(0, {core})
    try:
        yield core
    finally:
        os.sched_setaffinity(0, cpus)


# -- table 1: stages, one core --------------------------------------------------------------------------------------


def time_stages(path: str, processor: LavCapProcessor, clock: Callable[[], float]) -> list[float]:
    """Seconds of each of the four stages (`STAGES`) for one clip."""
    extractor = processor.feature_extractor
    rate, num_frames = extractor.sampling_rate, extractor.num_frames
    seconds: list[float] = []

    def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        start = clock()
        result = fn(*args, **kwargs)
        seconds.append(clock() - start)
        return result

    audio = timed(load_media, path, sampling_rate=rate, num_frames=num_frames, need_frames=False).audio
    frames = timed(load_media, path, sampling_rate=rate, num_frames=num_frames, need_audio=False).frames
    timed(extractor, audio, sampling_rate=rate)
    timed(extractor.preprocess_videos, frames)
    return seconds


def stage_table(paths: list[str], processor: LavCapProcessor, repeats: int, clock_name: str) -> None:
    """Per-stage milliseconds per clip on one core; the first clip's run (a warm-up) gives the peak memory."""
    clock = CLOCKS[clock_name]
    with one_core() as core:
        _, peak = peak_memory_mib(lambda: time_stages(paths[0], processor, clock), torch.device("cpu"))
        runs = np.asarray([time_stages(path, processor, clock) for _ in range(repeats) for path in paths])
    medians = np.median(runs, axis=0)
    total = float(np.median(runs.sum(axis=1)))
    print(f"Per core (pinned to CPU {core}), median over {len(runs)} clip runs, {clock_name} clock:\n")
    print("| stage | ms per clip | share |")
    print("|---|---:|---:|")
    for stage, value in zip(STAGES, medians, strict=True):
        print(f"| {stage} | {1e3 * value:.1f} | {100 * value / medians.sum():.0f}% |")
    print(f"| **all four** | {1e3 * total:.1f} | 100% |")
    print(f"\nper core: {1 / total:.2f} clips/s; peak resident-set growth of one clip: {peak:.0f} MiB\n")


# -- table 2: DataLoader ----------------------------------------------------------------------------------------------


class StatsCollator:
    """Wraps a collator; each batch also carries `stats`: (worker id or None, CPU seconds the worker has used since it
    started, its resident-set peak growth since then in MiB)."""

    def __init__(self, collator: LavCapDataCollator) -> None:
        self.collator = collator
        self.memory_baseline: float | None = None
        self.cpu_baseline = 0.0

    def start(self, worker_id: int | None = None) -> None:
        """`worker_init_fn`: take the worker's own baselines."""
        self.memory_baseline = reset_peak_rss()
        self.cpu_baseline = time.process_time()

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(items)
        worker = torch.utils.data.get_worker_info()
        cpu = time.process_time() - self.cpu_baseline
        batch["stats"] = (worker.id if worker else None, cpu, peak_rss_growth(self.memory_baseline))
        return batch


def loader_figures(
    dataset: LavCapDataset, collator: LavCapDataCollator, workers: int, batch_size: int, repeats: int
) -> tuple[float, float, float]:
    """Medians over `repeats` passes after a warm-up pass of clips per second (wall) and of CPU milliseconds per clip
    (main process and workers together), and the peak memory growth of one worker (of the main process without)."""
    stats_collator = StatsCollator(collator)
    if workers == 0:
        stats_collator.start()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=stats_collator,
        worker_init_fn=stats_collator.start if workers else None,
        persistent_workers=workers > 0,
    )
    rates, cpu_ms, peak = [], [], 0.0
    worker_cpu: dict[int, float] = {}  # CPU seconds of each worker up to its last batch
    for index in range(repeats + 1):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        spent_before = sum(worker_cpu.values())
        for batch in loader:
            worker, cpu, memory = batch["stats"]
            if worker is not None:
                worker_cpu[worker] = cpu
            peak = max(peak, memory)
        if index:  # the first pass starts the workers
            rates.append(len(dataset) / (time.perf_counter() - start_wall))
            spent = time.process_time() - start_cpu + sum(worker_cpu.values()) - spent_before
            cpu_ms.append(1e3 * spent / len(dataset))
    return statistics.median(rates), statistics.median(cpu_ms), peak


def loader_table(
    manifest: Path, processor: LavCapProcessor, workers: list[int], batch_size: int, repeats: int
) -> None:
    dataset = LavCapDataset(load_manifest(manifest), num_frames=processor.feature_extractor.num_frames)
    collators = {
        "train": LavCapDataCollator(processor, training=True),
        "eval": LavCapDataCollator(processor, training=False),
    }
    print(
        f"DataLoader over LavCapDataset + LavCapDataCollator, {len(dataset)} clips, batch {batch_size}, "
        f"median of {repeats} passes after a warm-up pass:\n"
    )
    print("| collator | workers | clips/s | CPU ms per clip | peak MiB per worker |")
    print("|---|---:|---:|---:|---:|")
    for name, collator in collators.items():
        for count in workers:
            rate, cpu_ms, peak = loader_figures(dataset, collator, count, batch_size, repeats)
            print(f"| {name} | {count} | {rate:.2f} | {cpu_ms:.0f} | {peak:.0f} |")


# -- main -----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="4 short, small clips in batches of 2: a smoke run"
    )
    parser.add_argument("--num-clips", type=int)
    parser.add_argument("--duration", type=float, help="seconds per clip (default 10)")
    parser.add_argument("--fps", type=int)
    parser.add_argument("--frame-size", type=int, help="side of the square frames in px (even)")
    parser.add_argument(
        "--sampling-rate", type=int, help="audio rate of the files (default 44100, decoded to 16 kHz)"
    )
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clips-dir", type=Path, help="write the clips here (default: a temporary folder)")
    add_clock_argument(
        parser, "clock of the per-core table (see measure.CLOCKS); the DataLoader table is always wall time"
    )
    args = parser.parse_args(argv)
    for key, value in PROFILES["quick" if args.quick else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    with contextlib.ExitStack() as stack:
        clips_dir = args.clips_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        manifest = make_clips(args, clips_dir)
        clips = load_manifest(manifest)
        processor = make_processor([clip.caption for clip in clips])
        print(
            f"device: cpu ({cpu_name()}, {os.cpu_count()} CPUs; the pipeline is numpy, PyAV and PIL, no GPU stage); "
            f"outputs float32; torch {torch.__version__}, {torch.get_num_threads()} torch thread(s) in the main process"
        )
        print(
            f"clips: {len(clips)} x {args.duration:g} s mp4 (H.264 {args.frame_size}x{args.frame_size} px at "
            f"{args.fps} fps, AAC mono {args.sampling_rate} Hz) -> 16 kHz fbank (1024, 64) + frames (20, 3, 224, 224)\n"
        )
        stage_table([str(clip.video) for clip in clips], processor, args.repeats, args.clock)
        loader_table(manifest, processor, args.workers, args.batch_size, args.repeats)


if __name__ == "__main__":
    main()
