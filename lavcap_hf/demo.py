"""`lavcap demo`: LAVCap's main job end to end on a fresh machine, with nothing downloaded.

No pretrained LAVCap weights exist to download, so the demo trains a small LAVCap on the spot on synthesised
audio-visual scenes (`lavcap_hf.synthetic`) whose captions name a sound (heard) and a place (seen only in the
frames). It trains the OT-fusion model and an audio-only one with the `Trainer`, saves each with
`save_pretrained`, loads it back through `pipeline("audio-visual-captioning")`, captions the held-out clips and
prints a table: the place accuracy shows what the frames add, the sound accuracy that both learn the audio.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import TrainingArguments, pipeline

from ._compat import processor_kwarg
from .collator import LavCapDataCollator
from .configuration_lavcap import LavCapConfig
from .data import Clip, LavCapDataset
from .media import load_media
from .metrics import compute_caption_metrics
from .modeling_lavcap import LavCapForConditionalGeneration
from .pipeline_lavcap import TASK
from .plotting import plot_ot_plan
from .processing_lavcap import AUDIO_TOKEN, VIDEO_TOKEN, LavCapProcessor
from .synthetic import generate_dataset, score_caption
from .tiny import tiny_lavcap_config, word_level_tokenizer
from .training import LavCapTrainer

FUSIONS = ("ot_att", "audio_only")
NUM_FRAMES = 8
AUDIO_FRAMES = 128  # 1.28 s of fbank: every synthetic sound is active from the start of its clip
# Samples that make AUDIO_FRAMES fbank frames (10 ms hop, 25 ms window at 16 kHz): the part of a clip the model hears.
AUDIO_SAMPLES = (AUDIO_FRAMES - 1) * 160 + 400


@dataclass
class DemoRow:
    fusion_type: str
    sound_accuracy: float
    place_accuracy: float
    scores: dict[str, Any]
    train_seconds: float
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
    fusion_type: str, tokenizer: Any, clips: list[Clip], folder: str, steps: int, batch_size: int, seed: int
) -> float:
    """Train a fresh model with the Trainer and save model + processor to `folder`; returns the seconds taken."""
    torch.manual_seed(seed)
    config = demo_config(fusion_type, tokenizer)
    model = LavCapForConditionalGeneration(config)
    processor = LavCapProcessor.from_model_config(config, tokenizer)
    dataset = LavCapDataset(
        clips, num_frames=NUM_FRAMES, load_visual=config.uses_visual, load_audio=config.uses_audio, seed=seed
    )
    args = TrainingArguments(
        output_dir=os.path.join(folder, "checkpoints"),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=1e-3,
        warmup_steps=steps // 15,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        logging_steps=max(1, steps // 6),
        save_strategy="no",
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
        train_dataset=dataset,
        data_collator=LavCapDataCollator(processor, spec_augment=False),
        caption_metrics=False,
        **{processor_kwarg(LavCapTrainer): processor},
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return seconds


def caption_held_out(folder: str, clips: list[Clip]) -> list[str]:
    """Caption the held-out clips with the saved model, loaded back through the pipeline."""
    captioner = pipeline(TASK, model=folder, trust_remote_code=True, device="cpu")
    inputs = [
        {"audio": clip.audio, "sampling_rate": clip.sampling_rate, "frames": clip.video} for clip in clips
    ]
    outputs = captioner(inputs, batch_size=16, num_beams=1, max_new_tokens=12)
    return [output[0]["caption"] for output in outputs]


def evaluate_row(
    fusion_type: str, captions: list[str], records: list[dict[str, Any]], seconds: float
) -> DemoRow:
    judged = [score_caption(c, r["sound"], r["place"]) for c, r in zip(captions, records, strict=True)]
    scores = compute_caption_metrics(captions, [[r["caption"]] for r in records])
    return DemoRow(
        fusion_type=fusion_type,
        sound_accuracy=float(np.mean([j["sound_correct"] for j in judged])),
        place_accuracy=float(np.mean([j["place_correct"] for j in judged])),
        scores=scores,
        train_seconds=seconds,
        examples=[(r["caption"], c) for r, c in zip(records, captions, strict=True)],
    )


def format_report(rows: list[DemoRow], num_examples: int = 6) -> str:
    def score(row: DemoRow, name: str) -> str:
        value = row.scores.get(name)
        return "n/a" if value is None else f"{value:.3f}"

    lines = [
        "| fusion | sound accuracy | place accuracy | BLEU-4 | CIDEr-D | METEOR | train s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.fusion_type} | {row.sound_accuracy:.2f} | {row.place_accuracy:.2f} | {score(row, 'BLEU_4')} "
            f"| {score(row, 'CIDEr')} | {score(row, 'METEOR')} | {row.train_seconds:.0f} |"
        )
    lines += [
        "",
        "| reference | " + " | ".join(r.fusion_type for r in rows) + " |",
        "|---" * (len(rows) + 1) + "|",
    ]
    for i in range(min(num_examples, len(rows[0].examples))):
        lines.append(f"| {rows[0].examples[i][0]} | " + " | ".join(r.examples[i][1] for r in rows) + " |")
    return "\n".join(lines)


def save_ot_picture(folder: str, clip: Clip, path: str) -> None:
    captioner = pipeline(TASK, model=folder, trust_remote_code=True, device="cpu")
    output = captioner(
        {"audio": clip.audio, "sampling_rate": clip.sampling_rate, "frames": clip.video},
        return_ot_plan=True,
        num_beams=1,
        max_new_tokens=12,
    )[0]
    plot_ot_plan(output["ot_plan"], path, title=f"{clip.caption} -> {output['caption']}")


def run_demo(
    output_dir: str = "lavcap_demo",
    num_train: int = 150,
    num_test: int = 60,
    steps: int = 300,
    batch_size: int = 16,
    seed: int = 0,
) -> list[DemoRow]:
    start = time.perf_counter()
    # The models are tiny: a second intra-op thread gains little and, on a busy 2-core machine, costs a lot.
    torch.set_num_threads(1)
    os.makedirs(output_dir, exist_ok=True)
    print(f"synthesising {num_train} training and {num_test} held-out clips in {output_dir}/data ...")
    splits = generate_dataset(os.path.join(output_dir, "data"), num_train, num_test, seed=seed)
    train_clips = decode_clips(splits["train"], "decoding training clips")
    test_clips = decode_clips(splits["test"], "decoding held-out clips")
    tokenizer = word_level_tokenizer(clip.caption for clip in train_clips)
    rows = []
    for fusion_type in FUSIONS:
        folder = os.path.join(output_dir, f"model-{fusion_type}")
        print(f"\ntraining the {fusion_type} model ({steps} steps) ...")
        seconds = train_one(fusion_type, tokenizer, train_clips, folder, steps, batch_size, seed)
        captions = caption_held_out(folder, test_clips)
        rows.append(evaluate_row(fusion_type, captions, splits["test"], seconds))
    picture = os.path.join(output_dir, "ot_plan.png")
    save_ot_picture(os.path.join(output_dir, "model-ot_att"), test_clips[0], picture)
    report = format_report(rows)
    with open(os.path.join(output_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(report + "\n")
    with open(os.path.join(output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump([{**row.__dict__, "examples": row.examples[:10]} for row in rows], f, indent=2, default=str)
    print("\nheld-out clips (the sound is heard; the place is only seen in the frames):\n")
    print(report)
    print(
        f"\nOT plan of one clip: {picture}; models: {output_dir}/model-*; total {time.perf_counter() - start:.0f} s"
    )
    return rows


def run_demo_command(args: argparse.Namespace) -> int:
    run_demo(args.output, args.num_train, args.num_test, args.steps, args.batch_size, args.seed)
    return 0
