"""Caption many media files: expand folders and globs, decode each file, report the bad ones, batch the rest."""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers.pipelines.base import no_collate_fn, pad_collate_fn
from transformers.pipelines.pt_utils import PipelinePackIterator

from ..model.configuration_lavcap import LavCapConfig
from ..model.media_decoding import MEDIA_EXTENSIONS, MediaError, load_media
from ..model.pipeline_lavcap import AudioVisualCaptioningPipeline
from .sharded_run import batch_windows

NO_VISUAL = "no_visual"
"""Record field of a file captioned with the visual input absent (an audio-only file, audio-visual model)."""


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


def no_visual_embeds(config: LavCapConfig) -> np.ndarray:
    """The visual input of a clip that has none: every frame embedding zero, float32 (num_frames,
    visual_embed_dim), given as `video_embeds` in place of the vision tower's output (as `lavcap evaluate
    --modality-test` suppresses the visual input)."""
    return np.zeros((config.num_frames, config.visual_embed_dim), dtype=np.float32)


class FeaturisedWindows(torch.utils.data.Dataset):
    """Item `k`: each file of window `k` as (path, model inputs of its chunks) or (path, reason it cannot be read).

    Decoding (`load_media`) and feature extraction (the processor) run here, in the DataLoader workers, through the
    pipeline's own `preprocess`; the model is not used. A file with sound and no video stream, given to a model that
    hears and sees, is captioned with the visual input absent (`no_visual_embeds`): its chunks carry `video_embeds`
    where the others carry `pixel_values_videos`.
    """

    def __init__(
        self,
        pipe: AudioVisualCaptioningPipeline,
        paths: Sequence[str],
        windows: Sequence[Sequence[int]],
        preprocess_params: dict[str, Any],
    ) -> None:
        self.pipe = pipe
        self.paths = paths
        self.windows = windows
        self.preprocess_params = preprocess_params

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, k: int) -> list[tuple[str, list[dict[str, Any]] | str]]:
        items: list[tuple[str, list[dict[str, Any]] | str]] = []
        for index in self.windows[k]:
            path = self.paths[index]
            try:
                items.append((path, self.featurise(path)))
            except (ValueError, OSError) as error:
                items.append((path, str(error)))
        return items

    def featurise(self, path: str) -> list[dict[str, Any]]:
        """The model inputs of each chunk of the file at `path`."""
        try:
            return list(self.pipe.preprocess(path, **self.preprocess_params))
        except MediaError as error:
            config = self.pipe.model.config
            if error.problem != "no video stream" or not (config.uses_audio and config.uses_visual):
                raise
        extractor = self.pipe.processor.feature_extractor
        audio = load_media(path, sampling_rate=extractor.sampling_rate, need_frames=False)
        clip = {
            "audio": audio.audio,
            "sampling_rate": audio.sampling_rate,
            "video_embeds": no_visual_embeds(config),
        }
        return list(self.pipe.preprocess(clip, **self.preprocess_params))


# `pipe(dataset, batch_size=, num_workers=)` would run the same three stages, but a ChunkPipeline (one input may give
# several chunks) caps its DataLoader at one worker, and the first unreadable file ends the whole iteration; so the
# stages are driven here, as `ChunkPipeline.get_iterator` drives them, with the workers and the per-file reports.


