"""One resumable run over batch windows, by one process or by the N of `accelerate launch`: `lavcap caption --output`
(`captioning.corpus`) and `lavcap evaluate` (`evaluation.run`) are each such a run.

- **Locked.** The main process holds a `RunLock` next to the output for the whole run: a second run on the same
  output is refused, naming the process (pid, host) that holds it, so two runs never append to the same files. The
  operating system releases the lock of a process that dies, however it dies.
- **Identified.** A JSON file next to the output records the run's identity: whatever changes an output record (the
  model's weights, config and processor (`model_identity`), every generation setting, the batch size, ...). A rerun
  resumes the files of a run with the same identity; other settings, or files that no identity file vouches for,
  are refused before anything is written, with one message from the main process (`RunError`).
- **Sharded.** The items (clips) are cut into fixed batch windows (`batch_windows`); the windows with an item still
  to do are cut into N contiguous runs (`shard`), one per process, so that every batch holds the items a
  one-process run gives it and a rerun generates a window whole, as the first run did.
- **Crash-safe.** Each process appends each window's new records to its own file (`record_files.append_records`,
  forced to disk): the main process to the output itself where the output is the record file (evaluation), every
  other process to a part file next to it, `OUTPUT.part-0000r-of-0000N`. A killed process loses at most the window
  in flight; a rerun drops a last line cut short and skips the items the files hold, with any number of processes.
- **Merged.** When all are done, the main process merges the records into split order, writes the result (whole,
  then renamed over the output) and removes the parts: the output is byte for byte that of one process.

Every process makes the same collective calls in the same order, whatever its share (none included).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from .record_files import append_records, changed_settings, drop_incomplete_line, read_records, write_atomic

if TYPE_CHECKING:
    from accelerate import PartialState

    from ..model.modeling_lavcap import LavCapForConditionalGeneration
    from ..model.processing_lavcap import LavCapProcessor


class RunError(ValueError):
    """A run that stops with a message for its user (refused settings, a held lock, nothing to do): raised on every
    process; `main_process` says whether this one is the main process, the one that reports it."""

    def __init__(self, message: str, main_process: bool = True) -> None:
        super().__init__(message)
        self.main_process = main_process


# -- processes -----------------------------------------------------------------------------------------------------


class Processes:
    """This process among the run's processes (an `accelerate.PartialState`; None: this process alone) and the
    collective calls of a run, through accelerate's `gather_object` / `broadcast_object_list`."""

    def __init__(self, state: PartialState | None) -> None:
        self.state = state if state is not None and state.num_processes > 1 else None
        self.rank = self.state.process_index if self.state else 0
        self.count = self.state.num_processes if self.state else 1
        self.is_main = self.rank == 0

    def wait_for_everyone(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def gather(self, value: Any) -> list[Any]:
        """`value` of every process, in rank order."""
        if self.state is None:
            return [value]
        from accelerate.utils import gather_object

        return gather_object([value])

    def share(self, value: Any) -> Any:
        """The main process's `value`, on every process."""
        if self.state is None:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value])[0]


def batch_windows(count: int, batch_size: int) -> list[list[int]]:
    """Indices 0..count-1 cut into consecutive windows of `batch_size`: the batches of a run, whoever runs them."""
    return [list(range(start, min(start + batch_size, count))) for start in range(0, count, batch_size)]


