"""Evaluate a LAVCap model on a captioned split: batched generation, COCO caption metrics, modality robustness.

`evaluate_model` captions every clip of a split (one clip per id, scored against all its reference captions) and
writes to `output_dir`:
- `predictions.jsonl`: one line per clip, in split order: `{"id", "prediction", "references"}`, or
  `{"id", "error"}` for a clip whose media cannot be read (it is not scored);
- `predictions_<condition>.jsonl`: the same for each modality condition (below), shuffled lines adding
  `"visual_from"`, the clip whose visual input was used;
- `scores.json`: the full-input metrics at the top level, in the layout of
  `lavcap_hf.evaluation.metrics.compute_caption_metrics` that `lavcap_hf.hub.model_card.load_eval_results` reads for the model card, plus
  `clips` (`total`, `readable`, `evaluated`), `unreadable` (`[{"id", "reason"}]`), `generation` and, with the
  modality test, `modality_test`;
- `scores.md`: the same as a markdown table;
- `run.json`: the identity of the run, checked when it is resumed: the model (`sharded_run.model_identity`: weights,
  config, processor, dtype, device kind), the effective generation settings, the batch size, the instruction, the
  seed and the clip ids;
- `run.lock` while the run lasts: a second run on the folder is refused, naming the first.

Scores are comparable with published AudioCaps tables: the COCO caption toolkit's PTB tokenisation, METEOR 1.5 and
CIDEr-D (see `lavcap_hf.evaluation.metrics`). Decoding follows the model's `generation_config` (the released beam search where
the model carries it), with `num_beams` / `max_new_tokens` overriding it when given, and never samples.

Each condition is one pass of a `lavcap_hf.captioning.sharded_run.ShardedRun` (that module says how): lines are appended batch
by batch and forced to disk, so a run that stops (interrupt, crash) resumes from the clips already written, with any
number of processes; a last line cut short by a crash is removed first. Batches are fixed windows of the clip order,
and a window is regenerated whole when any of its clips is missing, so a resumed run sees the same batches as an
uninterrupted one and writes the same predictions. A clip recorded as unreadable stays so on resume; `resume=False`
starts afresh.

Across processes (`accelerate launch ... -m lavcap_hf evaluate`, `state` an `accelerate.PartialState`): the main
process appends its windows to the predictions file, process r > 0 to its own part file next to it,
`predictions.jsonl.part-0000r-of-0000N`. When all are done, the main process merges the parts into the predictions
file in split order (written whole, then renamed over it) and removes them, and it alone scores and writes
`scores.json` / `scores.md`: the files are byte for byte those of a one-process run.

Modality test (`modality_test=True`), run on the clips evaluated with the full input, each with its drop
(full minus condition) per metric:
- `no_visual`: every frame embedding set to zero (given as `video_embeds`, in place of the CLIP output);
- `shuffled_visual`: each clip gets the visual input of another clip, a fixed derangement drawn from `seed`;
- `no_audio`: the audio replaced by digital silence over the whole fbank window, i.e. every fbank bin at kaldi's log
  floor, then normalised: what a silent recording gives, where zeroed `input_features` would be the dataset's mean
  spectrum rather than an absence of sound.
A condition that the model's fusion type makes meaningless (visual ones for `audio_only`, `no_audio` for
`visual_only`) is listed under `modality_test.skipped`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..captioning.corpus import runs_on_cpu
from ..captioning.files import load_captioning_pipeline, no_visual_embeds
from ..captioning.generation import decode_captions, generate_caption_ids, generation_settings
from ..captioning.record_files import write_atomic
from ..captioning.sharded_run import Processes, RecordKind, RunError, ShardedRun, model_identity, part_files
from ..data.clips import DEFAULT_COLUMNS, Clip, group_clips, load_clips
from ..data.collator import LavCapDataCollator
from ..data.dataset import LavCapDataset
from ..model.configuration_lavcap import LavCapConfig
from ..model.feature_extraction_lavcap import LavCapFeatureExtractor
from ..model.modeling_lavcap import LavCapForConditionalGeneration
from ..model.processing_lavcap import LavCapProcessor
from ..quantization import quantization_of
from .metrics import CAPTION_METRICS, format_metrics_table, score_captions

if TYPE_CHECKING:
    from accelerate import PartialState

PREDICTIONS_FILE = "predictions.jsonl"
SCORES_FILE = "scores.json"
TABLE_FILE = "scores.md"
RUN_FILE = "run.json"
LOCK_FILE = "run.lock"
FULL = "full"
PREDICTION_RECORDS = RecordKind(key="id", result="prediction", retry_errors=False, noun="clip")


@dataclass(frozen=True)
class ModalityCondition:
    """One input condition of the modality test: `name` (file suffix, JSON key), `title` (table column)."""

    name: str
    title: str
    description: str


MODALITY_CONDITIONS = (
    ModalityCondition("no_visual", "No visual", "visual input suppressed: every frame embedding is zero"),
    ModalityCondition(
        "shuffled_visual",
        "Shuffled visual",
        "each clip gets the visual input of another clip (a fixed random derangement)",
    ),
    ModalityCondition(
        "no_audio", "No audio", "audio suppressed: digital silence over the whole fbank window"
    ),
)
"""The modality conditions, in the order they run and appear in the table."""


@dataclass
class EvaluationResult:
    """What `evaluate_model` wrote: `scores` (the content of `scores.json`), `predictions` ({clip id: caption} of the
    full-input run, evaluated clips only, split order) and the folder of the files."""

    scores: dict[str, Any]
    predictions: dict[str, str]
    output_dir: Path


def evaluate_model(
    model: LavCapForConditionalGeneration,
    processor: LavCapProcessor,
    clips: Sequence[Clip],
    output_dir: str | os.PathLike,
    batch_size: int = 8,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    modality_test: bool = False,
    resume: bool = True,
    instruction: str | None = None,
    seed: int = 0,
    num_workers: int = 0,
    progress: bool = True,
    state: PartialState | None = None,
) -> EvaluationResult:
    """Caption and score a split; see the module docstring for the files written and how resuming works.

    Args:
        model: a `LavCapForConditionalGeneration`, switched to eval mode; inputs go to its device.
        processor: the model's `LavCapProcessor`.
        clips: the split (`lavcap_hf.data.clips.load_clips`); entries sharing an id are one clip with all their captions
            as references (`group_clips`). Every clip needs at least one reference caption.
        output_dir: folder for the predictions, scores and run settings.
        batch_size: clips per `generate()` call.
        num_beams, max_new_tokens: decoding settings; None: the model's `generation_config` (never sampling).
        modality_test: also run the `MODALITY_CONDITIONS`.
        resume: continue the run recorded in `output_dir`; False deletes its earlier predictions first.
        instruction: prompt instruction (the processor's default, "Please describe the audio.", when None).
        seed: seed of the shuffled-visual derangement.
        num_workers: DataLoader processes decoding the media (0: in this process).
        progress: show a progress bar per condition (on the main process).
        state: this process among those of `accelerate launch`, which share the clips (module docstring); None: this
            process alone. Every process returns the same result.

    Raises:
        ValueError: bad settings or a clip without references.
        RunError: (a ValueError, on every process) `output_dir` is in use by another run, holds a run with other
            settings (or foreign prediction files), or no clip could be read.
    """
    given = {"batch_size": batch_size, "num_beams": num_beams, "max_new_tokens": max_new_tokens}
    if any(value is not None and value < 1 for value in given.values()):
        raise ValueError(f"batch_size, num_beams and max_new_tokens must be positive, got {given}")
    clips = group_clips(clips)
    if not clips:
        raise ValueError("the split has no clips to evaluate")
    _check_references(clips)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    processes = Processes(state)
    generate_kwargs = {
        "num_beams": num_beams,
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "pad_token_id": processor.tokenizer.pad_token_id,
    }
    generate_kwargs = {key: value for key, value in generate_kwargs.items() if value is not None}
    generation = generation_settings(model.generation_config, **generate_kwargs)
    run = ShardedRun(
        processes,
        output_dir,
        output_dir / LOCK_FILE,
        output_dir / RUN_FILE,
        PREDICTION_RECORDS,
        progress=progress,
    )
    with run:
        identity = {}
        if processes.is_main:
            identity = _run_identity(model, processor, clips, generation, batch_size, instruction, seed)
        run.start(
            identity,
            resume,
            records=_existing_prediction_files(output_dir),
            others=[output_dir / SCORES_FILE, output_dir / TABLE_FILE],
        )
        runner = _ConditionRunner(
            run,
            model,
            LavCapDataCollator(processor, training=False, instruction=instruction),
            generate_kwargs,
            batch_size=batch_size,
            num_workers=num_workers,
        )
        config = model.config
        records = runner.run(FULL, _dataset(clips, processor, config), output_dir / PREDICTIONS_FILE)
        evaluated = [clip for clip in clips if "prediction" in records[clip.id]]
        unreadable = [
            {"id": c.id, "reason": records[c.id]["error"]} for c in clips if "error" in records[c.id]
        ]
        if not evaluated:
            reasons = "; ".join(f"{u['id']}: {u['reason']}" for u in unreadable[:3])
            raise RunError(f"none of the {len(clips)} clips could be read ({reasons})", processes.is_main)

        if modality_test:
            condition_records, skipped = _run_modality_conditions(
                runner, evaluated, processor, config, output_dir, seed
            )
        scores = None
        if processes.is_main:
            scores = _score(records, evaluated)
            scores.update(
                clips={"total": len(clips), "readable": len(evaluated), "evaluated": scores["num_clips"]},
                unreadable=unreadable,
                generation={**generation, "batch_size": batch_size},
            )
            quantization = quantization_of(model)
            if quantization is not None:  # the scores are those of the quantized model
                scores["quantization"] = quantization
            if modality_test:
                scores["modality_test"] = _score_modality_test(
                    evaluated, condition_records, skipped, records, scores
                )
            write_atomic(output_dir / SCORES_FILE, json.dumps(scores, indent=2, ensure_ascii=False) + "\n")
            write_atomic(output_dir / TABLE_FILE, format_evaluation_table(scores) + "\n")
        scores = processes.share(scores)
    predictions = {clip.id: records[clip.id]["prediction"] for clip in evaluated}
    return EvaluationResult(scores=scores, predictions=predictions, output_dir=output_dir)


def _check_references(clips: Sequence[Clip]) -> None:
    missing = [clip.id for clip in clips if not clip.references]
    if missing:
        raise ValueError(
            f"{len(missing)} clip(s) have no reference caption (first: {missing[:5]}); evaluation scores each clip "
            "against its references: check the caption column / test_coco.json"
        )


# -- run settings and resuming -------------------------------------------------------------------------------------


def _run_identity(
    model: LavCapForConditionalGeneration,
    processor: LavCapProcessor,
    clips: Sequence[Clip],
    generation: dict[str, Any],
    batch_size: int,
    instruction: str | None,
    seed: int,
) -> dict[str, Any]:
    """What the predictions depend on; a resumed run must match it. The batch size is part of it: prompts are left
    padded and batched kernels round by batch shape, which can change a beam."""
    ids = hashlib.sha256("\n".join(clip.id for clip in clips).encode("utf-8")).hexdigest()
    return {
        **model_identity(model, processor),
        "fusion_type": model.config.fusion_type,
        **generation,
        "batch_size": batch_size,
        "instruction": instruction,
        "seed": seed,
        "num_clips": len(clips),
        "clip_ids_sha256": ids,
    }


def _prediction_files(output_dir: Path) -> list[Path]:
    names = [PREDICTIONS_FILE] + [_predictions_name(c.name) for c in MODALITY_CONDITIONS]
    return [output_dir / name for name in names]


def _predictions_name(condition: str) -> str:
    return PREDICTIONS_FILE if condition == FULL else f"predictions_{condition}.jsonl"


def _existing_prediction_files(output_dir: Path) -> list[Path]:
    """The prediction files in `output_dir` and their part files (of a run across processes, unfinished)."""
    found = []
    for path in _prediction_files(output_dir):
        found += [path] if path.exists() else []
        found += [Path(part) for part in part_files(str(path))]
    return found


def read_predictions(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The records of a predictions file, {clip id: record}, in file order.

    A last line without its newline (a write cut short by a crash) is ignored.

    Raises:
        ValueError: a complete line that is not a JSON record with an `id` and a `prediction` or an `error`.
    """
    return {record["id"]: record for record in PREDICTION_RECORDS.read(path)}


# -- generation ----------------------------------------------------------------------------------------------------


def _dataset(
    clips: Sequence[Clip], processor: LavCapProcessor, config: LavCapConfig, **flags: bool
) -> LavCapDataset:
    """The clips decoded as the model needs them (`flags` may turn the audio or the visual input off)."""
    return LavCapDataset(
        clips,
        sampling_rate=processor.feature_extractor.sampling_rate,
        num_frames=config.num_frames,
        load_audio=flags.get("load_audio", config.uses_audio),
        load_visual=flags.get("load_visual", config.uses_visual),
    )


class _WindowDataset(torch.utils.data.Dataset):
    """Batch `k` = the readable clips of window `k` (dataset indices), decoded and collated (in a DataLoader worker).

    Items are `(records, batch)`: one record per clip of the window, `{"id"}` (to be given its prediction) or
    `{"id", "error"}`, and the model inputs of the readable clips (None when there is none). `overrides` replace
    item entries of every clip (suppressed inputs); `extra[i]` adds fields to the record of dataset clip i.
    """

    def __init__(
        self,
        dataset: LavCapDataset,
        windows: list[list[int]],
        collator: LavCapDataCollator,
        overrides: Mapping[str, np.ndarray],
        extra: Sequence[dict[str, Any]] | None,
    ) -> None:
        self.dataset = dataset
        self.windows = windows
        self.collator = collator
        self.overrides = dict(overrides)
        self.extra = extra

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, k: int) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor] | None]:
        records, items = [], []
        for index in self.windows[k]:
            record = {"id": self.dataset.clips[index].id, **(self.extra[index] if self.extra else {})}
            try:
                item = self.dataset[index]
                self.collator(
                    [{**item, **self.overrides}]
                )  # featurises alone: a bad clip fails here, not its batch
            except (ValueError, OSError) as error:
                record["error"] = str(error)
            else:
                items.append({**item, **self.overrides})
            records.append(record)
        return records, self.collator(items) if items else None


