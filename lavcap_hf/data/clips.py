"""Captioning data for training and evaluation: clip lists from three sources (the torch Dataset is in `dataset.py`).

Sources, each turned into a sequence of [`Clip`]:
- the AudioCaps layout released with LAVCap (`load_audiocaps`): `<root>/{split}.json` entries with `youtube_id`,
  `caption`, `audio_path`, `video_path`; waveforms in `<root>/{split}/waveforms/`, frames in
  `<root>/{split}/frames/`, precomputed CLIP features `<root>/visual_feature/{split}/<audio name>.npy` (20, 768),
  and `<root>/test_coco.json` with the 5 reference captions of every test clip;
- a `datasets.Dataset` with media path or bytes columns and a caption column (`DatasetClips`);
- a CSV / JSONL / JSON manifest with `video_path,caption` rows (`load_manifest`).

[`LavCapDataset`] decodes a clip's media in `__getitem__`, so that DataLoader workers do it, never the training step.
Training uses one example per caption; evaluation uses one example per clip with all its references (`group_clips`).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

MediaSource = str | os.PathLike | bytes
"""A media file: a path, or the file's bytes."""

MANIFEST_EXTENSIONS = (".csv", ".jsonl", ".json")
DEFAULT_COLUMNS = {
    "video": "video_path",
    "audio": "audio_path",
    "caption": "caption",
    "id": "id",
    "video_embeds": "video_embeds_path",
}
"""Column names of manifests and datasets, by role."""


@dataclass(frozen=True, eq=False)
class Clip:
    """One captioned (or to-be-captioned) clip.

    Attributes:
        id: identifier of the clip (AudioCaps: the YouTube id); clips that share it are one clip in evaluation.
        caption: the training target, or None for a clip without captions.
        references: every reference caption of the clip (evaluation).
        video: video file (path or bytes), a folder of frame images, or frames in memory, uint8 RGB
            (num_frames, H, W, 3); the audio comes from a video file unless `audio` is set.
        audio: audio file (path or bytes), or a waveform array (samples,) with `sampling_rate`.
        sampling_rate: rate of an in-memory `audio` array in Hz.
        video_embeds: precomputed CLIP image embeddings (num_frames, dim): a `.npy` path or an array.
    """

    id: str
    caption: str | None = None
    references: tuple[str, ...] = ()
    video: MediaSource | np.ndarray | None = None
    audio: MediaSource | np.ndarray | None = None
    sampling_rate: int | None = None
    video_embeds: str | os.PathLike | np.ndarray | None = None


def group_clips(clips: Sequence[Clip]) -> list[Clip]:
    """One clip per id, in order of first appearance, with the references (and captions) of all its entries.

    AudioCaps lists a clip once per caption; evaluation scores each clip once against all of them.
    """
    grouped: dict[str, Clip] = {}
    for clip in clips:
        texts = clip.references or ((clip.caption,) if clip.caption is not None else ())
        if clip.id not in grouped:
            grouped[clip.id] = replace(clip, references=tuple(dict.fromkeys(texts)))
        else:
            first = grouped[clip.id]
            grouped[clip.id] = replace(first, references=tuple(dict.fromkeys(first.references + texts)))
    return list(grouped.values())


# -- AudioCaps layout released with LAVCap ------------------------------------------------------------------------

AUDIOCAPS_KEYS = ("caption", "audio_path", "video_path")
"""Keys every AudioCaps entry needs; `youtube_id` (the clip id, which test_coco.json uses) defaults to the audio name."""


