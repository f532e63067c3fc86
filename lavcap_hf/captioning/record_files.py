"""Files that survive a crash: JSON-lines record files appended batch by batch, and files written whole or not at all.

A record file holds one JSON object per line. Each batch is appended and forced to disk before the next starts, so a
killed process loses at most the batch in flight and leaves at most one line without its newline at the end; readers
ignore that line and a resumed writer cuts it off first. Used by `lavcap evaluate` (predictions) and by
`lavcap caption --output` (part files of each process).
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import IO, Any


def read_records(path: str | os.PathLike, key: str, one_of: Collection[str]) -> list[dict[str, Any]]:
    """The records of a JSON-lines file, in file order; a last line without its newline (a write cut short) and
    blank lines are left out.

    Raises:
        ValueError: naming the file and line of a complete line that is not a JSON object with `key` and at least one
            of `one_of`.
    """
    data = Path(path).read_bytes()
    complete = data[: data.rfind(b"\n") + 1].decode("utf-8")
    records = []
    for number, line in enumerate(complete.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {number} is not valid JSON ({error})") from error
        if not isinstance(record, dict) or key not in record or not set(one_of) & set(record):
            wanted = " or ".join(repr(name) for name in one_of)
            raise ValueError(f"{path}: line {number} is not a record with {key!r} and {wanted}")
        records.append(record)
    return records


def drop_incomplete_line(path: str | os.PathLike) -> None:
    """Cut the file after its last newline: remove what a crash left of a line being written (no file: nothing)."""
    if not os.path.exists(path):
        return
    data = Path(path).read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        os.truncate(path, end)


def append_records(stream: IO[str], records: Iterable[dict[str, Any]]) -> None:
    """Append one JSON line per record to `stream` and make it durable (flush and fsync) before returning."""
    stream.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    stream.flush()
    os.fsync(stream.fileno())


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a whole file or nothing: a temporary file in the same folder, forced to disk, then renamed over `path`."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", newline="", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def changed_settings(recorded: dict[str, Any], settings: dict[str, Any]) -> str:
    """`key: old -> new` for every setting that differs from the recorded run's, comma separated ('' when none); a
    setting that only one of them has counts as None in the other."""
    keys = [*settings, *(k for k in recorded if k not in settings)]
    changed = {k: (recorded.get(k), settings.get(k)) for k in keys if recorded.get(k) != settings.get(k)}
    return ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
