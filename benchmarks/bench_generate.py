"""Benchmark LAVCap captioning with `generate()`: encoders once per call against re-encoding at every step.

The variants share the weights and the inputs; all use beam search with the KV cache on and produce exactly
`--max-new-tokens` tokens (min = max, so EOS cannot end a run early and every variant does the same work):

- `cached`: the package as it is. `generate()` runs the encoders, the OT fusion and the projector once per call,
  on the B clips, and reads each prompt into the KV cache once per clip (all but its last token), then repeats the
  cache for the beams; the first step computes the logits of the last position only (`logits_to_keep=1`).
- `per-beam-prefill`: the same, except that the prompt is read once per beam (`share_prefill=False`): the
  fused vectors are repeated for the beams and the decoder reads B * num_beams prompts, as the released code does.
- `compiled` (CUDA only, by default): `generate(compile_decoding=True)`: a static cache and the decoding step
  compiled as one graph with CUDA graphs; its first (warm-up) call pays the compilation.
- `beam-copies`: encoding once per call, but after `generate()` has repeated the media for the beams: the
  encoders run on B * num_beams clips on the prefill step (`GenerationMixin.generate` called with the media,
  which `prepare_inputs_for_generation` passes on the prefill step only). The package did this before.
- `naive`: what an implementation that forwards the media at every step does. `prepare_inputs_for_generation`
  passes them on every step and `forward` re-runs CED, CLIP, the fusion and the projector on the B * num_beams
  clips each time. The text still uses the KV cache: on a decoding step the input is the new token only and the
  fused prompt vectors are in the cache already, so the re-computed vectors are dropped. The baseline thus adds
  exactly the repeated encoder work, and its captions equal `cached`'s (checked).

Per variant and batch size: median latency of a `generate()` call, captions per second, the share of that time
spent in `LavCapModel.forward` (encoders + fusion + projector, timed with forward hooks), and peak memory of one
call (`measure.peak_memory_mib`: CUDA allocations on a GPU, growth of the resident set's peak on CPU).
Inputs are random fbank (B, 1024, 64) and frames (B, 20, 3, 224, 224); the prompt is the processor's.

    python benchmarks/bench_generate.py [--threads 1] [--batch-sizes 1 8 32] [--naive-batch-sizes 1 8]
    python benchmarks/bench_generate.py --quick        # tiny config, a smoke run in seconds
    python benchmarks/bench_generate.py --paper-size   # CED-base, CLIP ViT-L/14, LLaMA-2-7B shapes, bf16, GPU
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
import transformers
from measure import (
    CLOCKS,
    add_clock_argument,
    add_peak_arguments,
    build_model,
    check_clock,
    cpu_name,
    device_peaks,
    format_limit,
    peak_memory_mib,
    synchronize,
)
from transformers import GenerationMixin

from lavcap_hf import LavCapConfig, LavCapForConditionalGeneration, LavCapProcessor
from lavcap_hf.testing.configs import paper_sized_config, small_lavcap_config, tiny_lavcap_config
from lavcap_hf.testing.tokenizers import word_level_tokenizer

VARIANTS = ("cached", "per-beam-prefill", "beam-copies", "naive", "compiled")
CUDA_ONLY_VARIANTS = ("compiled",)
"""Left out by default elsewhere: the library compiles generation on accelerators only."""
LLAMA_VOCAB = 32000
# The word-level prompt tokenizer has ~100 ids; the decoder keeps LLaMA's 32000-entry vocabulary so that the
# LM head and the beam search over it cost what they cost in the real model.

PROFILES: dict[str, dict[str, Any]] = {
    "small": {"batch_sizes": [1, 8, 32], "naive_batch_sizes": [1, 8], "max_new_tokens": 16, "repeats": 3},
    "quick": {"batch_sizes": [1, 2], "naive_batch_sizes": [2], "max_new_tokens": 3, "repeats": 1},
    "paper": {"batch_sizes": [1, 32], "naive_batch_sizes": [1], "max_new_tokens": 16, "repeats": 5},
}


def build_config(profile: str, tokenizer: Any) -> LavCapConfig:
    ids = tokenizer.convert_tokens_to_ids(["<|audio|>", "<|video|>"])
    if profile == "quick":
        return tiny_lavcap_config(vocab_size=len(tokenizer), audio_token_id=ids[0], video_token_id=ids[1])
    if profile == "paper":
        return paper_sized_config(*ids, vocab_size=LLAMA_VOCAB, pad_token_id=tokenizer.pad_token_id)
    return small_lavcap_config(*ids, vocab_size=LLAMA_VOCAB)


def build_inputs(
    config: LavCapConfig, tokenizer: Any, batch_size: int, device: torch.device, seed: int = 0
) -> dict[str, torch.Tensor]:
    """The processor's prompt for every clip, random fbank (B, frames, mel) and frames (B, V, 3, H, W), fp32."""
    processor = LavCapProcessor.from_model_config(config, tokenizer)
    prompt = tokenizer(processor.build_prompt(), add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([[tokenizer.bos_token_id, *prompt]] * batch_size)
    generator = torch.Generator().manual_seed(seed)
    audio, vision = config.audio_config, config.vision_config
    size = vision.image_size
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "input_features": torch.randn(
            batch_size, audio.target_length, audio.num_mel_bins, generator=generator
        ),
        "pixel_values_videos": torch.randn(batch_size, config.num_frames, 3, size, size, generator=generator),
    }
    return {key: value.to(device) for key, value in inputs.items()}