def _unbatched(item: Any) -> Any:
    """DataLoader collate_fn for datasets that return whole batches."""
    return item


class _ConditionRunner:
    """Runs one input condition over a list of clips as one pass of the evaluation's `ShardedRun`: this process's
    share of the windows still to do, appended to the predictions file (the main process) or its part file (the
    others), then merged into the predictions file."""

    def __init__(
        self,
        run: ShardedRun,
        model: LavCapForConditionalGeneration,
        collator: LavCapDataCollator,
        generate_kwargs: dict[str, Any],
        batch_size: int,
        num_workers: int,
    ) -> None:
        self.sharded_run = run
        self.model = model
        self.collator = collator
        self.generate_kwargs = generate_kwargs
        self.batch_size = batch_size
        self.num_workers = num_workers

    def run(
        self,
        condition: str,
        dataset: LavCapDataset,
        path: Path,
        overrides: Mapping[str, np.ndarray] | None = None,
        extra: Sequence[dict[str, Any]] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Caption the clips of `dataset` that `path` and its part files lack; returns every clip's record,
        {id: record}, once every process is done and their parts are merged into `path`."""
        ids = [clip.id for clip in dataset.clips]
        records = self.sharded_run.run(
            path,
            ids,
            self.batch_size,
            lambda windows, done: self._records(dataset, windows, overrides or {}, extra),
            write=lambda merged: write_atomic(path, _jsonl(merged)),
            main_appends_to_target=True,
            description=f"evaluating ({condition})",
        )
        return {record["id"]: record for record in records}

    def _records(
        self,
        dataset: LavCapDataset,
        windows: list[list[int]],
        overrides: Mapping[str, np.ndarray],
        extra: Sequence[dict[str, Any]] | None,
    ) -> Iterator[list[dict[str, Any]]]:
        """The records of each of `windows` (dataset indices): every clip with its prediction and references, or
        its error."""
        references = {clip.id: list(clip.references) for clip in dataset.clips}
        loader = torch.utils.data.DataLoader(
            _WindowDataset(dataset, windows, self.collator, overrides, extra),
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_unbatched,
        )
        self.model.eval()
        for window_records, batch in loader:
            captions = iter(self._generate(batch) if batch is not None else [])
            for record in window_records:
                if "error" not in record:
                    record.update(prediction=next(captions), references=references[record["id"]])
            yield window_records

    def _generate(self, batch: dict[str, torch.Tensor]) -> list[str]:
        """Captions of one collated batch (no sampling)."""
        inputs = {k: v.to(self.model.device) for k, v in batch.items() if k != "clip_index"}
        caption_ids = generate_caption_ids(self.model, inputs, **self.generate_kwargs)
        return decode_captions(self.collator.processor, caption_ids)


def _jsonl(records: Sequence[dict[str, Any]]) -> str:
    """The lines `record_files.append_records` writes, so that a merged file is the one a single process appends."""
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


# -- scoring -------------------------------------------------------------------------------------------------------


def _score(records: Mapping[str, dict[str, Any]], clips: Sequence[Clip]) -> dict[str, Any]:
    # Through the `evaluate` metric module (`lavcap_hf.evaluation.metrics.AudioCaptioning`), as the Trainer scores.
    return score_captions(
        {clip.id: records[clip.id]["prediction"] for clip in clips},
        {clip.id: list(clip.references) for clip in clips},
    )


def _metrics(scores: Mapping[str, Any]) -> dict[str, Any]:
    return {name: scores[name] for name in (*CAPTION_METRICS, "unavailable", "num_clips", "tokenizer")}


def _drop(full: Mapping[str, Any], condition: Mapping[str, Any]) -> dict[str, float | None]:
    """Full minus condition per metric (positive: the metric falls without the modality); None when unavailable."""
    return {
        name: None if full[name] is None or condition[name] is None else full[name] - condition[name]
        for name in CAPTION_METRICS
    }


# -- modality test -------------------------------------------------------------------------------------------------


def _derangement(count: int, seed: int) -> list[int]:
    """`partner[i] != i` for every i: a random cyclic order of the `count` positions, each taking the next one's
    place. Deterministic in (`count`, `seed`); needs `count >= 2`."""
    if count < 2:
        raise ValueError(f"a derangement needs at least 2 clips, got {count}")
    order = np.random.default_rng(seed).permutation(count)
    partner = np.empty(count, dtype=np.int64)
    partner[order] = np.roll(order, -1)
    return partner.tolist()


def _silent_audio(feature_extractor: LavCapFeatureExtractor) -> np.ndarray:
    """Digital silence that fills the extractor's whole fbank window: float32 zeros (samples,) at its rate."""
    extractor = feature_extractor
    samples = (extractor.max_length - 1) * extractor.hop_length + extractor.window_length
    return np.zeros(samples, dtype=np.float32)


def _with_visual_of(clip: Clip, other: Clip) -> Clip:
    """`clip` with its own audio and the visual input (frames or embeddings) of `other`."""
    audio = clip.audio if clip.audio is not None else clip.video
    return replace(clip, audio=audio, video=other.video, video_embeds=other.video_embeds)


def _skip_reason(condition: str, config: LavCapConfig, count: int) -> str | None:
    if condition != "no_audio" and not config.uses_visual:
        return f"fusion_type={config.fusion_type!r} uses no visual input"
    if condition == "no_audio" and not config.uses_audio:
        return f"fusion_type={config.fusion_type!r} uses no audio"
    if condition == "shuffled_visual" and count < 2:
        return "shuffling the visual input needs at least 2 evaluated clips"
    return None


def _run_modality_conditions(
    runner: _ConditionRunner,
    clips: Sequence[Clip],
    processor: LavCapProcessor,
    config: LavCapConfig,
    output_dir: Path,
    seed: int,
) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, str]]:
    """Run the applicable `MODALITY_CONDITIONS` on `clips` (those evaluated with the full input); returns
    ({condition: {id: record}}, {skipped condition: reason})."""
    condition_records: dict[str, dict[str, dict[str, Any]]] = {}
    skipped: dict[str, str] = {}
    for condition in MODALITY_CONDITIONS:
        reason = _skip_reason(condition.name, config, len(clips))
        if reason is not None:
            skipped[condition.name] = reason
            continue
        path = output_dir / _predictions_name(condition.name)
        if condition.name == "no_visual":
            records = runner.run(
                condition.name,
                _dataset(clips, processor, config, load_visual=False),
                path,
                overrides={"video_embeds": no_visual_embeds(config)},
            )
        elif condition.name == "shuffled_visual":
            partner = _derangement(len(clips), seed)
            swapped = [_with_visual_of(clip, clips[partner[i]]) for i, clip in enumerate(clips)]
            records = runner.run(
                condition.name,
                _dataset(swapped, processor, config),
                path,
                extra=[{"visual_from": clips[p].id} for p in partner],
            )
        else:
            records = runner.run(
                condition.name,
                _dataset(clips, processor, config, load_audio=False),
                path,
                overrides={"audio": _silent_audio(processor.feature_extractor)},
            )
        condition_records[condition.name] = records
    return condition_records, skipped


