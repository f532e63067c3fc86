"""`lavcap demo`: LAVCap's main job end to end on a fresh machine, with nothing downloaded.

No pretrained LAVCap weights exist to download, so the demo trains a small LAVCap on the spot on synthesised
audio-visual scenes (`lavcap_hf.data.synthetic`) whose captions name a sound (heard) and a place (seen only in the
frames). It trains the OT-fusion model and an audio-only one with the `Trainer`, saves each with
`save_pretrained`, loads it back through `pipeline("audio-visual-captioning")`, captions the held-out clips and
prints a table: the place accuracy shows what the frames add, the sound accuracy that both learn the audio.

Each model trains until its loss on a validation split (clips drawn apart from the training ones) stops improving
(`EarlyStoppingCallback`, an evaluation every `eval_every` steps, `patience` evaluations without a new best), and the
best evaluated weights are the ones saved, so the table compares converged models. The learning rate halves after
two evaluations without a new best, so each model is annealed by its own progress; `steps` is only a safety cap, and
the report says whether each run ended by early stopping or at the cap.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModel, EarlyStoppingCallback, TrainingArguments, pipeline

from .. import LavCapConfig, LavCapProcessor
from ..captioning.plotting import plot_ot_plan
from ..data.clips import Clip
from ..data.collator import LavCapDataCollator
from ..data.dataset import LavCapDataset
from ..data.synthetic import generate_dataset, score_caption
from ..evaluation.metrics import score_captions
from ..model.media_decoding import load_media
from ..model.pipeline_lavcap import TASK
from ..model.processing_lavcap import AUDIO_TOKEN, VIDEO_TOKEN
from ..quantization import QUANTIZE_CHOICES, pipeline_placement, quantized_module_names
from ..testing.configs import tiny_lavcap_config
from ..testing.tokenizers import word_level_tokenizer
from ..training.compat import processor_kwarg
from ..training.trainer import LavCapTrainer

FUSIONS = ("ot_att", "audio_only")
NUM_FRAMES = 8
AUDIO_FRAMES = 128  # 1.28 s of fbank: every synthetic sound is active from the start of its clip
# Samples that make AUDIO_FRAMES fbank frames (10 ms hop, 25 ms window at 16 kHz): the part of a clip the model hears.
AUDIO_SAMPLES = (AUDIO_FRAMES - 1) * 160 + 400


@dataclass
class TrainingRun:
    """How one model's training went: steps taken, the evaluated step whose weights were kept, and why it ended."""

    seconds: float
    steps: int
    best_step: int
    best_eval_loss: float
    converged: bool  # stopped by the early stopping, not by the step cap


@dataclass
class DemoRow:
    fusion_type: str
    sound_accuracy: float
    place_accuracy: float
    scores: dict[str, Any]
    training: TrainingRun
    examples: list[tuple[str, str]]


def demo_config(fusion_type: str, tokenizer: Any, width: int = 64) -> LavCapConfig:
    """A small LAVCap: 2-layer CED on 1.28 s of fbank, a 2-layer CLIP-style tower on 32 px frames, a 2-layer LLaMA
    over the tokenizer's vocabulary (its pad/bos/eos ids 0/1/2 are the tiny config's)."""
    return tiny_lavcap_config(
        fusion_type,
        vocab_size=len(tokenizer),
        width=width,
        target_length=AUDIO_FRAMES,
        num_frames=NUM_FRAMES,
        image_size=32,
        audio_token_id=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN),
        video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
    )


def decode_clips(records: list[dict[str, Any]], desc: str) -> list[Clip]:
    """Decode every clip once (the demo's clips fit in memory and are seen for many epochs), keeping the first
    1.28 s of audio, the window the small model listens to."""
    clips = []
    for record in tqdm(records, desc=desc, unit="clip"):
        media = load_media(record["video_path"], num_frames=NUM_FRAMES)
        clips.append(
            Clip(
                id=record["id"],
                caption=record["caption"],
                references=(record["caption"],),
                audio=media.audio[:AUDIO_SAMPLES],
                sampling_rate=media.sampling_rate,
                video=media.frames,
            )
        )
    return clips