# -- variants -----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def reencoding_each_step(model: LavCapForConditionalGeneration) -> Iterator[None]:
    """Within the block, `model.generate()` re-runs the encoders, fusion and projector at every decoding step."""
    forward, prepare = model.forward, model.prepare_inputs_for_generation
    media_keys = ("input_features", "pixel_values_videos", "video_embeds")

    @functools.wraps(prepare)
    def prepare_every_step(*args: Any, **kwargs: Any) -> dict[str, Any]:
        media = {key: kwargs.pop(key, None) for key in media_keys}
        return {**prepare(*args, **kwargs), **media}

    @functools.wraps(forward)
    def reencoding_forward(*args: Any, **kwargs: Any) -> Any:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and cache.get_seq_length() > 0:
            # A decoding step: the naive cost. The prompt's fused vectors are in the KV cache already and the
            # input is the new token only, so the re-computed vectors have nowhere to go.
            model.get_multimodal_features(*(kwargs.pop(key, None) for key in media_keys))
        return forward(*args, **kwargs)

    model.forward, model.prepare_inputs_for_generation = reencoding_forward, prepare_every_step
    try:
        yield
    finally:
        del model.forward, model.prepare_inputs_for_generation


def variant_call(
    variant: str,
    model: LavCapForConditionalGeneration,
    inputs: dict[str, torch.Tensor],
    **generate_kwargs: Any,
) -> Callable[[], torch.Tensor]:
    """A closure running one `generate()` call of `variant`; it returns the B sequences (prompt + new tokens)."""
    if variant == "beam-copies":
        # GenerationMixin's own generate(): the media reach `forward` on the prefill step, repeated for the beams.
        return functools.partial(GenerationMixin.generate, model, **inputs, **generate_kwargs)
    if variant == "naive":

        def naive() -> torch.Tensor:
            with reencoding_each_step(model):
                # GenerationMixin's own generate(), so that a model-level override cannot encode up front.
                return GenerationMixin.generate(model, **inputs, **generate_kwargs)

        return naive
    if variant == "compiled":
        return functools.partial(model.generate, **inputs, **generate_kwargs, compile_decoding=True)
    if variant == "per-beam-prefill":
        return functools.partial(model.generate, **inputs, **generate_kwargs, share_prefill=False)
    return functools.partial(model.generate, **inputs, **generate_kwargs)


# -- measurement --------------------------------------------------------------------------------------------------


class EncoderTimer:
    """Time on `clock` spent in `LavCapModel.get_multimodal_features` (encoders + fusion + projector): the method
    is wrapped on the instance, so every caller (`forward`, `generate`) goes through the timer."""

    def __init__(self, model: torch.nn.Module, device: torch.device, clock: Callable[[], float]) -> None:
        self.device = device
        self.clock = clock
        self.seconds = 0.0
        encode = model.get_multimodal_features

        @functools.wraps(encode)
        def timed(*args: Any, **kwargs: Any) -> Any:
            synchronize(self.device)
            start = self.clock()
            try:
                return encode(*args, **kwargs)
            finally:
                synchronize(self.device)
                self.seconds += self.clock() - start

        model.get_multimodal_features = timed


def measure(
    calls: dict[str, Callable[[], torch.Tensor]], timer: EncoderTimer, device: torch.device, repeats: int
) -> dict[str, dict[str, Any]]:
    """Per variant: one warm-up call (its peak memory and sequences), then `repeats` timed calls, the variants in
    turn so that load changes on a shared machine hit all of them alike: median latency and encoders' share."""
    results = {}
    for variant, call in calls.items():
        sequences, peak = peak_memory_mib(call, device)
        results[variant] = {"peak_mib": peak, "sequences": sequences, "latencies": [], "shares": []}
    for _ in range(repeats):
        for variant, call in calls.items():
            timer.seconds = 0.0
            synchronize(device)
            start = timer.clock()
            call()
            synchronize(device)
            elapsed = timer.clock() - start
            results[variant]["latencies"].append(elapsed)
            results[variant]["shares"].append(timer.seconds / elapsed)
    for result in results.values():
        result["latency"] = statistics.median(result.pop("latencies"))
        result["encoder_share"] = statistics.median(result.pop("shares"))
    return results