def _score_modality_test(
    clips: Sequence[Clip],
    condition_records: Mapping[str, Mapping[str, dict[str, Any]]],
    skipped: Mapping[str, str],
    full_records: Mapping[str, dict[str, Any]],
    full_scores: Mapping[str, Any],
) -> dict[str, Any]:
    """Score each condition's records on `clips`, with its drop from the full input (`modality_test` of
    `scores.json`)."""
    results: dict[str, Any] = {"conditions": {}, "skipped": dict(skipped)}
    # Every column is scored on the clips that all conditions evaluated (CIDEr-D depends on the set of clips).
    common = [c for c in clips if all("prediction" in r[c.id] for r in condition_records.values())]
    baseline = _metrics(full_scores) if len(common) == len(clips) else _score(full_records, common)
    if len(common) < len(clips):
        results["baseline"] = baseline
    for name, records in condition_records.items():
        scores = _score(records, common)
        failed = [{"id": c.id, "reason": records[c.id]["error"]} for c in clips if "error" in records[c.id]]
        results["conditions"][name] = {
            "description": next(c.description for c in MODALITY_CONDITIONS if c.name == name),
            **_metrics(scores),
            "drop": _drop(baseline, scores),
            "unreadable": failed,
        }
    return results


# -- report --------------------------------------------------------------------------------------------------------


