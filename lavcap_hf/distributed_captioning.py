"""`lavcap caption --output FILE` across processes and machines: shards, resumable part files, one merged output.

Run by one process, or by N under `accelerate launch` (`accelerate.PartialState` gives this process's index and the
count). The expanded file list is cut into batch windows (`batch_windows`); process r of N captions a contiguous
run of about 1/N of the windows, so that every batch holds the same files whatever N is and a run with N processes
writes byte for byte the output of a run with one.

Each process appends each batch's records to its own part file next to the output, `FILE.part-00003-of-00004`,
one JSON line per file (`{"path", "caption"}` or `{"path", "error"}` for a bad file), flushed and fsynced per batch:
a killed process loses at most its batch in flight. `FILE.parts.json` records the model and generation settings of
the run the parts belong to. A rerun of the same command reads every part file there is (of any process count),
drops a last line cut short by a crash, skips the files already captioned and retries the bad ones. When every
process is done, the main process merges the parts into FILE in input order (written whole, then renamed over
FILE), lists the bad files and removes the parts.

Fault injection, for tests: `LAVCAP_CAPTION_EXIT_AFTER=RANK:BATCHES` makes process RANK exit at once (`os._exit`,
status 75, no clean-up) after writing its BATCHES-th batch.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

from tqdm.auto import tqdm

from .batch_captioning import (
    batch_windows,
    caption_windows,
    expand_media_paths,
    generate_kwargs_of,
    load_captioning_pipeline,
    output_format,
    plot_plans,
    print_summary,
    write_rows,
)
from .record_files import append_records, changed_settings, drop_incomplete_line, read_records, write_atomic

PART_FIELDS = ("path", "caption", "error")
"""What a part file keeps of a record (OT plans are left out)."""
FAULT_ENV = "LAVCAP_CAPTION_EXIT_AFTER"
FAULT_EXIT_STATUS = 75


def part_path(output: str, rank: int, world_size: int) -> str:
    """The part file of process `rank` of `world_size`."""
    return f"{output}.part-{rank:05d}-of-{world_size:05d}"


def settings_path(output: str) -> str:
    """Where the settings of the run that the part files of `output` belong to are recorded."""
    return f"{output}.parts.json"


def part_files(output: str) -> list[str]:
    """The part files of `output` there are, of any process count, sorted."""
    return sorted(glob.glob(glob.escape(output) + ".part-[0-9]*-of-[0-9]*"))


def read_part(path: str) -> list[dict[str, Any]]:
    """The records of a part file; a last line without its newline (a write cut short) is left out.

    Raises:
        ValueError: a complete line that is not a record with a path and a caption or an error.
    """
    return read_records(path, "path", ("caption", "error"))


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What makes two runs' captions interchangeable: the model and the generation settings."""
    model = os.path.abspath(args.model) if os.path.isdir(args.model) else args.model
    return {"model": model, "dtype": args.dtype, **generate_kwargs_of(args)}


def check_settings(output: str, settings: dict[str, Any]) -> None:
    """Refuse to resume the part files of a run with other settings."""
    path = settings_path(output)
    if not os.path.exists(path) or not part_files(output):
        return
    with open(path, encoding="utf-8") as f:
        recorded = json.load(f)
    details = changed_settings(recorded, settings)
    if details:
        raise ValueError(
            f"{output} has part files of an unfinished run with other settings ({details}): rerun that command to "
            "finish it, or start afresh with --no-resume"
        )


def start_run(output: str, settings: dict[str, Any], fresh: bool) -> None:
    """Record `settings` for the part files of `output`; `fresh`: delete the part files of an earlier run first."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    if fresh:
        for path in part_files(output):
            os.remove(path)
    write_atomic(settings_path(output), json.dumps(settings, indent=2) + "\n")


def shard(windows: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Process `rank`'s contiguous run of `windows`; the runs of the N processes cover them once, in order."""
    start, end = len(windows) * rank // world_size, len(windows) * (rank + 1) // world_size
    return list(windows[start:end])


def captioned_paths(output: str) -> set[str]:
    """Files that the part files of `output` hold a caption of."""
    return {r["path"] for path in part_files(output) for r in read_part(path) if "caption" in r}


def merge_parts(output: str, paths: Sequence[str], fmt: str) -> tuple[int, list[tuple[str, str]]]:
    """Write the captions of the part files to `output` in the order of `paths`, then remove the parts.

    Returns (captioned files, [(path, reason)] of the files that could not be read).

    Raises:
        RuntimeError: a file of `paths` that no part file has a record of (the parts are kept).
    """
    captions: dict[str, str] = {}
    errors: dict[str, str] = {}
    for part in part_files(output):
        for record in read_part(part):
            if "caption" in record:
                captions.setdefault(record["path"], record["caption"])
            else:
                errors[record["path"]] = record["error"]
    lost = [path for path in paths if path not in captions and path not in errors]
    if lost:
        raise RuntimeError(
            f"{len(lost)} file(s) have no record in the part files of {output} (first: {lost[0]}); the parts are "
            "kept: rerun the command to caption them"
        )
    rows = [{"path": path, "caption": captions[path]} for path in paths if path in captions]
    write_atomic(output, _rows_text(rows, fmt))
    for part in part_files(output):
        os.remove(part)
    if os.path.exists(settings_path(output)):
        os.remove(settings_path(output))
    return len(rows), [(path, errors[path]) for path in paths if path not in captions]