def shard(windows: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Process `rank`'s contiguous run of `windows`; the runs of the N processes cover them once, in order.

    `PartialState.split_between_processes` gives the extra windows to the first processes; here they go to the last
    ones, since the main process also merges, scores and reports.
    """
    start, end = len(windows) * rank // world_size, len(windows) * (rank + 1) // world_size
    return list(windows[start:end])


# -- part files ----------------------------------------------------------------------------------------------------


def part_path(output: str | os.PathLike, rank: int, world_size: int) -> str:
    """The part file of process `rank` of `world_size`."""
    return f"{os.fspath(output)}.part-{rank:05d}-of-{world_size:05d}"


def part_files(output: str | os.PathLike) -> list[str]:
    """The part files of `output` there are, of any process count, sorted."""
    return sorted(glob.glob(glob.escape(os.fspath(output)) + ".part-[0-9]*-of-[0-9]*"))


@dataclass(frozen=True)
class RecordKind:
    """What the records of a run look like: `key` names the item, each record has `result` or `"error"`;
    `retry_errors`: an item recorded with an error is done again by a rerun (a file may have become readable)."""

    key: str
    result: str
    retry_errors: bool
    noun: str

    def read(self, path: str | os.PathLike) -> list[dict[str, Any]]:
        """The records of a record file (a last line cut short by a crash is left out)."""
        return read_records(path, self.key, (self.result, "error"))

    def done(self, record: dict[str, Any]) -> bool:
        return not (self.retry_errors and "error" in record)


def recorded(target: Path, kind: RecordKind, target_is_records: bool) -> dict[str, dict[str, Any]]:
    """{key: record} of `target` (when it is a record file) and its part files: an item's first done record, else
    its last record."""
    records: dict[str, dict[str, Any]] = {}
    parts = [Path(p) for p in part_files(target)]
    for file in [target, *parts] if target_is_records and target.exists() else parts:
        for record in kind.read(file):
            earlier = records.get(record[kind.key])
            if earlier is None or not kind.done(earlier):
                records[record[kind.key]] = record
    return records


def merged_records(
    target: Path, keys: Sequence[str], kind: RecordKind, target_is_records: bool
) -> list[dict[str, Any]]:
    """The record of each item of `keys`, in that order, from `target` and its part files.

    Raises:
        RuntimeError: an item that no file has a record of (the files are left as they are).
    """
    records = recorded(target, kind, target_is_records)
    lost = [key for key in keys if key not in records]
    if lost:
        raise RuntimeError(
            f"{len(lost)} {kind.noun}(s) have no record in the part files of {target} (first: {lost[0]}); the parts "
            "are kept: rerun the command to do them"
        )
    return [records[key] for key in keys]


def remove_parts(target: str | os.PathLike) -> None:
    for part in part_files(target):
        os.remove(part)


# -- lock ----------------------------------------------------------------------------------------------------------


class RunLock:
    """An exclusive `flock` on `path`, which holds who took it (pid, host, start, command).

    The kernel releases the lock when its process dies, so a crashed holder leaves no lock behind (its file, with
    stale content, is simply taken over). `release` removes the file while still holding the lock; `acquire` checks
    that the file it locked is still the one at `path`, so a run that opened the file just before its removal does
    not hold a lock on a file nobody else sees.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._file: Any = None

    def acquire(self) -> str | None:
        """Take the lock: None, or a description of the process that holds it."""
        import fcntl  # POSIX only; imported here so that the rest of the package imports everywhere

        while True:
            file = open(self.path, "a+", encoding="utf-8")
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.seek(0)
                holder = _describe_holder(file.read())
                file.close()
                return holder
            if _same_file(file, self.path):
                break
            file.close()
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(sys.argv),
        }
        file.seek(0)
        file.truncate()
        file.write(json.dumps(holder) + "\n")
        file.flush()
        self._file = file
        return None

    def release(self) -> None:
        if self._file is not None:
            self.path.unlink(missing_ok=True)
            self._file.close()
            self._file = None


def _same_file(file: Any, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(file.fileno()).st_ino
    except FileNotFoundError:
        return False


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return (
            f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}: {holder['command']}"
        )
    except (ValueError, KeyError, TypeError):
        return "a process that has not yet said which"


# -- identity ------------------------------------------------------------------------------------------------------