def train_one(
    fusion_type: str,
    tokenizer: Any,
    clips: list[Clip],
    valid_clips: list[Clip],
    folder: str,
    max_steps: int,
    batch_size: int,
    seed: int,
    eval_every: int = 50,
    patience: int = 4,
) -> TrainingRun:
    """Train a fresh model with the Trainer until its validation loss stops improving (at most `max_steps`) and
    save the best evaluated model + processor to `folder`."""
    torch.manual_seed(seed)
    config = demo_config(fusion_type, tokenizer)
    model = AutoModel.from_config(config)
    processor = LavCapProcessor.from_model_config(config, tokenizer)

    def dataset(split: list[Clip]) -> LavCapDataset:
        return LavCapDataset(
            split,
            num_frames=NUM_FRAMES,
            load_visual=config.uses_visual,
            load_audio=config.uses_audio,
            seed=seed,
        )

    checkpoints = os.path.join(folder, "checkpoints")
    args = TrainingArguments(
        output_dir=checkpoints,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=32,
        learning_rate=1e-3,
        # Annealed by the validation loss itself, not over a fixed number of steps: the rate halves after two
        # evaluations without a new best, and the early stopping ends the run after `patience` of them, so every
        # model trains at a lower rate before it stops. (At a constant rate the kept weights stayed noisy; a cosine
        # over the step cap ended the fused model at the cap, still improving.)
        lr_scheduler_type="reduce_lr_on_plateau",
        lr_scheduler_kwargs={"factor": 0.5, "patience": 1},
        weight_decay=0.0,
        logging_steps=eval_every,
        eval_strategy="steps",
        eval_steps=eval_every,
        save_strategy="steps",
        save_steps=eval_every,
        save_total_limit=1,  # the best checkpoint is kept besides the last one
        save_only_model=True,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        dataloader_num_workers=1,  # featurisation in a worker process, beside the training step
        seed=seed,
    )
    # A small model trained from scratch: every weight trains (LoRA is for adapting pretrained weights). No
    # SpecAugment: the paper's masks (up to 48 of 64 mel bins, 192 frames) would hide most of a 1.28 s window.
    trainer = LavCapTrainer(
        model=model,
        args=args,
        train_dataset=dataset(clips),
        eval_dataset=dataset(valid_clips),
        data_collator=LavCapDataCollator(processor, spec_augment=False),
        caption_metrics=False,
        callbacks=[EarlyStoppingCallback(early_stopping_patience=patience)],
        **{processor_kwarg(LavCapTrainer): processor},
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    state = trainer.state
    trainer.model.save_pretrained(folder)
    processor.save_pretrained(folder)
    shutil.rmtree(checkpoints, ignore_errors=True)
    best = state.best_model_checkpoint
    return TrainingRun(
        seconds=seconds,
        steps=state.global_step,
        best_step=int(best.rsplit("-", 1)[1]) if best else state.global_step,
        best_eval_loss=float(state.best_metric) if state.best_metric is not None else float("nan"),
        converged=state.global_step < max_steps,
    )


def demo_captioner(folder: str, quantize: str | None = None) -> Any:
    """The saved model loaded back through the pipeline on the CPU, its decoder quantized where `quantize` says."""
    return pipeline(TASK, model=folder, trust_remote_code=True, **pipeline_placement("cpu", quantize))


def caption_clips(captioner: Any, clips: list[Clip], **generation: Any) -> list[str]:
    """Caption `clips`, decoding as the model's generation config says unless `generation` (`generate()` settings)
    says otherwise."""
    inputs = [
        {"audio": clip.audio, "sampling_rate": clip.sampling_rate, "frames": clip.video} for clip in clips
    ]
    outputs = captioner(inputs, batch_size=16, **generation)
    return [output[0]["caption"] for output in outputs]


def caption_held_out(folder: str, clips: list[Clip], **generation: Any) -> list[str]:
    """Caption the held-out clips with the saved model, loaded back through the pipeline (`caption_clips`)."""
    return caption_clips(demo_captioner(folder), clips, **generation)


def held_out_scores(
    captions: list[str], records: list[dict[str, Any]]
) -> tuple[float, float, dict[str, Any]]:
    """Sound accuracy, place accuracy and the caption metrics of the held-out clips' captions."""
    judged = [score_caption(c, r["sound"], r["place"]) for c, r in zip(captions, records, strict=True)]
    scores = score_captions(captions, [[r["caption"]] for r in records])
    sound = float(np.mean([j["sound_correct"] for j in judged]))
    return sound, float(np.mean([j["place_correct"] for j in judged])), scores


def evaluate_row(
    fusion_type: str, captions: list[str], records: list[dict[str, Any]], training: TrainingRun
) -> DemoRow:
    sound_accuracy, place_accuracy, scores = held_out_scores(captions, records)
    return DemoRow(
        fusion_type=fusion_type,
        sound_accuracy=sound_accuracy,
        place_accuracy=place_accuracy,
        scores=scores,
        training=training,
        examples=[(r["caption"], c) for r, c in zip(records, captions, strict=True)],
    )


def format_report(rows: list[DemoRow], num_examples: int = 6) -> str:
    def score(row: DemoRow, name: str) -> str:
        value = row.scores.get(name)
        return "n/a" if value is None else f"{value:.3f}"

    lines = [
        "| fusion | sound accuracy | place accuracy | BLEU-4 | CIDEr-D | METEOR | steps | best step "
        "| validation loss | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        run = row.training
        steps = f"{run.steps}" + ("" if run.converged else " (cap)")
        lines.append(
            f"| {row.fusion_type} | {row.sound_accuracy:.2f} | {row.place_accuracy:.2f} | {score(row, 'BLEU_4')} "
            f"| {score(row, 'CIDEr')} | {score(row, 'METEOR')} | {steps} | {run.best_step} "
            f"| {run.best_eval_loss:.3f} | {run.seconds:.0f} |"
        )
    lines += [
        "",
        "| reference | " + " | ".join(r.fusion_type for r in rows) + " |",
        "|---" * (len(rows) + 1) + "|",
    ]
    for i in range(min(num_examples, len(rows[0].examples))):
        lines.append(f"| {rows[0].examples[i][0]} | " + " | ".join(r.examples[i][1] for r in rows) + " |")
    return "\n".join(lines)


def save_ot_picture(folder: str, clip: Clip, path: str, **generation: Any) -> str:
    """Picture of the OT plan of `clip` (frames as thumbnails along their axis); returns the model's caption."""
    captioner = pipeline(TASK, model=folder, trust_remote_code=True, device="cpu")
    output = captioner(
        {"audio": clip.audio, "sampling_rate": clip.sampling_rate, "frames": clip.video},
        return_ot_plan=True,
        **generation,
    )[0]
    title = f"{clip.id}: reference '{clip.caption}', caption '{output['caption']}'"
    plot_ot_plan(output["ot_plan"], path, title=title, frames=clip.video)
    return output["caption"]


def first_correct(row: DemoRow, records: list[dict[str, Any]]) -> int:
    """Index of the first held-out clip whose caption names both its sound and its place (0 when none does)."""
    for index, ((_, caption), record) in enumerate(zip(row.examples, records, strict=True)):
        judged = score_caption(caption, record["sound"], record["place"])
        if judged["sound_correct"] and judged["place_correct"]:
            return index
    return 0


def run_demo(
    output_dir: str = "lavcap_demo",
    num_train: int = 150,
    num_test: int = 60,
    steps: int = 3000,
    batch_size: int = 16,
    seed: int = 0,
    num_valid: int = 30,
    eval_every: int = 50,
    patience: int = 4,
    generation: dict[str, Any] | None = None,
) -> list[DemoRow]:
    """Train the demo's models (each until its validation loss stops improving, at most `steps` steps), caption
    the held-out clips and write the report, `results.json` and `ot_plan.png` to `output_dir`. The captions are
    decoded as each saved model's generation config says (the released beam search), with `generation`
    (`generate()` settings) in its place where given."""
    generation = generation or {}
    start = time.perf_counter()
    # The models are tiny: a second intra-op thread gains little and, on a busy 2-core machine, costs a lot.
    torch.set_num_threads(1)
    os.makedirs(output_dir, exist_ok=True)
    print(
        f"synthesising {num_train} training, {num_valid} validation and {num_test} held-out clips in "
        f"{output_dir}/data ..."
    )
    # The validation clips are the last of the generated training split: clips of their own, never trained on.
    splits = generate_dataset(os.path.join(output_dir, "data"), num_train + num_valid, num_test, seed=seed)
    train_clips = decode_clips(splits["train"], "decoding training and validation clips")
    train_clips, valid_clips = train_clips[:num_train], train_clips[num_train:]
    test_clips = decode_clips(splits["test"], "decoding held-out clips")
    tokenizer = word_level_tokenizer(clip.caption for clip in train_clips)
    rows = []
    for fusion_type in FUSIONS:
        folder = os.path.join(output_dir, f"model-{fusion_type}")
        print(
            f"\ntraining the {fusion_type} model until its validation loss stops improving (evaluated every "
            f"{eval_every} steps, patience {patience}, at most {steps} steps) ..."
        )
        training = train_one(
            fusion_type,
            tokenizer,
            train_clips,
            valid_clips,
            folder,
            steps,
            batch_size,
            seed,
            eval_every,
            patience,
        )
        print(
            f"{fusion_type}: {training.steps} steps in {training.seconds:.0f} s, "
            + ("stopped by the early stopping" if training.converged else "stopped by the step cap")
            + f"; kept step {training.best_step} (validation loss {training.best_eval_loss:.3f})"
        )
        captions = caption_held_out(folder, test_clips, **generation)
        rows.append(evaluate_row(fusion_type, captions, splits["test"], training))
    picture = os.path.join(output_dir, "ot_plan.png")
    shown = test_clips[first_correct(rows[0], splits["test"])]
    save_ot_picture(os.path.join(output_dir, "model-ot_att"), shown, picture, **generation)
    report = format_report(rows)
    with open(os.path.join(output_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(report + "\n")
    with open(os.path.join(output_dir, "results.json"), "w", encoding="utf-8") as f:
        results = [
            {**row.__dict__, "training": row.training.__dict__, "examples": row.examples[:10]} for row in rows
        ]
        json.dump(results, f, indent=2, default=str)
    print("\nheld-out clips (the sound is heard; the place is only seen in the frames):\n")
    print(report)
    print(
        f"\nOT plan of {shown.id} (captioned right where any held-out clip is): {picture}; models: "
        f"{output_dir}/model-*; total {time.perf_counter() - start:.0f} s"
    )
    return rows


@dataclass
class QuantizedRow:
    """The held-out scores of the OT model with its decoder at one precision."""

    decoder: str
    quantized_layers: int
    sound_accuracy: float
    place_accuracy: float
    scores: dict[str, Any]


def compare_quantized_decoders(
    output_dir: str = "lavcap_demo", generation: dict[str, Any] | None = None
) -> list[QuantizedRow]:
    """Caption the held-out clips with the demo's trained OT model (`lavcap demo` trains it first where
    `output_dir` holds none) with its decoder unquantized, in 8-bit and in 4-bit (NF4, double quantisation), and
    write the table of their scores to `output_dir/quantization.md` (and `quantization.json`)."""
    folder = os.path.join(output_dir, "model-ot_att")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        print(f"{folder} holds no trained model: running the demo first")
        run_demo(output_dir, generation=generation)
    torch.set_num_threads(1)
    records = [
        {**record, "video_path": os.path.join(output_dir, "data", record["video_path"])}
        for record in map(json.loads, open(os.path.join(output_dir, "data", "test.jsonl"), encoding="utf-8"))
    ]
    clips = decode_clips(records, "decoding held-out clips")
    rows = []
    for quantize in (None, *reversed(QUANTIZE_CHOICES)):
        captioner = demo_captioner(folder, quantize)
        captions = caption_clips(captioner, clips, **(generation or {}))
        sound, place, scores = held_out_scores(captions, records)
        rows.append(
            QuantizedRow(
                decoder=quantize or "unquantized",
                quantized_layers=len(quantized_module_names(captioner.model)),
                sound_accuracy=sound,
                place_accuracy=place,
                scores=scores,
            )
        )
    table = format_quantization_table(rows)
    with open(os.path.join(output_dir, "quantization.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    with open(os.path.join(output_dir, "quantization.json"), "w", encoding="utf-8") as f:
        json.dump([row.__dict__ for row in rows], f, indent=2, default=str)
    print(f"\nheld-out clips, the OT model's decoder at each precision ({len(records)} clips):\n")
    print(table)
    return rows


def format_quantization_table(rows: list[QuantizedRow]) -> str:
    lines = [
        "| decoder | quantized layers | sound accuracy | place accuracy | BLEU-4 | CIDEr-D |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.decoder} | {row.quantized_layers} | {row.sound_accuracy:.2f} | {row.place_accuracy:.2f} "
            f"| {row.scores['BLEU_4']:.3f} | {row.scores['CIDEr']:.3f} |"
        )
    return "\n".join(lines)


def run_demo_command(args: argparse.Namespace) -> int:
    generation = {
        name: value
        for name, value in (("num_beams", args.num_beams), ("max_new_tokens", args.max_new_tokens))
        if value is not None
    }
    if args.compare_quantization:
        compare_quantized_decoders(args.output, generation)
        return 0
    run_demo(
        args.output,
        args.num_train,
        args.num_test,
        args.steps,
        args.batch_size,
        args.seed,
        num_valid=args.num_valid,
        eval_every=args.eval_every,
        patience=args.patience,
        generation=generation,
    )
    return 0