def format_evaluation_table(scores: Mapping[str, Any]) -> str:
    """Markdown report of a `scores.json`: one metrics table (`lavcap_hf.evaluation.metrics.format_metrics_table`, with a value
    and a drop column per modality condition when the modality test ran), the reasons for unavailable metrics, the
    clip counts and the unreadable clips."""
    modality = scores.get("modality_test", {})
    conditions = modality.get("conditions", {})
    titles = {c.name: c.title for c in MODALITY_CONDITIONS}
    baseline = modality.get("baseline", scores)
    columns = [("Full" if conditions else "Score", baseline)]
    for name, result in conditions.items():
        columns += [(titles[name], result), ("drop", result["drop"])]
    notes = [format_metrics_table(scores, columns)]
    notes += [f"- {titles[name]}: {result['description']}" for name, result in conditions.items()]
    notes += [f"- {titles[name]} not run: {reason}" for name, reason in modality.get("skipped", {}).items()]
    if "baseline" in modality:
        notes.append(
            f"- the modality columns are scored on the {baseline['num_clips']} clips every condition read"
        )
    clips = scores["clips"]
    notes.append(
        f"- clips: {clips['total']} in the split, {clips['readable']} with readable media, "
        f"{clips['evaluated']} evaluated"
    )
    unreadable = scores["unreadable"]
    if unreadable:
        notes += ["", f"Unreadable clips ({len(unreadable)}, all listed in {SCORES_FILE}):"]
        notes += [f"- {u['id']}: {u['reason']}" for u in unreadable[:20]]
    return "\n".join(notes)


