"""Benchmark `lavcap caption` end to end, in clips per second, with 0, 1, 2, ... decoding workers.

What a corpus run does per clip: decode the file (`lavcap_hf.model.media_decoding.load_media`: 16 kHz audio, 20 frames),
featurise it (the pipeline's `preprocess`: fbank and CLIP pixel values) and caption it (the model's `generate()`),
in batches. `lavcap caption --num-workers N` (`lavcap_hf.captioning.files.caption_windows`) hands decoding and
featurising to N DataLoader processes, so that the model captions one batch while the workers prepare the next.

Rows, all wall-clock rates over the same clips (median of `--repeats` passes):
- `decode + featurise only`: the workers' job, in this process (`--threads` torch threads, 1 by default as in a
  worker), without the model, over the distinct files;
- `model only (media pre-featurised)`: `generate()` on inputs featurised beforehand, batched as the run batches
  them. This is the bound a captioning run is judged against: the model never waits for media;
- `lavcap caption`, one row per `--workers` count: `caption_windows`, the loop of `lavcap caption` (decode,
  featurise, caption; worker start-up included, as a real run pays it). `of the bound` is its rate over the
  model-only rate: 100 % means the decoding is hidden entirely. `after batch 1` is the rate from the first batch's
  captions to the last (the clips of the later batches over that time), which leaves out the start, when every
  worker featurises its first batch and the model can only wait; where it reaches the bound, the workers keep up
  with the model. It needs several batches per worker to mean that: with as many batches as workers, all of them
  are featurised at once during the start. With 0 workers the expected rate is the serial one,
  1 / (1 / decode rate + 1 / model rate), printed below the table with the workers that one process's decode rate
  says the model needs.

Profiles, random weights, nothing downloaded; beam search (4 beams) with exactly `--max-new-tokens` new tokens per
caption. The model is built in memory on `--device` (`measure.build_model`) and wrapped in the pipeline as
`lavcap caption` wraps a loaded one (`load_captioning_pipeline`); no checkpoint is written. Clips are written by
`lavcap_hf.data.synthetic.generate_dataset` (10 s, 25 fps, 360 x 360 px H.264, 44.1 kHz AAC by default), one per
process in parallel; `--num-clips` paths cycle over `--distinct-clips` files, as a corpus read from the page cache.
- default (CPU): `small_lavcap_config` (the paper's input shapes at small widths: 1024 x 64 fbank, 20 frames of
  224 px, a 4-layer 256-d LLaMA with LLaMA's 32000-token vocabulary), 16 clips, batch 4, 16 new tokens, fp32;
- `--paper-size` (CUDA GPU): `paper_sized_config` (CED-base, CLIP ViT-L/14, LLaMA-2-7B), bf16, 128 clips over
  16 files, batch 16, 16 new tokens, workers 0 2 4 8;
- `--quick`: tiny model, 4 short small clips: a smoke run in seconds.

    python benchmarks/bench_caption.py [--num-clips 16] [--workers 0 1 2] [--threads 1]
    python benchmarks/bench_caption.py --paper-size --device cuda [--workers 0 2 4 8]
    python benchmarks/bench_caption.py --quick
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from bench_generate import build_config
from measure import build_model, cpu_name

from lavcap_hf import AudioVisualCaptioningPipeline, LavCapProcessor
from lavcap_hf.captioning.files import (
    FeaturisedWindows,
    batch_windows,
    caption_windows,
    generate_captions,
    pipeline_parameters,
)
from lavcap_hf.data.synthetic import generate_dataset
from lavcap_hf.testing.tokenizers import word_level_tokenizer

NUM_BEAMS = 4
PROFILES: dict[str, dict[str, Any]] = {
    "small": {"num_clips": 16, "distinct_clips": 16, "duration": 10.0, "fps": 25, "frame_size": 360,
              "sampling_rate": 44100, "batch_size": 4, "max_new_tokens": 16, "workers": [0, 1, 2]},
    "quick": {"num_clips": 4, "distinct_clips": 4, "duration": 1.0, "fps": 8, "frame_size": 64,
              "sampling_rate": 16000, "batch_size": 2, "max_new_tokens": 2, "workers": [0, 1, 2]},
    "paper": {"num_clips": 128, "distinct_clips": 16, "duration": 10.0, "fps": 25, "frame_size": 360,
              "sampling_rate": 44100, "batch_size": 16, "max_new_tokens": 16, "workers": [0, 2, 4, 8]},
}  # fmt: skip


def make_clips(args: argparse.Namespace, folder: Path) -> list[str]:
    """`args.num_clips` paths cycling over `args.distinct_clips` synthetic clips, each written by its own process
    (a 10 s clip takes seconds of CPU to synthesise and encode)."""
    count = min(args.num_clips, args.distinct_clips)
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(count, os.cpu_count() or 1)) as pool:
        jobs = [
            pool.submit(
                generate_dataset,
                folder / f"{seed:03d}",
                num_train=1,
                num_test=0,
                seed=seed,
                duration_range=(args.duration, args.duration),
                sampling_rate=args.sampling_rate,
                fps=args.fps,
                size=args.frame_size,
            )
            for seed in range(count)
        ]
        files = [job.result()["train"][0]["video_path"] for job in jobs]
    return [files[k % count] for k in range(args.num_clips)]


def build_pipeline(args: argparse.Namespace) -> AudioVisualCaptioningPipeline:
    """The pipeline `lavcap caption` runs, around a random-weight model of `args.profile` built on `args.device`
    in `args.dtype` (as `load_captioning_pipeline` wraps a loaded model)."""
    tokenizer = word_level_tokenizer([])
    config = build_config(args.profile, tokenizer)
    torch.manual_seed(0)
    model = build_model(config, args.device, getattr(torch, args.dtype)).eval()
    processor = LavCapProcessor.from_model_config(config, tokenizer)
    return AudioVisualCaptioningPipeline(model=model, processor=processor, device=torch.device(args.device))


def median_rate(run: Callable[[], Any], clips: int, repeats: int) -> float:
    """Median clips per second (wall clock) over `repeats` calls of `run`."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        rates.append(clips / (time.perf_counter() - start))
    return statistics.median(rates)


