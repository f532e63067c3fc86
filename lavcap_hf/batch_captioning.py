"""Caption many media files: expand folders and globs, decode each file, report the bad ones, batch the rest."""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys
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


def load_captioning_pipeline(
    model: str, device: str | None = None, dtype: str = "float32", trust_remote_code: bool = False
) -> AudioVisualCaptioningPipeline:
    """An `AudioVisualCaptioningPipeline` for a saved model folder or Hub id (model and processor)."""
    import torch

    from .modeling_lavcap import LavCapForConditionalGeneration
    from .processing_lavcap import LavCapProcessor

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    network = LavCapForConditionalGeneration.from_pretrained(model, trust_remote_code=trust_remote_code)
    network = network.to(device=device, dtype=getattr(torch, dtype)).eval()
    processor = LavCapProcessor.from_pretrained(model)
    return AudioVisualCaptioningPipeline(model=network, processor=processor, device=torch.device(device))


# `lavcap caption`


def _write_rows(rows: list[dict[str, Any]], output: str | None, fmt: str | None) -> None:
    fmt = fmt or ("csv" if output and output.endswith(".csv") else "jsonl")
    stream = open(output, "w", newline="", encoding="utf-8") if output else sys.stdout
    try:
        if fmt == "csv":
            writer = csv.DictWriter(stream, fieldnames=["path", "caption"])
            writer.writeheader()
            writer.writerows({"path": r["path"], "caption": r["caption"]} for r in rows)
        else:
            for row in rows:
                stream.write(json.dumps({"path": row["path"], "caption": row["caption"]}) + "\n")
    finally:
        if output:
            stream.close()


def run_caption(args: argparse.Namespace) -> int:
    paths, failures = expand_media_paths(args.paths)
    report = None
    if paths:
        pipe = load_captioning_pipeline(args.model, args.device, args.dtype, args.trust_remote_code)
        report = caption_files(
            pipe,
            paths,
            batch_size=args.batch_size,
            return_ot_plan=bool(args.plot_ot),
            progress=not args.quiet,
            num_beams=args.num_beams,
            max_new_tokens=args.max_new_tokens,
        )
        failures += report.failures
        _write_rows(report.captions, args.output, args.format)
        if args.plot_ot:
            _plot_plans(report.captions, args.plot_ot)
    captioned = len(report.captions) if report else 0
    if failures:
        print(f"\n{len(failures)} file(s) could not be captioned:", file=sys.stderr)
        for path, reason in failures:
            print(f"  {path}: {reason.removeprefix(path + ': ')}", file=sys.stderr)
    print(f"captioned {captioned} of {captioned + len(failures)} file(s)", file=sys.stderr)
    return 0 if captioned else 1


def _plot_plans(rows: list[dict[str, Any]], folder: str) -> None:
    from .plotting import plot_ot_plan

    os.makedirs(folder, exist_ok=True)
    for row in rows:
        name = os.path.splitext(os.path.basename(row["path"]))[0]
        plot_ot_plan(row["ot_plan"], os.path.join(folder, f"{name}.png"), title=row["caption"])
