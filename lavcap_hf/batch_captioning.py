"""Caption many media files: expand folders and globs, decode each file, report the bad ones, batch the rest."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from .media import MEDIA_EXTENSIONS, load_media
from .pipeline_lavcap import AudioVisualCaptioningPipeline


@dataclass
class CaptioningReport:
    """Captions of the files that could be read, and the reason for each file that could not."""

    captions: list[dict[str, Any]] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)


def expand_media_paths(patterns: Iterable[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Files named by paths, folders (recursively, media extensions only) and glob patterns, in a stable order.

    Returns (files, failures) where failures are (pattern, reason) for patterns that name nothing.
    """
    files: list[str] = []
    failures: list[tuple[str, str]] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = [
                os.path.join(root, name)
                for root, _, names in os.walk(pattern)
                for name in names
                if os.path.splitext(name)[1].lower() in MEDIA_EXTENSIONS
            ]
            if not found:
                failures.append((pattern, "folder holds no media files"))
            files.extend(sorted(found))
        elif os.path.exists(pattern):
            files.append(pattern)
        else:
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                failures.append((pattern, "file not found"))
            files.extend(m for m in matches if os.path.isfile(m))
    return list(dict.fromkeys(files)), failures


def _decoded_inputs(
    pipe: AudioVisualCaptioningPipeline, paths: list[str], report: CaptioningReport
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, pipeline input dict) per readable file; unreadable files go to `report.failures`."""
    processor = pipe.processor
    extractor = processor.feature_extractor
    for path in paths:
        try:
            media = load_media(
                path,
                sampling_rate=extractor.sampling_rate,
                num_frames=extractor.num_frames,
                need_audio=pipe.model.config.uses_audio,
                # Not the video placeholder count: channel concatenation and cross-attention use the frames
                # without giving them tokens of their own.
                need_frames=pipe.model.config.uses_visual,
            )
        except ValueError as error:
            report.failures.append((path, str(error)))
            continue
        inputs = {"audio": media.audio, "sampling_rate": media.sampling_rate}
        if media.frames is not None:
            inputs["frames"] = media.frames
        yield path, inputs


def caption_files(
    pipe: AudioVisualCaptioningPipeline,
    paths: list[str],
    batch_size: int = 8,
    return_ot_plan: bool = False,
    progress: bool = True,
    **generate_kwargs: Any,
) -> CaptioningReport:
    """Caption `paths` in batches; a file that cannot be read is reported and the others are captioned."""
    report = CaptioningReport()
    batch: list[tuple[str, dict[str, Any]]] = []
    bar = tqdm(total=len(paths), desc="captioning", unit="clip", disable=not progress)

    def flush() -> None:
        outputs = pipe(
            [inputs for _, inputs in batch],
            batch_size=batch_size,
            return_ot_plan=return_ot_plan,
            **generate_kwargs,
        )
        for (path, _), output in zip(batch, outputs, strict=True):
            report.captions.append({"path": path, **output[0]})
        bar.update(len(batch))
        batch.clear()

    for item in _decoded_inputs(pipe, paths, report):
        batch.append(item)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    bar.update(len(report.failures))
    bar.close()
    return report