# -- report -------------------------------------------------------------------------------------------------------


def param_count(*modules: torch.nn.Module | None) -> str:
    """Parameters of the given modules together, with thousands separators; "-" when there is none."""
    present = [module for module in modules if module is not None]
    return f"{sum(p.numel() for m in present for p in m.parameters()):,}" if present else "-"


def describe(config: LavCapConfig, model: LavCapForConditionalGeneration, prompt_length: int) -> str:
    audio, vision, text = config.audio_config, config.vision_config, config.text_config
    frame_tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    return (
        f"CED: fbank {audio.target_length}x{audio.num_mel_bins} -> {audio.freq_patches * audio.time_patches} patches, "
        f"{audio.hidden_size}-d x {audio.num_hidden_layers} layers ({param_count(model.model.audio_tower)} params)\n"
        f"CLIP: {config.num_frames} frames of {vision.image_size} px / {vision.patch_size} px patches -> "
        f"{frame_tokens} tokens each, {vision.hidden_size}-d x {vision.num_hidden_layers} layers "
        f"({param_count(model.model.vision_tower)} params)\n"
        f"LLaMA: {text.hidden_size}-d x {text.num_hidden_layers} layers, vocab {text.vocab_size} "
        f"({param_count(model.language_model, model.lm_head)} params)\n"
        f"fused tokens per clip: {sum(config.placeholder_counts)}; prompt: {prompt_length} tokens"
    )


TABLE_HEADER = (
    "| variant | batch | latency (ms) | captions/s | encoders' share | peak MiB | captions = cached "
    "| limit (ms) | latency / limit |\n"
    "|---|---:|---:|---:|---:|---:|---|---:|---:|"
)


def print_row(row: dict[str, Any], limit: float | None) -> None:
    limit_ms, ratio = format_limit(limit, row["latency"])
    print(
        f"| {row['variant']} | {row['batch']} | {1e3 * row['latency']:.1f} | "
        f"{row['batch'] / row['latency']:.2f} | {100 * row['encoder_share']:.0f}% | {row['peak_mib']:.0f} | "
        f"{row['same']} | {limit_ms} | {ratio} |",
        flush=True,
    )


def memory_bound_seconds(
    model: LavCapForConditionalGeneration,
    config: LavCapConfig,
    clips: int,
    beams: int,
    prompt_length: int,
    new_tokens: int,
    bandwidth: float | None,
) -> float | None:
    """The least time one `generate()` call can take when every weight and cached key/value is read from memory
    once per decoding step at `bandwidth` bytes/s: the encoders' weights once, the decoder's weights on the prefill
    and on each of the `new_tokens - 1` later steps, and the KV cache of B * beams rows as it grows. Compute, the
    encoders' activations and the logits are left out, so real runs stay above it."""
    if bandwidth is None:
        return None

    def weight_bytes(*modules: torch.nn.Module | None) -> int:
        return sum(p.numel() * p.element_size() for m in modules if m is not None for p in m.parameters())

    text = config.text_config
    itemsize = model.lm_head.weight.element_size()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * itemsize
    steps = range(prompt_length, prompt_length + new_tokens - 1)  # cached lengths read by the later steps
    kv_bytes = clips * beams * kv_per_token * sum(steps)
    encoders = weight_bytes(model.model.audio_tower, model.model.vision_tower, model.model.fusion)
    decoder = weight_bytes(model.language_model, model.lm_head)
    return (encoders + new_tokens * decoder + kv_bytes) / bandwidth


RATIOS = (
    ("naive", "cached"),
    ("beam-copies", "cached"),
    ("per-beam-prefill", "cached"),
    ("cached", "compiled"),
)
"""(slower, faster) pairs whose latency ratio is printed per batch."""


def print_ratios(rows: list[dict[str, Any]]) -> None:
    latency = {(row["variant"], row["batch"]): row["latency"] for row in rows}
    for batch in sorted({row["batch"] for row in rows}):
        parts = [
            f"{slow} / {fast} = {latency[slow, batch] / latency[fast, batch]:.2f}x"
            for slow, fast in RATIOS
            if (slow, batch) in latency and (fast, batch) in latency
        ]
        if parts:
            print(f"batch {batch}: " + ", ".join(parts))


