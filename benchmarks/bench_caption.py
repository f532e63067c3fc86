"""Benchmark `lavcap caption` end to end, in clips per second, with 0, 1, 2, ... decoding workers.

What a corpus run does per clip: decode the file (`lavcap_hf.media.load_media`: 16 kHz audio, 20 frames),
featurise it (the pipeline's `preprocess`: fbank and CLIP pixel values) and caption it (the model's `generate()`),
in batches. `lavcap caption --num-workers N` (`lavcap_hf.batch_captioning.caption_windows`) hands decoding and
featurising to N DataLoader processes, so that the model captions one batch while the workers prepare the next.

Rows, all wall-clock rates over the same clips (median of `--repeats` passes):
- `decode + featurise only`: the workers' job, in this process, without the model;
- `model only (media pre-featurised)`: `generate()` on inputs featurised beforehand, batched as the run batches
  them. This is the bound a captioning run is judged against: the model never waits for media;
- `lavcap caption`, one row per `--workers` count: `caption_files`, the loop of `lavcap caption` (decode,
  featurise, caption; worker start-up included, as a real run pays it). `of the bound` is its rate over the
  model-only rate: 100 % means the decoding is hidden entirely. With 0 workers the expected rate is the serial
  one, 1 / (1 / decode rate + 1 / model rate), printed below the table.

The model is `small_lavcap_config` (the paper's input shapes at small widths: 1024 x 64 fbank, 20 frames of 224 px,
a 4-layer 256-d LLaMA with LLaMA's 32000-token vocabulary), random weights, saved to a folder and loaded as
`lavcap caption` loads it; beam search (4 beams) with exactly `--max-new-tokens` new tokens per caption. Clips are
written by `lavcap_hf.synthetic.generate_dataset` (10 s, 25 fps, 360 x 360 px H.264, 44.1 kHz AAC by default).

    python benchmarks/bench_caption.py [--num-clips 16] [--workers 0 1 2] [--threads 1]
    python benchmarks/bench_caption.py --quick      # tiny model, 4 short small clips: a smoke run in seconds
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from measure import cpu_name

from lavcap_hf import LavCapForConditionalGeneration, LavCapProcessor
from lavcap_hf.batch_captioning import (
    FeaturisedWindows,
    batch_windows,
    caption_files,
    generate_captions,
    load_captioning_pipeline,
    pipeline_parameters,
)
from lavcap_hf.synthetic import generate_dataset
from lavcap_hf.testing_utils import small_lavcap_config, tiny_lavcap_config, word_level_tokenizer

LLAMA_VOCAB = 32000
PROFILES: dict[str, dict[str, Any]] = {
    "small": {"num_clips": 16, "duration": 10.0, "fps": 25, "frame_size": 360, "sampling_rate": 44100,
              "batch_size": 4, "max_new_tokens": 16},
    "quick": {"num_clips": 4, "duration": 1.0, "fps": 8, "frame_size": 64, "sampling_rate": 16000,
              "batch_size": 2, "max_new_tokens": 2},
}  # fmt: skip


def save_model(profile: str, folder: Path) -> None:
    """A random-weight model of `profile` and its processor, saved as `lavcap caption --model` expects them."""
    tokenizer = word_level_tokenizer([])
    ids = tokenizer.convert_tokens_to_ids(["<|audio|>", "<|video|>"])
    if profile == "quick":
        config = tiny_lavcap_config(vocab_size=len(tokenizer), audio_token_id=ids[0], video_token_id=ids[1])
    else:
        config = small_lavcap_config(*ids, vocab_size=LLAMA_VOCAB)
    torch.manual_seed(0)
    LavCapForConditionalGeneration(config).save_pretrained(folder)
    LavCapProcessor.from_model_config(config, tokenizer).save_pretrained(folder)


def make_clips(args: argparse.Namespace, folder: Path) -> list[str]:
    generate_dataset(
        folder,
        num_train=args.num_clips,
        num_test=0,
        duration_range=(args.duration, args.duration),
        sampling_rate=args.sampling_rate,
        fps=args.fps,
        size=args.frame_size,
    )
    return sorted(str(path) for path in folder.rglob("*.mp4"))


def median_rate(run: Callable[[], Any], clips: int, repeats: int) -> float:
    """Median clips per second (wall clock) over `repeats` calls of `run`."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        rates.append(clips / (time.perf_counter() - start))
    return statistics.median(rates)


