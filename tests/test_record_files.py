"""Crash-safe record files (`lavcap_hf/captioning/record_files.py`), shared by `lavcap evaluate` and `lavcap caption --output`:
a line cut short by a crash is ignored and then removed, a bad complete line is named, a whole-file write never
leaves half a file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lavcap_hf.captioning.record_files import (
    append_records,
    changed_settings,
    drop_incomplete_line,
    read_records,
    write_atomic,
)

# No function of a package the stacks pin differently runs here (held to it, tests/conftest.py): one stack is enough.
pytestmark = pytest.mark.stack_independent

RECORDS = [{"id": "a", "prediction": "a dog barks"}, {"id": "b", "error": "unreadable"}]


def test_append_then_read_back_and_a_cut_line_is_ignored_then_dropped(tmp_path: Path) -> None:
    path = tmp_path / "predictions.jsonl"
    with open(path, "a", encoding="utf-8") as stream:
        append_records(stream, RECORDS)
    with open(path, "a", encoding="utf-8") as stream:
        stream.write('{"id": "c", "predic')  # what a killed writer leaves
    assert read_records(path, "id", ("prediction", "error")) == RECORDS
    drop_incomplete_line(path)
    assert path.read_text(encoding="utf-8") == "".join(json.dumps(r) + "\n" for r in RECORDS)
    drop_incomplete_line(tmp_path / "absent.jsonl")  # nothing to cut, no error


def test_non_ascii_captions_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "part"
    record = {"path": "é.mp4", "caption": "un chien aboie — fort"}
    with open(path, "a", encoding="utf-8") as stream:
        append_records(stream, [record])
    assert read_records(path, "path", ("caption", "error")) == [record]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("not json", "line 2 is not valid JSON"),
        ('{"id": "x"}', "line 2 is not a record with 'id' and 'prediction'"),
    ],
)
def test_a_bad_complete_line_is_named(line: str, problem: str, tmp_path: Path) -> None:
    path = tmp_path / "predictions.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"predictions.jsonl: {problem}"):
        read_records(path, "id", ("prediction", "error"))


def test_write_atomic_replaces_whole_or_leaves_the_old_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "scores.json"
    write_atomic(path, "old\n")
    write_atomic(path, "new\n")
    assert path.read_text(encoding="utf-8") == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["scores.json"]

    def fail(*args) -> None:  # the rename fails, as on a full or read-only disk
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, "half")
    assert path.read_text(encoding="utf-8") == "new\n"


def test_changed_settings_lists_each_difference() -> None:
    recorded = {"model": "m", "num_beams": 1}
    assert changed_settings(recorded, {"model": "m", "num_beams": 1}) == ""
    assert changed_settings(recorded, {"model": "m", "num_beams": 2, "seed": 0}) == (
        "num_beams: 1 -> 2, seed: None -> 0"
    )


def test_changed_settings_lists_a_setting_the_new_run_no_longer_has() -> None:
    """A run recorded with a setting (say the model's generation_config had `repetition_penalty`) differs from one
    that has none."""
    assert changed_settings({"num_beams": 4, "repetition_penalty": 1.3}, {"num_beams": 4}) == (
        "repetition_penalty: 1.3 -> None"
    )