SAMPLES_PER_TENSOR = 256
"""Values read from each weight tensor by `weights_fingerprint`."""


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of every tensor of `model.state_dict()`: name, dtype, shape and `SAMPLES_PER_TENSOR` evenly spaced
    values, as stored in memory (the dtype the model runs in).

    Reads a few kB of a 14 GB model, yet differs for any tensor that training changed: a merged LoRA update, a
    trained projector or new BatchNorm statistics change every value of their tensor, also when a file of the same
    size and header (same shapes, same dtypes) replaces the model's file. A change confined to a few values of one
    tensor (say one embedding row) can go unseen.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        count = min(SAMPLES_PER_TENSOR, flat.numel())
        positions = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)
        values = flat[positions].contiguous().cpu().view(torch.uint8).numpy().tobytes()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(values)
    return digest.hexdigest()


def _without_volatile(value: Any) -> Any:
    """A config dict without what differs between loads of the same model (paths, versions, dtypes)."""
    if isinstance(value, dict):
        return {
            str(k): _without_volatile(v)
            for k, v in value.items()
            if not str(k).startswith("_") and str(k) not in ("transformers_version", "torch_dtype", "dtype")
        }
    if isinstance(value, (list, tuple)):
        return [_without_volatile(v) for v in value]
    return value


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def processor_fingerprint(processor: LavCapProcessor) -> str:
    """SHA-256 of what the processor makes of a clip and of generated ids: the feature extractor's settings, the
    chat template(s), and the whole tokenizer (its `tokenizer.json` where it has one, else its vocabulary)."""
    tokenizer = processor.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return _sha256_json(
        {
            "feature_extractor": _without_volatile(processor.feature_extractor.to_dict()),
            "chat_template": processor.chat_template,
            "tokenizer": backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()),
            "special_tokens": {str(k): str(v) for k, v in tokenizer.special_tokens_map.items()},
        }
    )


def model_identity(model: LavCapForConditionalGeneration, processor: LavCapProcessor) -> dict[str, Any]:
    """What of a loaded model and its processor changes a caption: `weights` (`weights_fingerprint`), `config`
    (SHA-256 of the model config without paths and versions), `processor` (`processor_fingerprint`), the dtype and
    the kind of device it computes on (a CPU and a GPU round differently, which can change a beam). `model` is where
    it was loaded from, for the reader."""
    name = str(getattr(model, "name_or_path", ""))
    return {
        "model": os.path.realpath(name) if os.path.isdir(name) else name,
        "weights": weights_fingerprint(model),
        "config": _sha256_json(_without_volatile(model.config.to_dict())),
        "processor": processor_fingerprint(processor),
        "dtype": str(model.dtype),
        "device": model.device.type,
    }


# -- the run -------------------------------------------------------------------------------------------------------


