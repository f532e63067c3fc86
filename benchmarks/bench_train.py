"""Training throughput and peak memory of LAVCap fine-tuning with `LavCapTrainer` (LoRA, OT loss, collator).

Two configurations, random weights (nothing is downloaded):
- `small` (CPU-sized): CED 4 x 192, LLaMA 4 x 256, full-length clips (10 s audio -> 1024 x 64 fbank, 64 audio
  tokens), 20 precomputed visual embeddings;
- `paper` (GPU): CED-base (12 x 768), LLaMA-2-7B dimensions (32 x 4096) in bf16 with float32 adapters, 20 precomputed
  CLIP ViT-L/14 embeddings (768), bf16 autocast - the paper's training set-up.

Each step is a real Trainer step: clips are featurised by the collator (fbank + SpecAugment, random instruction) in
the DataLoader, then forward (OT fusion, LM), backward, AdamW. Throughput is measured over the steps after
`--warmup`. Peak memory: on CUDA `torch.cuda.max_memory_allocated`; on CPU the process's peak resident set
(`VmHWM`), printed with the resident set after the model was built (`VmRSS`) for reference.

    python benchmarks/bench_train.py --config small --device cpu [--steps 12 --warmup 3 --batch-size 4]
    python benchmarks/bench_train.py --config paper --device cuda [--gradient-checkpointing]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import LlamaConfig, TrainerCallback, TrainingArguments

from lavcap_hf import CedConfig, LavCapConfig, LavCapForConditionalGeneration, LavCapProcessor
from lavcap_hf.data import Clip, LavCapDataset
from lavcap_hf.synthetic import PLACES, SOUNDS, make_caption
from lavcap_hf.testing_utils import word_level_tokenizer
from lavcap_hf.training import LavCapTrainer, apply_lora

SAMPLING_RATE = 16000
CAPTIONS = [make_caption(sound, place) for sound in SOUNDS for place in PLACES]


def build_config(name: str, audio_token_id: int, video_token_id: int) -> LavCapConfig:
    if name == "small":
        audio = CedConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=3)
        text = LlamaConfig(
            vocab_size=1000,
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=4,
        )
        visual_dim = 192
    else:
        audio = CedConfig()
        text = LlamaConfig(vocab_size=32003, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32)
        visual_dim = 768
    text.bos_token_id, text.eos_token_id, text.pad_token_id = 1, 2, 0
    return LavCapConfig(
        audio_config=audio,
        vision_config=None,
        text_config=text,
        visual_embed_dim=visual_dim,
        audio_token_id=audio_token_id,
        video_token_id=video_token_id,
    )


def memory_status(field: str) -> float:
    """`VmHWM` / `VmRSS` of this process from /proc/self/status, in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(f"no {field} in /proc/self/status")


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (synchronised on CUDA)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


def clips(count: int, visual_dim: int, seed: int = 0) -> list[Clip]:
    """10 s of noise and 20 random visual embeddings per clip, with a synthetic caption."""
    rng = np.random.default_rng(seed)
    return [
        Clip(
            id=str(i),
            caption=CAPTIONS[i % len(CAPTIONS)],
            audio=(0.1 * rng.standard_normal(10 * SAMPLING_RATE)).astype(np.float32),
            sampling_rate=SAMPLING_RATE,
            video_embeds=rng.standard_normal((20, visual_dim)).astype(np.float32),
        )
        for i in range(count)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", choices=("small", "paper"), default="small")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps (at least 1)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers featurising the clips")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()
    if not 1 <= args.warmup < args.steps:
        parser.error("--warmup must be at least 1 and below --steps")
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = word_level_tokenizer(CAPTIONS)
    ids = tokenizer.convert_tokens_to_ids(["<|audio|>", "<|video|>"])
    config = build_config(args.config, *ids)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(args.device):
        model = LavCapForConditionalGeneration(config)
    torch.set_default_dtype(default_dtype)
    model = apply_lora(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    built_rss = memory_status("VmRSS")
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    processor = LavCapProcessor.from_model_config(config, tokenizer)
    dataset = LavCapDataset(
        clips(args.batch_size * args.steps, config.visual_embed_dim), num_frames=20, load_visual=True
    )
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=5e-6,
            weight_decay=1e-6,
            bf16=args.device == "cuda",
            use_cpu=args.device == "cpu",
            gradient_checkpointing=args.gradient_checkpointing,
            dataloader_num_workers=args.workers,
            remove_unused_columns=False,
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
        )
        trainer = LavCapTrainer(
            model=model,
            args=training_args,
            train_dataset=dataset,
            processing_class=processor,
            callbacks=[timer],
        )
        trainer.train()
    seconds = timer.ends[-1] - timer.ends[args.warmup - 1]
    steps = len(timer.ends) - args.warmup
    throughput = steps * args.batch_size / seconds
    if args.device == "cuda":
        memory = f"peak allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB ({torch.cuda.get_device_name()})"
    else:
        memory = (
            f"peak RSS {memory_status('VmHWM'):.2f} GiB (RSS after building the model {built_rss:.2f} GiB)"
        )
    print("| config | device | batch | steps timed | samples/s | s/step | memory |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    print(
        f"| {args.config} ({trainable / 1e6:.2f} M trainable of {total / 1e6:.1f} M) | {args.device} "
        f"({torch.get_num_threads()} threads) | {args.batch_size} | {steps} | {throughput:.2f} | "
        f"{seconds / steps:.3f} | {memory} |"
    )


if __name__ == "__main__":
    main()