def load_audiocaps(
    root: str | os.PathLike,
    split: str = "train",
    visual_features_dir: str | os.PathLike | None = None,
    use_visual_features: bool = True,
) -> list[Clip]:
    """Clips of one split of the AudioCaps layout released with LAVCap, one per entry of `<root>/<split>.json`.

    Args:
        root: the folder holding `<split>.json`, `<split>/waveforms/`, `<split>/frames/`, `visual_feature/` and
            `test_coco.json`.
        split: "train", "val" or "test".
        visual_features_dir: folder of the split's `.npy` CLIP features (default `<root>/visual_feature/<split>`).
        use_visual_features: point every clip at its `.npy` features (named after the audio file); otherwise the
            frames under `<split>/frames/` are decoded.

    Returns:
        One [`Clip`] per json entry, `id` = its `youtube_id` (else the audio file's name). Where `test_coco.json`
        lists captions for a clip (the test split: 5 each), they are the clip's `references`; otherwise
        `group_clips` gathers its entries' captions.
    """
    root = Path(root)
    manifest = root / f"{split}.json"
    if not manifest.is_file():
        raise ValueError(
            f"{manifest}: not found; the AudioCaps layout has <root>/<split>.json, <root>/<split>/waveforms/ and "
            "<root>/visual_feature/<split>/"
        )
    entries = _read_json(manifest)
    if not isinstance(entries, list):
        raise ValueError(f"{manifest}: expected a list of entries, got {type(entries).__name__}")
    features = (
        Path(visual_features_dir) if visual_features_dir is not None else root / "visual_feature" / split
    )
    coco_references = _coco_references(root / "test_coco.json")
    clips = []
    for index, entry in enumerate(entries):
        missing = [key for key in AUDIOCAPS_KEYS if key not in entry]
        if missing:
            raise ValueError(f"{manifest}: entry {index} lacks {missing}")
        audio = root / split / "waveforms" / entry["audio_path"]
        youtube_id = str(entry.get("youtube_id", audio.stem))
        clips.append(
            Clip(
                id=youtube_id,
                caption=entry["caption"],
                references=tuple(coco_references.get(youtube_id, ())),
                video=root / split / "frames" / entry["video_path"],
                audio=audio,
                video_embeds=features / (audio.stem + ".npy") if use_visual_features else None,
            )
        )
    return clips


def _coco_references(path: Path) -> dict[str, list[str]]:
    """{image_id: [captions]} of a COCO-style caption file (`{"annotations": [{"image_id", "caption"}]}`)."""
    if not path.is_file():
        return {}
    annotations = _read_json(path)
    if not isinstance(annotations, dict) or not isinstance(annotations.get("annotations"), list):
        raise ValueError(f"{path}: expected a COCO caption file with an 'annotations' list")
    references: dict[str, list[str]] = {}
    for item in annotations["annotations"]:
        references.setdefault(str(item["image_id"]), []).append(item["caption"])
    return references


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


# -- CSV / JSONL / JSON manifests -----------------------------------------------------------------------------------


def load_manifest(path: str | os.PathLike, columns: Mapping[str, str] | None = None) -> list[Clip]:
    """Clips listed in a CSV (header row), JSONL (one object per line) or JSON (a list of objects) file.

    Each row needs a video or an audio path; relative paths are relative to the manifest's folder. Optional
    columns: `caption`, `id` (default: the media path as written), a `.npy` of precomputed visual embeddings, and
    `references` (a list, JSON manifests only). `columns` renames them (keys of `DEFAULT_COLUMNS`). Rows sharing an
    id are one clip in `group_clips`.
    """
    names = {**DEFAULT_COLUMNS, **(columns or {})}
    path = Path(path)
    rows = _read_rows(path)
    folder = path.parent
    clips = []
    for number, row in enumerate(rows, start=1):
        video, audio = row.get(names["video"]) or None, row.get(names["audio"]) or None
        if video is None and audio is None:
            raise ValueError(f"{path}: row {number} has neither '{names['video']}' nor '{names['audio']}'")
        embeds = row.get(names["video_embeds"]) or None
        caption = row.get(names["caption"]) or None
        clips.append(
            Clip(
                id=str(row.get(names["id"]) or video or audio),
                caption=caption,
                references=tuple(row.get("references") or ((caption,) if caption else ())),
                video=folder / video if video is not None else None,
                audio=folder / audio if audio is not None else None,
                video_embeds=folder / embeds if embeds is not None else None,
            )
        )
    return clips


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ValueError(f"{path}: manifest not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}: line {number} is not valid JSON ({error})") from error
        return rows
    if suffix == ".json":
        rows = _read_json(path)
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a list of objects")
        return rows
    raise ValueError(f"{path}: unsupported manifest type {suffix!r}; use one of {MANIFEST_EXTENSIONS}")


# -- datasets.Dataset ---------------------------------------------------------------------------------------------