def pipeline_parameters(
    pipe: AudioVisualCaptioningPipeline, **kwargs: Any
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The (preprocess, forward, postprocess) parameters that `pipe(inputs, **kwargs)` would use."""
    preprocess, forward, postprocess = pipe._sanitize_parameters(**kwargs)
    return (
        {**pipe._preprocess_params, **preprocess},
        {**pipe._forward_params, **forward},
        {**pipe._postprocess_params, **postprocess},
    )


def _unbatched(item: Any) -> Any:
    """DataLoader collate_fn for a dataset whose items are whole windows."""
    return item


def caption_windows(
    pipe: AudioVisualCaptioningPipeline,
    paths: Sequence[str],
    windows: Sequence[Sequence[int]],
    batch_size: int = 8,
    num_workers: int = 0,
    return_ot_plan: bool = False,
    known: Collection[str] = (),
    **generate_kwargs: Any,
) -> Iterator[list[dict[str, Any]]]:
    """Caption the files of each window (indices into `paths`), one window after another.

    `num_workers` DataLoader processes decode and featurise the next windows while the model captions this one.
    Yields, per window, one record per file in window order: `{"path", "caption"}` (plus `"ot_plan"` (V, A) on
    request, and `"no_visual": True` for a file captioned with the visual input absent) or `{"path", "error"}` for a
    file that cannot be read. `known`: paths whose captions are known already; a window whose readable files are all
    known is not generated, and yields the records of its unreadable files only.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are the parallelism
    preprocess, forward, postprocess = pipeline_parameters(
        pipe, return_ot_plan=return_ot_plan, **generate_kwargs
    )
    loader = torch.utils.data.DataLoader(
        FeaturisedWindows(pipe, paths, windows, preprocess),
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_unbatched,
    )
    for items in loader:
        readable = [(path, chunks) for path, chunks in items if not isinstance(chunks, str)]
        if all(path in known for path, _ in readable):
            readable = []
        # One result per clip: the first of the pipeline's results for it.
        results = generate_captions(
            pipe, [chunks for _, chunks in readable], batch_size, forward, postprocess
        )
        captions = {path: result[0] for (path, _), result in zip(readable, results, strict=True)}
        records = []
        for path, chunks in items:
            if isinstance(chunks, str):
                records.append({"path": path, "error": chunks})
            elif path in captions:
                absent = {NO_VISUAL: True} if "video_embeds" in chunks[0] else {}
                records.append({"path": path, **captions[path], **absent})
        yield records


def generate_captions(
    pipe: AudioVisualCaptioningPipeline,
    clips: list[list[dict[str, Any]]],
    batch_size: int,
    forward_params: dict[str, Any],
    postprocess_params: dict[str, Any],
) -> list[list[dict[str, Any]]]:
    """The pipeline's results for featurised clips (a list of chunk inputs each), batched as `pipe(...)` batches;
    clips given other model inputs (frame embeddings for an absent visual input, frames for the others) are batched
    apart."""
    groups: dict[frozenset[str], list[int]] = {}
    for index, clip in enumerate(clips):
        groups.setdefault(frozenset(clip[0]), []).append(index)
    collate = no_collate_fn if batch_size == 1 else pad_collate_fn(pipe.tokenizer, pipe.feature_extractor)
    results: list[list[dict[str, Any]]] = [[] for _ in clips]
    for indices in groups.values():
        chunks = [chunk for index in indices for chunk in clips[index]]
        loader = torch.utils.data.DataLoader(chunks, batch_size=batch_size, collate_fn=collate)
        packed = PipelinePackIterator(loader, pipe.forward, forward_params, loader_batch_size=batch_size)
        for index, outputs in zip(indices, packed, strict=True):
            results[index] = pipe.postprocess(outputs, **postprocess_params)
    return results


def caption_files(
    pipe: AudioVisualCaptioningPipeline,
    paths: list[str],
    batch_size: int = 8,
    return_ot_plan: bool = False,
    progress: bool = True,
    num_workers: int = 0,
    **generate_kwargs: Any,
) -> CaptioningReport:
    """Caption `paths` in batches; a file that cannot be read is reported and the others are captioned."""
    report = CaptioningReport()
    windows = batch_windows(len(paths), batch_size)
    with tqdm(total=len(paths), desc="captioning", unit="clip", disable=not progress) as bar:
        for records in caption_windows(
            pipe, paths, windows, batch_size, num_workers, return_ot_plan, **generate_kwargs
        ):
            for record in records:
                if "error" in record:
                    report.failures.append((record["path"], record["error"]))
                else:
                    report.captions.append(record)
            bar.update(len(records))
    return report


def load_captioning_pipeline(
    model: str,
    device: str | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    quantize: str | None = None,
) -> AudioVisualCaptioningPipeline:
    """An `AudioVisualCaptioningPipeline` for a saved model folder or Hub id (model and processor), its decoder
    quantized where `quantize` says ("4bit", "8bit"; `lavcap_hf.quantization`)."""
    from ..model.processing_lavcap import LavCapProcessor
    from ..quantization import load_for_inference

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    network = load_for_inference(
        model, quantize, device, getattr(torch, dtype), trust_remote_code=trust_remote_code
    )
    processor = LavCapProcessor.from_pretrained(model)
    # A quantized model was placed by its loading; 4.x's pipeline refuses a device for it.
    placement = {} if quantize else {"device": torch.device(device)}
    return AudioVisualCaptioningPipeline(model=network, processor=processor, **placement)


# `lavcap caption`


def output_format(output: str | None, fmt: str | None) -> str:
    """`--format`, else csv for a `.csv` output, else jsonl."""
    return fmt or ("csv" if output and output.endswith(".csv") else "jsonl")


def write_rows(rows: Iterable[dict[str, Any]], stream: IO[str], fmt: str) -> None:
    """The `path, caption` of each row as CSV (with a header) or JSONL."""
    if fmt == "csv":
        writer = csv.DictWriter(stream, fieldnames=["path", "caption"])
        writer.writeheader()
        writer.writerows({"path": r["path"], "caption": r["caption"]} for r in rows)
    else:
        for row in rows:
            stream.write(json.dumps({"path": row["path"], "caption": row["caption"]}) + "\n")


def generate_kwargs_of(args: argparse.Namespace) -> dict[str, Any]:
    """The generation settings given to `lavcap caption`; the others are the model's `generation_config`."""
    given = {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}
    return {key: value for key, value in given.items() if value is not None}


def run_caption(args: argparse.Namespace) -> int:
    """`lavcap caption` without `--output`: captions to stdout from this one process (with `--output`,
    `lavcap_hf.captioning.corpus.caption_corpus` runs instead)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print(
            "lavcap caption: give --output when several processes caption (accelerate launch)",
            file=sys.stderr,
        )
        return 2
    paths, failures = expand_media_paths(args.paths)
    captions: list[dict[str, Any]] = []
    if paths:
        pipe = load_captioning_pipeline(
            args.model, args.device, args.dtype, args.trust_remote_code, args.quantize
        )
        report = caption_files(
            pipe,
            paths,
            batch_size=args.batch_size,
            return_ot_plan=bool(args.plot_ot),
            progress=not args.quiet,
            num_workers=args.num_workers,
            **generate_kwargs_of(args),
        )
        captions, failures = report.captions, failures + report.failures
        write_rows(captions, sys.stdout, output_format(None, args.format))
        if args.plot_ot:
            plot_plans(captions, args.plot_ot)
    print_summary(len(captions), failures, without_visual=sum(NO_VISUAL in row for row in captions))
    return 0 if captions else 1


def print_summary(
    captioned: int, failures: Sequence[tuple[str, str]], resumed: int = 0, without_visual: int = 0
) -> None:
    """The bad files with their reasons, then the count, on stderr."""
    if failures:
        print(f"\n{len(failures)} file(s) could not be captioned:", file=sys.stderr)
        for path, reason in failures:
            print(f"  {path}: {reason.removeprefix(path + ': ')}", file=sys.stderr)
    earlier = f" ({resumed} by an earlier, interrupted run)" if resumed else ""
    print(f"captioned {captioned} of {captioned + len(failures)} file(s){earlier}", file=sys.stderr)
    if without_visual:
        print(
            f"{without_visual} of them had no video stream and were captioned with the visual input absent (every "
            "frame embedding zero)",
            file=sys.stderr,
        )


def plot_plans(rows: list[dict[str, Any]], folder: str) -> None:
    """A picture of each row's OT plan, `folder/<file name>.png`."""
    from .plotting import plot_ot_plan

    os.makedirs(folder, exist_ok=True)
    for row in rows:
        name = os.path.splitext(os.path.basename(row["path"]))[0]
        plot_ot_plan(row["ot_plan"], os.path.join(folder, f"{name}.png"), title=row["caption"])