# -- command line --------------------------------------------------------------------------------------------------


def run_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """`lavcap evaluate` in this process, alone or one of `accelerate launch`'s N: load the model and the split,
    evaluate this process's share, and on the main process print the table; returns the scores (on every process)."""
    from accelerate import PartialState

    state = PartialState(cpu=runs_on_cpu(args.device))
    clips = load_clips(
        args.data,
        args.split,
        columns={role: getattr(args, f"{role}_column") for role in DEFAULT_COLUMNS},
        visual_features_dir=args.visual_features_dir,
        use_visual_features=not args.use_frames,
    )
    device = args.device or (str(state.device) if state.num_processes > 1 else None)
    pipe = load_captioning_pipeline(args.model, device, args.dtype, args.trust_remote_code, args.quantize)
    result = evaluate_model(
        pipe.model,
        pipe.processor,
        clips,
        args.output_dir,
        batch_size=args.batch_size,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        modality_test=args.modality_test,
        resume=not args.no_resume,
        instruction=args.instruction,
        seed=args.seed,
        num_workers=args.num_workers,
        progress=not args.quiet,
        state=state,
    )
    if state.is_main_process:
        print(format_evaluation_table(result.scores))
        print(f"\npredictions and scores written to {result.output_dir}")
    return result.scores