class DatasetClips(Sequence[Clip]):
    """A `datasets.Dataset` seen as a sequence of [`Clip`], row by row (nothing is loaded up front).

    Media columns hold paths, bytes, or the `{"path", "bytes"}` dicts of `Audio(decode=False)` /
    `Video(decode=False)` features; an audio column may also hold decoded `{"array", "sampling_rate"}` dicts.

    Args:
        dataset: the rows.
        video_column: video (or frame folder) column; None when there is none.
        audio_column: audio column; None takes the audio from the video.
        caption_column: caption column (a string, or a list of references).
        id_column: id column; None uses the row number.
        video_embeds_column: precomputed visual embeddings (num_frames, dim) or `.npy` paths; None when absent.
    """

    def __init__(
        self,
        dataset: Any,
        video_column: str | None = "video",
        audio_column: str | None = None,
        caption_column: str | None = "caption",
        id_column: str | None = None,
        video_embeds_column: str | None = None,
    ) -> None:
        columns = [video_column, audio_column, caption_column, id_column, video_embeds_column]
        missing = [c for c in columns if c is not None and c not in dataset.column_names]
        if missing:
            raise ValueError(
                f"the dataset has no column(s) {missing}; its columns are {dataset.column_names}"
            )
        if video_column is None and audio_column is None:
            raise ValueError("give a video_column or an audio_column")
        self.dataset = dataset
        self.video_column = video_column
        self.audio_column = audio_column
        self.caption_column = caption_column
        self.id_column = id_column
        self.video_embeds_column = video_embeds_column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Clip:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        row = self.dataset[index]
        captions = row[self.caption_column] if self.caption_column is not None else None
        references = tuple(captions) if isinstance(captions, list) else ((captions,) if captions else ())
        audio, rate = self._audio(row)
        return Clip(
            id=str(row[self.id_column]) if self.id_column is not None else str(index),
            caption=references[0] if references else None,
            references=references,
            video=_media_source(row[self.video_column]) if self.video_column is not None else None,
            audio=audio,
            sampling_rate=rate,
            video_embeds=_embeds(row[self.video_embeds_column]) if self.video_embeds_column else None,
        )

    def __iter__(self) -> Iterator[Clip]:
        return (self[i] for i in range(len(self)))

    def _audio(self, row: dict[str, Any]) -> tuple[MediaSource | np.ndarray | None, int | None]:
        if self.audio_column is None:
            return None, None
        value = row[self.audio_column]
        if isinstance(value, dict) and value.get("array") is not None:
            return np.asarray(value["array"], dtype=np.float32), int(value["sampling_rate"])
        return _media_source(value), None


def _media_source(value: Any) -> MediaSource | None:
    if value is None or isinstance(value, (str, bytes, os.PathLike)):
        return value
    if isinstance(value, dict):
        return value.get("bytes") or value.get("path")
    raise ValueError(
        f"unsupported media value of type {type(value).__name__}: use a path, bytes, or a {{'path', 'bytes'}} dict "
        "(cast decoding features with decode=False)"
    )


def _embeds(value: Any) -> str | np.ndarray | None:
    if value is None or isinstance(value, (str, os.PathLike)):
        return value
    return np.asarray(value, dtype=np.float32)


def load_clips(
    source: Any,
    split: str = "train",
    columns: Mapping[str, str] | None = None,
    visual_features_dir: str | os.PathLike | None = None,
    use_visual_features: bool = True,
) -> Sequence[Clip]:
    """Clips from any supported source.

    Args:
        source: a `datasets.Dataset` / `DatasetDict` (its `split`), a folder saved with `save_to_disk`, an AudioCaps
            root (holding `<split>.json`) or a CSV / JSONL / JSON manifest.
        split: split of an AudioCaps root or a `DatasetDict`.
        columns: column names by role (`DEFAULT_COLUMNS` keys) for manifests and datasets; dataset columns that are
            absent are not used.
        visual_features_dir, use_visual_features: see `load_audiocaps`.
    """
    names = {**DEFAULT_COLUMNS, **(columns or {})}
    if hasattr(source, "column_names") and hasattr(source, "__getitem__"):
        dataset = source[split] if isinstance(source.column_names, dict) else source
        present = {
            f"{role}_column": name if name in dataset.column_names else None for role, name in names.items()
        }
        return DatasetClips(dataset, **present)
    path = Path(source)
    if path.is_dir() and (path / f"{split}.json").is_file():
        return load_audiocaps(path, split, visual_features_dir, use_visual_features)
    if path.is_dir() and any((path / name).is_file() for name in ("dataset_dict.json", "dataset_info.json")):
        import datasets

        return load_clips(datasets.load_from_disk(str(path)), split, names)
    if path.is_file() and path.suffix.lower() in MANIFEST_EXTENSIONS:
        return load_manifest(path, names)
    raise ValueError(
        f"{source}: not a dataset source; expected an AudioCaps root with {split}.json, a folder saved by "
        f"datasets' save_to_disk, or a manifest file ({', '.join(MANIFEST_EXTENSIONS)})"
    )


# -- decoding -----------------------------------------------------------------------------------------------------