def caption_rates(
    pipe: AudioVisualCaptioningPipeline,
    paths: list[str],
    batch_size: int,
    num_workers: int,
    generate_kwargs: dict[str, Any],
) -> tuple[float, float]:
    """One `lavcap caption` loop over `paths`: (clips/s of the whole run, clips/s from the first batch's captions
    to the last batch's); the second is NaN with a single batch."""
    windows = batch_windows(len(paths), batch_size)
    start = time.perf_counter()
    captioned = []  # when each batch's captions came
    for records in caption_windows(pipe, paths, windows, batch_size, num_workers, **generate_kwargs):
        errors = [record["error"] for record in records if "error" in record]
        if errors:
            raise RuntimeError(f"a synthesised clip could not be read: {errors[0]}")
        captioned.append(time.perf_counter())
    whole = len(paths) / (time.perf_counter() - start)
    later = len(paths) - len(windows[0])
    return whole, later / (captioned[-1] - captioned[0]) if later else float("nan")


def measure(
    args: argparse.Namespace, pipe: AudioVisualCaptioningPipeline, paths: list[str]
) -> dict[str, float]:
    """Clips per second of each row of the table, keyed by row name (`workers=N` for the captioning rows, and
    `workers=N after batch 1` for their rate after the first batch)."""
    generate_kwargs = {
        "num_beams": NUM_BEAMS,
        "max_new_tokens": args.max_new_tokens,
        "min_new_tokens": args.max_new_tokens,
    }
    preprocess, forward, postprocess = pipeline_parameters(pipe, **generate_kwargs)
    distinct = list(dict.fromkeys(paths))
    featurise = FeaturisedWindows(pipe, distinct, batch_windows(len(distinct), args.batch_size), preprocess)

    def featurise_all() -> dict[str, Any]:
        return {path: chunks for k in range(len(featurise)) for path, chunks in featurise[k]}

    featurised = featurise_all()  # also a warm-up of the decoders
    failed = [chunks for chunks in featurised.values() if isinstance(chunks, str)]
    if failed:
        raise RuntimeError(f"a synthesised clip could not be read: {failed[0]}")
    windows = batch_windows(len(paths), args.batch_size)

    def model_only(batches: list[list[int]]) -> None:
        for window in batches:
            clips = [featurised[paths[i]] for i in window]
            generate_captions(pipe, clips, args.batch_size, forward, postprocess)

    model_only(windows[:1])  # warm-up
    count, repeats = len(paths), args.repeats
    rates = {
        "decode": median_rate(featurise_all, len(distinct), repeats),
        "model": median_rate(lambda: model_only(windows), count, repeats),
    }
    for workers in args.workers:
        runs = [caption_rates(pipe, paths, args.batch_size, workers, generate_kwargs) for _ in range(repeats)]
        rates[f"workers={workers}"] = statistics.median(whole for whole, _ in runs)
        rates[f"workers={workers} after batch 1"] = statistics.median(later for _, later in runs)
    return rates