# -- main ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny random config, for a smoke run")
    size.add_argument(
        "--paper-size",
        action="store_true",
        help="CED-base, CLIP ViT-L/14, LLaMA-2-7B-shaped decoder, bf16, random weights; needs a CUDA GPU",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="default fp32, bf16 on paper size"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+")
    parser.add_argument("--naive-batch-sizes", type=int, nargs="*", help="batch sizes that also run `naive`")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        help=f"default: all ({', '.join(CUDA_ONLY_VARIANTS)} on CUDA only)",
    )
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    add_clock_argument(parser)
    add_peak_arguments(parser)
    args = parser.parse_args(argv)
    check_clock(parser, args.clock, args.device)
    args.profile = "paper" if args.paper_size else "quick" if args.quick else "small"
    if args.variants is None:
        on_cuda = torch.device(args.device).type == "cuda"
        args.variants = [v for v in VARIANTS if on_cuda or v not in CUDA_ONLY_VARIANTS]
    for key, value in PROFILES[args.profile].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.paper_size else "float32"
    return args


def benchmark_batch(
    model: LavCapForConditionalGeneration,
    inputs: dict[str, torch.Tensor],
    variants: list[str],
    generate_kwargs: dict[str, Any],
    timer: EncoderTimer,
    repeats: int,
) -> list[dict[str, Any]]:
    """One row per variant for one batch, with whether its generated tokens equal `cached`'s."""
    calls = {variant: variant_call(variant, model, inputs, **generate_kwargs) for variant in variants}
    results = measure(calls, timer, model.device, repeats)
    new_tokens = generate_kwargs["max_new_tokens"]
    captions = {variant: result.pop("sequences")[:, -new_tokens:] for variant, result in results.items()}
    rows = []
    for variant, result in results.items():
        if variant == "cached":
            same = "reference"
        elif "cached" not in captions:
            same = "not compared"
        else:
            same = "yes" if torch.equal(captions[variant], captions["cached"]) else "no"
        rows.append({"variant": variant, "batch": len(inputs["input_ids"]), "same": same, **result})
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    tokenizer = word_level_tokenizer([])
    config = build_config(args.profile, tokenizer)
    prompt_length = build_inputs(config, tokenizer, 1, torch.device("cpu"))["input_ids"].shape[1]
    if args.paper_size and device.type != "cuda":
        model = build_model(config, "meta", dtype)
        print(f"paper size, built on the meta device:\n{describe(config, model, prompt_length)}")
        sys.exit(
            f"--paper-size needs a CUDA GPU (the bf16 weights alone take "
            f"{sum(p.numel() for p in model.parameters()) * dtype.itemsize / 2**30:.1f} GiB); "
            f"got --device {args.device}"
        )
    torch.manual_seed(0)
    model = build_model(config, device, dtype).eval()
    timer = EncoderTimer(model.model, device, CLOCKS[args.clock])
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({cpu_name()}), {torch.get_num_threads()} thread(s)"
    )
    print(
        f"device: {where}; dtype: {args.dtype}; torch {torch.__version__}; transformers {transformers.__version__}"
    )
    print(f"config: {args.profile}\n{describe(config, model, prompt_length)}")
    print(
        f"generate: beam {args.num_beams}, {args.max_new_tokens} new tokens (min = max), KV cache on; "
        f"median of {args.repeats} calls after one warm-up call per variant; {args.clock} clock\n"
    )
    generate_kwargs = {
        "num_beams": args.num_beams,
        "do_sample": False,
        "max_new_tokens": args.max_new_tokens,
        "min_new_tokens": args.max_new_tokens,
        "use_cache": True,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    rows = []
    bandwidth, _ = device_peaks(device, args.peak_bandwidth, args.peak_tflops)
    print(
        "limit: every weight and cached key/value read once per step at "
        + (f"{bandwidth / 1e12:.2f} TB/s" if bandwidth else "an unknown bandwidth (give --peak-bandwidth)")
        + "\n"
    )
    print(TABLE_HEADER)
    for batch in args.batch_sizes:
        inputs = build_inputs(config, tokenizer, batch, device)
        variants = [v for v in args.variants if v != "naive" or batch in args.naive_batch_sizes]
        limit = memory_bound_seconds(
            model, config, batch, args.num_beams, prompt_length, args.max_new_tokens, bandwidth
        )
        for row in benchmark_batch(model, inputs, variants, generate_kwargs, timer, args.repeats):
            print_row(row, limit)
            rows.append(row)
        del inputs
    print()
    print_ratios(rows)


if __name__ == "__main__":
    main()