def measure(args: argparse.Namespace, model_dir: Path, paths: list[str]) -> dict[str, float]:
    """Clips per second of each row of the table, keyed by row name (`workers=N` for the captioning rows)."""
    pipe = load_captioning_pipeline(str(model_dir), device="cpu")
    generate_kwargs = {
        "num_beams": 4,
        "max_new_tokens": args.max_new_tokens,
        "min_new_tokens": args.max_new_tokens,
    }
    preprocess, forward, postprocess = pipeline_parameters(pipe, **generate_kwargs)
    windows = batch_windows(len(paths), args.batch_size)
    featurise = FeaturisedWindows(pipe, paths, windows, preprocess)
    featurised = [featurise[k] for k in range(len(windows))]  # also a warm-up of the decoders
    for items in featurised:
        failed = [chunks for _, chunks in items if isinstance(chunks, str)]
        if failed:
            raise RuntimeError(f"a synthesised clip could not be read: {failed[0]}")

    def model_only() -> None:
        for items in featurised:
            generate_captions(pipe, [chunks for _, chunks in items], args.batch_size, forward, postprocess)

    model_only()  # warm-up
    count, repeats = len(paths), args.repeats
    rates = {
        "decode": median_rate(lambda: [featurise[k] for k in range(len(windows))], count, repeats),
        "model": median_rate(model_only, count, repeats),
    }
    for workers in args.workers:
        rates[f"workers={workers}"] = median_rate(
            lambda w=workers: caption_files(
                pipe, paths, args.batch_size, progress=False, num_workers=w, **generate_kwargs
            ),
            count,
            repeats,
        )
    return rates


def print_table(rates: dict[str, float], workers: list[int]) -> None:
    bound = rates["model"]
    print("| pipeline | workers | clips/s | of the bound |")
    print("|---|---:|---:|---:|")
    print(f"| decode + featurise only | - | {rates['decode']:.2f} | - |")
    print(f"| model only (media pre-featurised) | - | {bound:.2f} | 100% |")
    for count in workers:
        rate = rates[f"workers={count}"]
        print(f"| lavcap caption | {count} | {rate:.2f} | {100 * rate / bound:.0f}% |")
    serial = 1 / (1 / rates["decode"] + 1 / bound)
    print(
        f"\nserial expectation without workers: {serial:.2f} clips/s ({100 * serial / bound:.0f}% of the bound)"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 4 short small clips: a smoke run")
    parser.add_argument("--num-clips", type=int)
    parser.add_argument("--duration", type=float, help="seconds per clip (default 10)")
    parser.add_argument("--fps", type=int)
    parser.add_argument("--frame-size", type=int, help="side of the square frames in px (even)")
    parser.add_argument("--sampling-rate", type=int, help="audio rate of the files (decoded to 16 kHz)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    parser.add_argument("--clips-dir", type=Path, help="write the clips here (default: a temporary folder)")
    args = parser.parse_args(argv)
    args.profile = "quick" if args.quick else "small"
    for key, value in PROFILES[args.profile].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with contextlib.ExitStack() as stack:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            paths = make_clips(args, args.clips_dir or work / "clips")
            save_model(args.profile, work / "model")
            print(
                f"device: cpu ({cpu_name()}, {os.cpu_count()} CPUs), float32, {torch.get_num_threads()} torch "
                f"thread(s) in the main process; torch {torch.__version__}, transformers {transformers.__version__}"
            )
            print(
                f"model: {args.profile} config; {len(paths)} clips of {args.duration:g} s ({args.frame_size} px at "
                f"{args.fps} fps, {args.sampling_rate} Hz audio), batch {args.batch_size}, beam 4, "
                f"{args.max_new_tokens} new tokens; median of {args.repeats} pass(es), wall clock\n"
            )
            rates = measure(args, work / "model", paths)
            print_table(rates, args.workers)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