def print_table(rates: dict[str, float], workers: list[int]) -> None:
    bound = rates["model"]

    def rate_and_share(rate: float) -> str:
        return "- | -" if math.isnan(rate) else f"{rate:.2f} | {100 * rate / bound:.0f}%"

    print(
        "| pipeline | workers | clips/s | of the bound | clips/s after batch 1 | of the bound after batch 1 |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| decode + featurise only | - | {rates['decode']:.2f} | - | - | - |")
    print(f"| model only (media pre-featurised) | - | {bound:.2f} | 100% | - | - |")
    for count in workers:
        whole, later = rates[f"workers={count}"], rates[f"workers={count} after batch 1"]
        print(f"| lavcap caption | {count} | {rate_and_share(whole)} | {rate_and_share(later)} |")
    serial = 1 / (1 / rates["decode"] + 1 / bound)
    print(
        f"\nserial expectation without workers: {serial:.2f} clips/s ({100 * serial / bound:.0f}% of the bound)"
    )
    print(
        f"workers the model needs at one process's decode rate: {math.ceil(bound / rates['decode'])} "
        f"({bound:.2f} / {rates['decode']:.2f} clips/s, rounded up)"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny model, 4 short small clips: a smoke run")
    size.add_argument(
        "--paper-size",
        action="store_true",
        help="CED-base, CLIP ViT-L/14, LLaMA-2-7B-shaped decoder, bf16, random weights; needs a CUDA GPU",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda; --paper-size needs cuda")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="default fp32, bf16 on paper size"
    )
    parser.add_argument("--num-clips", type=int, help="clips captioned per pass")
    parser.add_argument("--distinct-clips", type=int, help="files written; the clips cycle over them")
    parser.add_argument("--duration", type=float, help="seconds per clip (default 10)")
    parser.add_argument("--fps", type=int)
    parser.add_argument("--frame-size", type=int, help="side of the square frames in px (even)")
    parser.add_argument("--sampling-rate", type=int, help="audio rate of the files (decoded to 16 kHz)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--workers", type=int, nargs="+", help="DataLoader worker counts, one row each")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    parser.add_argument("--clips-dir", type=Path, help="write the clips here (default: a temporary folder)")
    args = parser.parse_args(argv)
    args.profile = "paper" if args.paper_size else "quick" if args.quick else "small"
    for key, value in PROFILES[args.profile].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.paper_size else "float32"
    return args


def require_cuda(args: argparse.Namespace) -> None:
    """Exit with a message naming CUDA when `--paper-size` is asked for without a CUDA device."""
    if not args.paper_size or (torch.device(args.device).type == "cuda" and torch.cuda.is_available()):
        return
    model = build_model(build_config("paper", word_level_tokenizer([])), "meta", getattr(torch, args.dtype))
    gib = sum(p.numel() for p in model.parameters()) * getattr(torch, args.dtype).itemsize / 2**30
    problems = (
        [f"got --device {args.device} (give --device cuda)"]
        if torch.device(args.device).type != "cuda"
        else []
    )
    if not torch.cuda.is_available():
        problems.append("torch finds no CUDA device on this machine")
    sys.exit(
        f"--paper-size needs a CUDA GPU (the {args.dtype} weights alone take {gib:.1f} GiB): {'; '.join(problems)}"
    )


def describe_device(args: argparse.Namespace) -> str:
    host = f"{cpu_name()}, {os.cpu_count()} CPUs"
    device = torch.device(args.device)
    where = (
        f"{torch.cuda.get_device_name(device)} (host: {host})" if device.type == "cuda" else f"cpu ({host})"
    )
    return (
        f"device: {where}, {args.dtype}, {torch.get_num_threads()} torch thread(s) in the main process; "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    require_cuda(args)
    transformers.logging.set_verbosity_error()
    threads = torch.get_num_threads()
    try:
        with contextlib.ExitStack() as stack:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            paths = make_clips(args, args.clips_dir or work / "clips")  # before CUDA starts in this process
            torch.set_num_threads(args.threads)
            pipe = build_pipeline(args)
            print(describe_device(args))
            print(
                f"model: {args.profile} config; {len(paths)} clips ({len(set(paths))} files) of {args.duration:g} s "
                f"({args.frame_size} px at {args.fps} fps, {args.sampling_rate} Hz audio), batch {args.batch_size}, "
                f"beam {NUM_BEAMS}, {args.max_new_tokens} new tokens; median of {args.repeats} pass(es), "
                "wall clock\n"
            )
            rates = measure(args, pipe, paths)
            print_table(rates, args.workers)
            if pipe.device.type == "cuda":
                print(f"peak GPU memory: {torch.cuda.max_memory_allocated(pipe.device) / 2**30:.1f} GiB")
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
