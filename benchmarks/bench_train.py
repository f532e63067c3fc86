"""Training throughput and peak memory of LAVCap fine-tuning with `LavCapTrainer` (LoRA, OT loss, collator).

Two configurations, random weights (nothing is downloaded):
- `small` (CPU-sized): `lavcap_hf.testing.configs.small_lavcap_config`: CED 4 x 128 on full-length clips (10 s audio
  -> 1024 x 64 fbank, 64 audio tokens), a 4 x 128 CLIP tower, LLaMA 4 x 256 with a 32003-token vocabulary;
- `paper` (GPU): `lavcap_hf.testing.configs.paper_sized_config`: CED-base (12 x 768), CLIP ViT-L/14, LLaMA-2-7B
  dimensions (32 x 4096); frozen weights in bf16, LoRA adapters, projector and logit scale in float32, bf16
  autocast - the paper's training set-up.

`--visual embeds` (default, the paper's recipe) feeds 20 precomputed CLIP embeddings per clip
(examples/extract_visual_features.py); `--visual frames` feeds 20 random 256 x 256 frames per clip, preprocessed by
the collator and encoded by the frozen CLIP tower inside every step.

Each step is a real Trainer step: clips are featurised by the collator (fbank + SpecAugment, random instruction,
frames) in the DataLoader, then forward (OT fusion, LM), backward, AdamW. Throughput is measured over the steps
after `--warmup`. Peak memory: on CUDA `torch.cuda.max_memory_allocated`; on CPU the process's peak resident set
(`VmHWM`), printed with the resident set after the model was built (`VmRSS`) for reference.

The OT module's share of a step: after training, the OT fusion (normalisation, similarity, Sinkhorn, alignment
losses, OT attention) runs forward and backward on the audio and visual tokens of the last training batch, in the
step's dtype and autocast, with a random gradient on the fused tokens; its median time over the median step time.

    python benchmarks/bench_train.py --config small --device cpu [--steps 12 --warmup 3 --batch-size 4]
    python benchmarks/bench_train.py --config paper --device cuda [--gradient-checkpointing] [--visual frames]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import torch
from measure import add_peak_arguments, build_model, device_peaks, format_limit, status_mib, synchronize
from transformers import TrainerCallback, TrainingArguments

from lavcap_hf import LavCapConfig, LavCapProcessor
from lavcap_hf.data.clips import Clip
from lavcap_hf.data.dataset import LavCapDataset
from lavcap_hf.data.synthetic import PLACES, SOUNDS, make_caption
from lavcap_hf.lora import apply_lora
from lavcap_hf.model.optimal_transport import OptimalTransportFusion
from lavcap_hf.testing.configs import paper_sized_config, small_lavcap_config
from lavcap_hf.testing.tokenizers import word_level_tokenizer
from lavcap_hf.training.compat import activation_checkpointing_argument
from lavcap_hf.training.trainer import LavCapTrainer

SAMPLING_RATE = 16000
FRAME_SIZE = 256
CAPTIONS = [make_caption(sound, place) for sound in SOUNDS for place in PLACES]


def build_config(name: str, with_vision: bool, audio_token_id: int, video_token_id: int) -> LavCapConfig:
    """`paper` or `small`; `with_vision` adds the CLIP tower (for `--visual frames`)."""
    build = paper_sized_config if name == "paper" else small_lavcap_config
    return build(audio_token_id, video_token_id, with_vision=with_vision)


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (synchronised on CUDA)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


class FusionInputs:
    """Keeps the (audio, visual) tokens that the OT fusion module last received, detached."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.module: OptimalTransportFusion | None = None
        self.tokens: tuple[torch.Tensor, torch.Tensor] | None = None
        for module in model.modules():
            if isinstance(module, OptimalTransportFusion):  # peft keeps a frozen original and a trained copy
                module.register_forward_pre_hook(self._record)

    def _record(self, module: OptimalTransportFusion, inputs: tuple[Any, ...]) -> None:
        audio, visual = inputs[:2]
        self.module = module
        self.tokens = (audio.detach().requires_grad_(audio.requires_grad), visual.detach())


def ot_module_ms(recorded: FusionInputs, dtype: torch.dtype, repeats: int = 20) -> float:
    """Median time (ms) of the OT fusion's forward + backward on the last batch's tokens, as in a training step."""
    audio, visual = recorded.tokens
    device = audio.device
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    fused_grad = None
    times = []
    for _ in range(repeats + 1):  # the first run is a warm-up
        synchronize(device)
        start = time.perf_counter()
        with autocast:
            out = recorded.module(audio, visual)
        if fused_grad is None:
            fused_grad = torch.randn_like(out.fused)
        torch.autograd.backward((out.loss_v + out.loss_a, out.fused), (None, fused_grad))
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[1:])