class ShardedRun:
    """One run on an output: lock, identity, resumable sharded windows, merge (module docstring).

    Args:
        processes: this process among the run's.
        output: what the run writes (named in messages).
        lock_path, identity_path: where the lock and the identity of the run on `output` live.
        kind: what its records look like.
        progress: show a progress bar (on the main process).
    """

    def __init__(
        self,
        processes: Processes,
        output: str | os.PathLike,
        lock_path: str | os.PathLike,
        identity_path: str | os.PathLike,
        kind: RecordKind,
        progress: bool = True,
    ) -> None:
        self.processes = processes
        self.output = os.fspath(output)
        self.lock = RunLock(lock_path)
        self.identity_path = Path(identity_path)
        self.kind = kind
        self.progress = progress and processes.is_main

    def __enter__(self) -> ShardedRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.release()

    def start(
        self,
        identity: dict[str, Any],
        resume: bool,
        records: Sequence[Path],
        others: Sequence[Path] = (),
    ) -> None:
        """Lock the output and record `identity` (main process), after checking that the record files there can be
        resumed (`resume`), or after deleting them and `others` (not `resume`).

        Raises:
            RunError: on every process, when the lock is held or the files belong to another run.
        """
        problem = None
        if self.processes.is_main:
            holder = self.lock.acquire()
            if holder is not None:
                problem = f"{self.output} is in use by another run ({holder}): wait for it to end, or stop it"
            else:
                problem = self._check(json.loads(json.dumps(identity)), resume, records)
                if problem is None:
                    self._record(identity, resume, [*records, *others])
                else:
                    self.lock.release()
        problem = self.processes.share(problem)
        if problem is not None:
            raise RunError(problem, self.processes.is_main)

    def _check(self, identity: dict[str, Any], resume: bool, records: Sequence[Path]) -> str | None:
        if not resume or not records:
            return None
        if not self.identity_path.is_file():
            return (
                f"{self.output} holds {', '.join(p.name for p in records)} but no {self.identity_path.name}: they "
                "are not from a run that can be resumed; use another output, or start afresh with --no-resume"
            )
        recorded_identity = json.loads(self.identity_path.read_text(encoding="utf-8"))
        details = changed_settings(recorded_identity, identity)
        if not details:
            return None
        return (
            f"{self.output} holds a run with other settings ({details}): rerun that run's command to finish it, "
            "use another output, or start afresh with --no-resume (resume=False in Python)"
        )

    def _record(self, identity: dict[str, Any], resume: bool, files: Sequence[Path]) -> None:
        self.identity_path.parent.mkdir(parents=True, exist_ok=True)
        if not resume:
            for path in files:
                path.unlink(missing_ok=True)
        write_atomic(self.identity_path, json.dumps(identity, indent=2, ensure_ascii=False) + "\n")

    def forget(self) -> None:
        """Remove the identity file (main process): the run is over and its output needs no resuming."""
        if self.processes.is_main:
            self.identity_path.unlink(missing_ok=True)

    def run(
        self,
        target: Path,
        keys: Sequence[str],
        batch_size: int,
        records_of: Callable[[list[list[int]], set[str]], Iterable[list[dict[str, Any]]]],
        write: Callable[[list[dict[str, Any]]], None],
        main_appends_to_target: bool,
        description: str,
    ) -> list[dict[str, Any]]:
        """Do the windows of `keys` that the files of `target` lack, merge, `write` the result; returns every
        item's record in `keys` order, on every process.

        Args:
            target: the output of this pass; its part files lie next to it.
            keys: the items, in output order.
            batch_size: items per window.
            records_of: `(windows, done) -> one list of records per window, in window order`: a record of each
                item of the window that is not in `done` (those in `done` may be left out).
            write: `write(records)` on the main process, before the parts are removed: write the output.
            main_appends_to_target: the main process appends to `target` itself (a record file), not to a part.
            description: label of the progress bar.
        """
        processes, kind = self.processes, self.kind
        own = (
            target
            if processes.is_main and main_appends_to_target
            else Path(part_path(target, processes.rank, processes.count))
        )
        drop_incomplete_line(own)
        existing = recorded(target, kind, main_appends_to_target)
        done = {key for key, record in existing.items() if kind.done(record)}
        processes.wait_for_everyone()  # everyone has read the records before anyone appends
        pending = [w for w in batch_windows(len(keys), batch_size) if any(keys[i] not in done for i in w)]
        mine = shard(pending, processes.rank, processes.count)
        bar = tqdm(
            total=len(keys),
            initial=sum(key in done for key in keys),
            desc=description,
            unit=kind.noun,
            disable=not self.progress,
        )
        # As many steps as the longest share, each with one progress gather, however uneven the shares.
        steps = max(processes.gather(len(mine)))
        with open(own, "a", encoding="utf-8") as file, bar:
            windows = iter(records_of(mine, set(done)) if mine else ())
            for _ in range(steps):
                new = [r for r in next(windows, []) if r[kind.key] not in done]
                if new:
                    append_records(file, new)
                    done.update(r[kind.key] for r in new if kind.done(r))
                bar.update(sum(processes.gather(len(new))))
        processes.wait_for_everyone()
        merged = None
        if processes.is_main:
            merged = merged_records(target, keys, kind, main_appends_to_target)
            write(merged)
            remove_parts(target)
        return processes.share(merged)