def _rows_text(rows: list[dict[str, Any]], fmt: str) -> str:
    import io

    buffer = io.StringIO(newline="")
    write_rows(rows, buffer, fmt)
    return buffer.getvalue()


def fault_after(variable: str = FAULT_ENV) -> tuple[int, int] | None:
    """(rank, batches) of a fault-injection variable set to `RANK:BATCHES`, or None when unset."""
    value = os.environ.get(variable)
    if not value:
        return None
    rank, batches = value.split(":")
    return int(rank), int(batches)


def runs_on_cpu(device: str | None) -> bool:
    """Whether this process computes on the CPU (`accelerate.PartialState(cpu=...)`): `--device cpu`, accelerate's
    `--cpu`, or no device asked for and no GPU."""
    import torch

    forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return forced or (device or "").startswith("cpu") or (device is None and not torch.cuda.is_available())


def caption_corpus(args: argparse.Namespace) -> int:
    """`lavcap caption ... --output FILE` in this process, one of `accelerate launch`'s N; returns the exit code
    (0 when at least one file was captioned), the same on every process."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState(cpu=runs_on_cpu(args.device))
    rank, world_size = state.process_index, state.num_processes
    paths, missing = expand_media_paths(args.paths)
    output, settings = args.output, run_settings(args)
    if not args.no_resume:
        check_settings(output, settings)
    state.wait_for_everyone()
    if state.is_main_process:
        start_run(output, settings, fresh=args.no_resume)
    state.wait_for_everyone()
    own_part = part_path(output, rank, world_size)
    drop_incomplete_line(own_part)
    done = captioned_paths(output)
    state.wait_for_everyone()  # everyone has read the parts before anyone appends to them

    windows = [
        [i for i in window if paths[i] not in done]
        for window in shard(batch_windows(len(paths), args.batch_size), rank, world_size)
    ]
    pending = [window for window in windows if window]
    resumed = sum(path in done for path in paths)
    _caption_pending(args, state, paths, pending, own_part, resumed)

    state.wait_for_everyone()
    code = [None]
    if state.is_main_process:
        captioned, failures = merge_parts(output, paths, output_format(output, args.format))
        print_summary(captioned, missing + failures, resumed)
        code = [0 if captioned else 1]
    if world_size > 1:
        broadcast_object_list(code)
    return code[0]


def _caption_pending(
    args: argparse.Namespace,
    state: Any,
    paths: list[str],
    pending: list[list[int]],
    own_part: str,
    resumed: int,
) -> None:
    """Caption this process's `pending` windows into `own_part`; the main process shows everyone's progress."""
    from accelerate.utils import gather_object

    distributed = state.num_processes > 1
    # Every process takes part in the same number of progress gathers, however uneven the shards.
    steps = max(gather_object([len(pending)])) if distributed else len(pending)
    fault = fault_after()
    bar = tqdm(
        total=len(paths),
        initial=resumed,
        desc="captioning",
        unit="clip",
        disable=args.quiet or not state.is_main_process,
    )
    with open(own_part, "a", encoding="utf-8") as part, bar:
        for step, records in enumerate(_window_records(args, state, paths, pending, steps)):
            if records:
                append_records(part, [{k: r[k] for k in PART_FIELDS if k in r} for r in records])
                if args.plot_ot:
                    plot_plans([r for r in records if "caption" in r], args.plot_ot)
                if fault == (state.process_index, step + 1):
                    os._exit(FAULT_EXIT_STATUS)
            counts = gather_object([len(records)]) if distributed else [len(records)]
            bar.update(sum(counts))


def _window_records(
    args: argparse.Namespace, state: Any, paths: list[str], pending: list[list[int]], steps: int
) -> Iterator[list[dict[str, Any]]]:
    """The records of each pending window, then empty lists up to `steps` items."""
    if pending:
        device = args.device or (str(state.device) if state.num_processes > 1 else None)
        pipe = load_captioning_pipeline(args.model, device, args.dtype, args.trust_remote_code)
        yield from caption_windows(
            pipe,
            paths,
            pending,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            return_ot_plan=bool(args.plot_ot),
            **generate_kwargs_of(args),
        )
    for _ in range(steps - len(pending)):
        yield []