def clips(count: int, visual_dim: int, frames: bool, seed: int = 0) -> list[Clip]:
    """10 s of noise and 20 random frames (`frames`) or visual embeddings per clip, with a synthetic caption."""
    rng = np.random.default_rng(seed)
    return [
        Clip(
            id=str(i),
            caption=CAPTIONS[i % len(CAPTIONS)],
            audio=(0.1 * rng.standard_normal(10 * SAMPLING_RATE)).astype(np.float32),
            sampling_rate=SAMPLING_RATE,
            video=rng.integers(0, 256, (20, FRAME_SIZE, FRAME_SIZE, 3), dtype=np.uint8) if frames else None,
            video_embeds=None if frames else rng.standard_normal((20, visual_dim)).astype(np.float32),
        )
        for i in range(count)
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    parser.add_argument(
        "--visual",
        choices=("embeds", "frames"),
        default="embeds",
        help="precomputed CLIP embeddings (the paper's recipe) or frames through the frozen CLIP tower",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        help="frozen weights and autocast; default bfloat16 on CUDA, float32 on CPU",
    )
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers featurising the clips")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    add_peak_arguments(parser)
    args = parser.parse_args(argv)
    if not 1 <= args.warmup < args.steps:
        parser.error("--warmup must be at least 1 and below --steps")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = word_level_tokenizer(CAPTIONS)
    ids = tokenizer.convert_tokens_to_ids(["<|audio|>", "<|video|>"])
    config = build_config(args.config, args.visual == "frames", *ids)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    model = apply_lora(build_model(config, args.device, dtype))
    fusion_inputs = FusionInputs(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    built_rss = status_mib("VmRSS") / 1024
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    processor = LavCapProcessor.from_model_config(config, tokenizer)
    dataset = LavCapDataset(
        clips(args.batch_size * args.steps, config.visual_embed_dim, args.visual == "frames"),
        num_frames=20,
        load_visual=True,
    )
    timer = StepTimer()
    decoder_tokens: list[int] = []  # tokens the decoder reads per forward: batch x sequence length
    model.get_base_model().language_model.register_forward_pre_hook(
        lambda module, args, kwargs: decoder_tokens.append(kwargs["inputs_embeds"].shape[:2].numel()),
        with_kwargs=True,
    )
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=5e-6,
            weight_decay=1e-6,
            bf16=dtype == torch.bfloat16,
            use_cpu=args.device == "cpu",
            dataloader_num_workers=args.workers,
            remove_unused_columns=False,
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            **{activation_checkpointing_argument(): args.gradient_checkpointing},
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
    step_times = np.diff(timer.ends[args.warmup - 1 :])
    step_ms, mean_ms = 1e3 * statistics.median(step_times), 1e3 * float(np.mean(step_times))
    _, peak_flops = device_peaks(torch.device(args.device), args.peak_bandwidth, args.peak_tflops)
    limit = (
        step_flops(model, config, args, statistics.median(decoder_tokens)) / peak_flops
        if peak_flops
        else None
    )
    limit_ms, over_limit = format_limit(limit, step_ms / 1e3)
    ot_ms = ot_module_ms(fusion_inputs, dtype)
    if args.device == "cuda":
        memory = f"peak allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB ({torch.cuda.get_device_name()})"
    else:
        memory = f"peak RSS {status_mib('VmHWM') / 1024:.2f} GiB (RSS after building the model {built_rss:.2f} GiB)"
    checkpointing = ", gradient checkpointing" if args.gradient_checkpointing else ""
    print(
        "| config | visual | device | dtype | batch | steps timed | samples/s | median step (ms) | mean / median "
        "| limit (ms) | median / limit | OT module (ms) | OT share | memory |"
    )
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    print(
        f"| {args.config} ({trainable / 1e6:.2f} M trainable of {total / 1e6:.1f} M{checkpointing}) | "
        f"{args.visual} | {args.device} ({torch.get_num_threads()} threads) | {str(dtype)[6:]} | {args.batch_size} "
        f"| {steps} | {throughput:.2f} | {step_ms:.1f} | {mean_ms / step_ms:.2f} | {limit_ms} | {over_limit} "
        f"| {ot_ms:.2f} | {100 * ot_ms / step_ms:.1f}% | {memory} |"
    )
    print(
        "limit: the step's matrix products at the device's dense bf16 peak"
        + ("" if peak_flops else " (unknown here: give --peak-tflops)")
        + "; the decoder's and CED's weights are frozen (LoRA), so the backward costs about one more forward"
    )


def step_flops(
    model: torch.nn.Module, config: LavCapConfig, args: argparse.Namespace, decoder_tokens: float
) -> float:
    """Multiply-adds x 2 of one training step: 2 FLOPs per weight and token forward, twice that with the backward
    through the activations (decoder and CED, which carry the adapters); CLIP, when the frames go through it,
    runs forward only (frozen, outside the backward)."""
    base = model.get_base_model()

    def weights(module: torch.nn.Module | None) -> int:
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    decoder = weights(base.language_model) + weights(base.lm_head)
    audio_tokens = args.batch_size * config.audio_config.freq_patches * config.audio_config.time_patches
    flops = 4 * decoder * decoder_tokens + 4 * weights(base.model.audio_tower) * audio_tokens
    if args.visual == "frames":
        vision = config.vision_config
        frame_tokens = (
            args.batch_size * config.num_frames * ((vision.image_size // vision.patch_size) ** 2 + 1)
        )
        flops += 2 * weights(base.model.vision_tower) * frame_tokens
    return flops


if __name__ == "__main__":
    main()
