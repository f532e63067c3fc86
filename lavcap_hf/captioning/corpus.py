"""`lavcap caption --output FILE`, by one process or by the N of `accelerate launch`: a `sharded_run.ShardedRun`
whose records are the files' captions.

The expanded file list is cut into batch windows; process r of N captions a contiguous run of the windows still to
do, so that every batch holds the same files whatever N is and a run with N processes writes byte for byte the
output of a run with one. Next to FILE:
- `FILE.lock`: held by the main process while the run lasts; a second run on FILE is refused, naming the first;
- `FILE.parts.json`: the run's identity, which a rerun must match to resume: the model (`model_identity`: weights,
  config, processor, dtype, device kind), the effective generation settings (the model's `generation_config` with the
  command's `--num-beams` / `--max-new-tokens`) and the batch size (batches are left padded and batched kernels round
  by batch shape, so it can change a caption);
- `FILE.part-0000r-of-0000N`: process r's records, one JSON line per file, `{"path", "caption"}` (with
  `"no_visual": true` for a file without a video stream, captioned with the visual input absent) or
  `{"path", "error"}`, appended and forced to disk per batch.
A rerun of the same command resumes from the part files there are (of any process count), drops a last line cut
short by a crash, skips the files already captioned and retries the bad ones. When every process is done, the main
process writes the captions to FILE in input order (written whole, then renamed over FILE; no FILE when nothing
could be captioned), lists the bad files and removes the parts and the identity file.
"""

from __future__ import annotations

import argparse
import io
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..model.pipeline_lavcap import AudioVisualCaptioningPipeline
from .files import (
    NO_VISUAL,
    caption_windows,
    expand_media_paths,
    generate_kwargs_of,
    load_captioning_pipeline,
    output_format,
    plot_plans,
    print_summary,
    write_rows,
)
from .generation import generation_settings
from .record_files import write_atomic
from .sharded_run import (
    Processes,
    RecordKind,
    ShardedRun,
    merged_records,
    model_identity,
    part_files,
    recorded,
    remove_parts,
)

CAPTION_RECORDS = RecordKind(key="path", result="caption", retry_errors=True, noun="file")
PART_FIELDS = ("path", "caption", "error", NO_VISUAL)
"""What a part file keeps of a record (OT plans are left out)."""


def settings_path(output: str | os.PathLike) -> str:
    """Where the identity of the run that the part files of `output` belong to is recorded."""
    return f"{os.fspath(output)}.parts.json"


def lock_path(output: str | os.PathLike) -> str:
    """The lock of the run writing `output`."""
    return f"{os.fspath(output)}.lock"


def read_part(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a part file; a last line without its newline (a write cut short) is left out.

    Raises:
        ValueError: a complete line that is not a record with a path and a caption or an error.
    """
    return CAPTION_RECORDS.read(path)


def run_identity(
    pipe: AudioVisualCaptioningPipeline, batch_size: int, **generate_kwargs: Any
) -> dict[str, Any]:
    """What makes two runs' captions interchangeable: the model, the effective generation settings and the batch
    size."""
    generation = generation_settings(pipe.model.generation_config, **generate_kwargs)
    return {**model_identity(pipe.model, pipe.processor), **generation, "batch_size": batch_size}


def write_captions(output: str | os.PathLike, records: Sequence[dict[str, Any]], fmt: str) -> None:
    """The `path, caption` of each record that has a caption, to `output` (written whole, then renamed over it);
    nothing is written when no record has one."""
    rows = [record for record in records if "caption" in record]
    if rows:
        buffer = io.StringIO(newline="")
        write_rows(rows, buffer, fmt)
        write_atomic(output, buffer.getvalue())


def merge_parts(output: str, paths: Sequence[str], fmt: str) -> tuple[int, list[tuple[str, str]]]:
    """Write the captions of the part files to `output` in the order of `paths`, then remove the parts.

    Returns (captioned files, [(path, reason)] of the files that could not be read).

    Raises:
        RuntimeError: a file of `paths` that no part file has a record of (the parts are kept).
    """
    records = merged_records(Path(output), paths, CAPTION_RECORDS, target_is_records=False)
    write_captions(output, records, fmt)
    remove_parts(output)
    return _outcome(records)


def _outcome(records: Sequence[dict[str, Any]]) -> tuple[int, list[tuple[str, str]]]:
    return sum("caption" in r for r in records), [(r["path"], r["error"]) for r in records if "error" in r]


def runs_on_cpu(device: str | None) -> bool:
    """Whether this process computes on the CPU (`accelerate.PartialState(cpu=...)`): `--device cpu`, accelerate's
    `--cpu`, or no device asked for and no GPU."""
    import torch

    forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return forced or (device or "").startswith("cpu") or (device is None and not torch.cuda.is_available())


def caption_corpus(args: argparse.Namespace) -> int:
    """`lavcap caption ... --output FILE` in this process, one of `accelerate launch`'s N; returns the exit code
    (0 when at least one file was captioned), the same on every process.

    Raises:
        RunError: on every process, when FILE is being written by another run or its part files belong to a run
            with other settings.
    """
    from accelerate import PartialState

    state = PartialState(cpu=runs_on_cpu(args.device))
    processes = Processes(state)
    paths, missing = expand_media_paths(args.paths)
    if not paths:
        if processes.is_main:
            print_summary(0, missing)
        return 1
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    device = args.device or (str(state.device) if processes.count > 1 else None)
    pipe = load_captioning_pipeline(args.model, device, args.dtype, args.trust_remote_code, args.quantize)
    generate_kwargs = generate_kwargs_of(args)
    fmt = output_format(args.output, args.format)
    run = ShardedRun(
        processes, output, lock_path(output), settings_path(output), CAPTION_RECORDS, progress=not args.quiet
    )
    with run:
        identity = run_identity(pipe, args.batch_size, **generate_kwargs) if processes.is_main else {}
        run.start(identity, resume=not args.no_resume, records=[Path(p) for p in part_files(output)])
        earlier = recorded(output, CAPTION_RECORDS, target_is_records=False) if processes.is_main else {}
        resumed = sum("caption" in earlier.get(path, {}) for path in paths)
        records = run.run(
            output,
            paths,
            args.batch_size,
            lambda windows, done: _part_records(pipe, args, paths, windows, done, generate_kwargs),
            write=lambda merged: write_captions(output, merged, fmt),
            main_appends_to_target=False,
            description="captioning",
        )
        run.forget()
    captioned, failures = _outcome(records)
    if processes.is_main:
        without_visual = sum(NO_VISUAL in record for record in records)
        print_summary(captioned, missing + failures, resumed, without_visual)
    return 0 if captioned else 1


def _part_records(
    pipe: AudioVisualCaptioningPipeline,
    args: argparse.Namespace,
    paths: list[str],
    windows: list[list[int]],
    done: set[str],
    generate_kwargs: dict[str, Any],
) -> Iterator[list[dict[str, Any]]]:
    """The part-file records of each window (OT plans drawn, then left out)."""
    for records in caption_windows(
        pipe,
        paths,
        windows,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        return_ot_plan=bool(args.plot_ot),
        known=done,
        **generate_kwargs,
    ):
        if args.plot_ot:
            plot_plans([r for r in records if "caption" in r], args.plot_ot)
        yield [{k: r[k] for k in PART_FIELDS if k in r} for r in records]
