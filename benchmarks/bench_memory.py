"""GPU memory of LAVCap at the paper's size with the decoder in bf16, 8-bit and 4-bit, beside the cards it fits.

For each precision: the weights, the peak of captioning (batch 1 and 8 by default, beam 4, 200 new tokens, the
encoders and a prompt of about 100 tokens with the 84 fused vectors) and the peak of a training step at batch 4
with activation checkpointing (bf16: the LoRA recipe; 8-bit and 4-bit: QLoRA as `lavcap train --quantize` runs it,
peft's k-bit preparation casting the unquantized weights to float32, on precomputed CLIP embeddings as in the
paper's recipe), each marked against 8 / 12 / 16 / 24 GB cards.

Two modes:
- estimate (without CUDA, or `--estimate`): the model is built on the meta device; weights are its tensors' bytes,
  the decoder's linear layers counted with bitsandbytes' storage (`quantized_bytes`); the KV cache, activations,
  logits, gradients and optimizer state come from their shapes (`captioning_bytes`, `training_bytes`). The formulas
  are checked against this page's H100/H200 measurements in `tests/test_benchmarks.py`.
- measured (`--measure`, the default on CUDA): a random-weight model is saved once and loaded through
  `from_pretrained(quantization_config=...)` as users load it; weights are the memory it takes once loaded, peaks
  `torch.cuda.max_memory_allocated` (on a CPU, for the small config: the resident set's peak growth).

A card "fits" when the figure plus `CARD_RESERVE_GIB` (the CUDA context and the allocator's slack, which
`max_memory_allocated` does not count) is at most its size.

    python benchmarks/bench_memory.py                               # paper size: estimates without a GPU
    python benchmarks/bench_memory.py --device cuda                 # paper size: measured on a CUDA GPU
    python benchmarks/bench_memory.py --config quick --measure --device cpu --new-tokens 4   # smoke run, seconds
"""

from __future__ import annotations

import argparse
import functools
import gc
import math
import tempfile
from typing import Any, NamedTuple

import torch
import transformers
from bench_generate import build_config, build_inputs
from measure import build_model, peak_memory_mib, synchronize

from lavcap_hf import LavCapConfig, LavCapForConditionalGeneration
from lavcap_hf.testing.tokenizers import word_level_tokenizer

PRECISIONS = ("bf16", "8bit", "4bit")
CARDS_GIB = (8, 12, 16, 24)
CARD_RESERVE_GIB = 1.0
"""Memory a card needs besides the tensors: the CUDA context (0.3 to 0.5 GiB) and the caching allocator's slack."""

BNB_BLOCK = 64
"""Values per 4-bit block (one absmax each); bitsandbytes' default."""
BNB_NESTED_BLOCK = 256
"""Absmax values per block of their own 8-bit quantisation (double quantisation)."""


class Row(NamedTuple):
    precision: str
    what: str
    batch: int | None
    gib: float


# -- storage ------------------------------------------------------------------------------------------------------


def quantized_bytes(weight_shape: torch.Size, precision: str, double_quant: bool = True) -> int:
    """Bytes bitsandbytes keeps on the GPU for a linear layer's (out, in) weight.

    4-bit (NF4/FP4): two values per byte; one absmax per `BNB_BLOCK` values, float32, or with double quantisation
    one byte each plus a float32 absmax per `BNB_NESTED_BLOCK` of them, a 256-entry float32 code and an offset;
    the 16-entry float32 code of NF4. 8-bit (LLM.int8()): one byte per value and a float32 scale per output row.
    """
    out_features, in_features = weight_shape
    values = out_features * in_features
    if precision == "8bit":
        return values + 4 * out_features
    blocks = math.ceil(values / BNB_BLOCK)
    absmax = blocks + 4 * math.ceil(blocks / BNB_NESTED_BLOCK) + 4 * 256 + 4 if double_quant else 4 * blocks
    return math.ceil(values / 2) + absmax + 4 * 16


def decoder_linear_names(model: LavCapForConditionalGeneration) -> set[str]:
    """The layers `from_pretrained(quantization_config=...)` quantizes: the decoder's linear layers."""
    return {
        f"model.language_model.{name}"
        for name, module in model.model.language_model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def weight_bytes(model: LavCapForConditionalGeneration, precision: str, unquantized_itemsize: int = 2) -> int:
    """The weights' bytes at `precision`: the decoder's linear layers as `quantized_bytes` (bf16: 2 per value),
    every other tensor at `unquantized_itemsize` bytes per value (2 for bf16; 4 once peft's k-bit preparation has
    cast them to float32)."""
    quantized = decoder_linear_names(model) if precision != "bf16" else set()
    total = 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        owner, _, kind = name.rpartition(".")
        if owner in quantized and kind == "weight":
            total += quantized_bytes(tensor.shape, precision)
        else:
            total += tensor.numel() * unquantized_itemsize
    return total


# -- activations, KV cache, optimizer state ------------------------------------------------------------------------


def kv_bytes_per_token(text_config: Any, itemsize: int = 2) -> int:
    """Keys and values of one token of one sequence, every layer, in bf16."""
    head_dim = (
        getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    )
    return 2 * text_config.num_hidden_layers * text_config.num_key_value_heads * head_dim * itemsize


def layer_activation_bytes(text_config: Any, tokens: int, itemsize: int = 2) -> int:
    """What one decoder layer keeps for its backward over `tokens` tokens (or holds at once in a forward): about ten
    hidden-wide tensors (norms, q/k/v, attention output, residuals) and four intermediate-wide ones (gate, up, the
    activation, their product)."""
    return tokens * (10 * text_config.hidden_size + 4 * text_config.intermediate_size) * itemsize


def largest_decoder_weight(text_config: Any) -> int:
    """bf16 bytes of the decoder's largest linear weight: the one a quantized layer dequantizes for a prefill or a
    backward at a time."""
    return 2 * text_config.hidden_size * text_config.intermediate_size


def encoder_activation_bytes(config: LavCapConfig, clips: int, vision: bool = True, itemsize: int = 2) -> int:
    """The towers' largest transient over `clips` clips (CED over their patches; with `vision`, CLIP over all their
    frames): a hidden-wide and an intermediate-wide tensor of every token at once, twice."""
    audio = config.audio_config
    ced_tokens = audio.freq_patches * audio.time_patches + 1
    ced_width = audio.hidden_size * (1 + audio.mlp_ratio)
    total = int(clips * ced_tokens * ced_width * 2 * itemsize)
    tower = config.vision_config
    if vision and tower is not None:
        tokens = (tower.image_size // tower.patch_size) ** 2 + 1
        frames = clips * config.num_frames
        total = max(total, frames * tokens * (tower.hidden_size + tower.intermediate_size) * 2 * itemsize)
    return total


def captioning_bytes(
    config: LavCapConfig, precision: str, batch: int, beams: int, prompt_tokens: int, new_tokens: int
) -> int:
    """Peak bytes of `generate()` above the weights, its largest phase: encoding the clips; the prefill (one cache
    row per clip: the beams share it); or the last decoding step, with the whole KV cache of batch x beams rows, a
    copy of one layer's (the beams' reordering and the cache's growth each copy a layer) and the float32 scores of
    every row over the vocabulary (logits, log-softmax, beam scores: about four such)."""
    text = config.text_config
    per_token = kv_bytes_per_token(text)
    rows = batch * beams
    dequantized = largest_decoder_weight(text) if precision != "bf16" else 0
    encode = encoder_activation_bytes(config, batch)
    prefill = (
        batch * prompt_tokens * per_token + layer_activation_bytes(text, batch * prompt_tokens) + dequantized
    )
    cache = rows * (prompt_tokens + new_tokens) * per_token
    decode = cache + 2 * cache // text.num_hidden_layers + 4 * rows * text.vocab_size * 4
    return max(encode, prefill, decode)


def training_bytes(
    config: LavCapConfig,
    precision: str,
    batch: int,
    sequence_tokens: int,
    trainable: int,
    checkpointing: bool,
) -> int:
    """Peak bytes of a training step above the weights: the trainable tensors' gradients and AdamW state (float32,
    12 bytes per value), the decoder's activations (with checkpointing, each layer's input, float32 under QLoRA
    whose embeddings are cast to float32, and one layer's recomputed activations; without, every layer's), the
    logits in bf16 and their float32 copy, log-softmax and gradient, CED's activations (its blocks checkpointed
    alike), and a dequantized weight for a quantized layer's backward."""
    text = config.text_config
    tokens = batch * sequence_tokens
    residual_itemsize = 4 if precision != "bf16" else 2
    if checkpointing:
        decoder = text.num_hidden_layers * tokens * text.hidden_size * residual_itemsize
        decoder += layer_activation_bytes(text, tokens)
    else:
        decoder = text.num_hidden_layers * layer_activation_bytes(text, tokens)
    logits = tokens * text.vocab_size * (2 + 4 + 4 + 4)
    audio = encoder_activation_bytes(config, batch, vision=False)
    dequantized = 2 * largest_decoder_weight(text) if precision != "bf16" else 0
    return 12 * trainable + decoder + logits + audio + dequantized


def trainable_count(model: LavCapForConditionalGeneration) -> int:
    """Values the LoRA recipe trains (`apply_lora`): r 8 on CED's and the decoder's q/v, the projector, the logit
    scale; counted from the shapes, so it works on the meta device."""
    rank, count = 8, 0
    for name, module in model.named_modules():
        is_target = name.endswith(("q_proj", "v_proj")) and (
            name.startswith("model.audio_tower.") or name.startswith("model.language_model.")
        )
        if is_target and isinstance(module, torch.nn.Linear):
            count += rank * (module.in_features + module.out_features)
    projector = model.model.multi_modal_projector
    return count + sum(p.numel() for p in projector.parameters()) + 1


# -- estimates ----------------------------------------------------------------------------------------------------


def estimate_rows(args: argparse.Namespace, config: LavCapConfig, prompt_tokens: int) -> list[Row]:
    captioner = build_model(config, "meta", torch.bfloat16)
    trainee = build_model(without_vision(config), "meta", torch.bfloat16)
    trainable = trainable_count(trainee)
    sequence = prompt_tokens + args.caption_tokens
    rows = []
    for precision in args.precisions:
        weights = weight_bytes(captioner, precision)
        rows.append(Row(precision, "weights", None, weights / 2**30))
        for batch in args.batch_sizes:
            peak = weights + captioning_bytes(
                config, precision, batch, args.beams, prompt_tokens, args.new_tokens
            )
            rows.append(Row(precision, captioning_label(args), batch, peak / 2**30))
        # QLoRA's k-bit preparation casts every unquantized weight to float32; the LoRA recipe keeps bf16.
        training_weights = weight_bytes(trainee, precision, 4 if precision != "bf16" else 2)
        extra = training_bytes(config, precision, args.train_batch, sequence, trainable, checkpointing=True)
        rows.append(
            Row(precision, training_label(precision), args.train_batch, (training_weights + extra) / 2**30)
        )
    return rows


def without_vision(config: LavCapConfig) -> LavCapConfig:
    """The training set-up of the paper's recipe: precomputed CLIP embeddings, no vision tower."""
    return LavCapConfig.from_dict({**config.to_dict(), "vision_config": None})


def captioning_label(args: argparse.Namespace) -> str:
    return f"captioning, beam {args.beams}, {args.new_tokens} new tokens"


def training_label(precision: str) -> str:
    recipe = "LoRA" if precision == "bf16" else "QLoRA"
    return f"{recipe} training step, activation checkpointing"


# -- measurements -------------------------------------------------------------------------------------------------


def load(folder: str, precision: str, device: torch.device, **kwargs: Any) -> LavCapForConditionalGeneration:
    """The saved model as users load it: bf16, or its decoder quantized by `from_pretrained`."""
    from lavcap_hf.quantization import load_for_inference

    quantize = None if precision == "bf16" else precision
    return load_for_inference(folder, quantize, str(device), torch.bfloat16, **kwargs)


def resident_bytes(model: torch.nn.Module, device: torch.device) -> int:
    """What the loaded model takes: allocated CUDA memory, or on a CPU the bytes of its state dict (with bitsandbytes'
    block scales and quantisation maps)."""
    if device.type == "cuda":
        synchronize(device)
        return torch.cuda.memory_allocated(device)
    tensors = {t.data_ptr(): t for t in model.state_dict().values() if isinstance(t, torch.Tensor)}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def training_batch(
    config: LavCapConfig, tokenizer: Any, batch: int, caption_tokens: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """The processor's prompt followed by `caption_tokens` random caption ids, labelled, with random fbank and
    precomputed frame embeddings."""
    prompt = build_inputs(config, tokenizer, batch, device)
    generator = torch.Generator().manual_seed(1)
    words = min(config.audio_token_id, config.video_token_id)  # ids below the placeholders
    caption = torch.randint(4, words, (batch, caption_tokens), generator=generator).to(device)
    input_ids = torch.cat([prompt["input_ids"], caption], dim=1)
    labels = torch.full_like(input_ids, -100)
    labels[:, -caption_tokens:] = caption
    embeds = torch.randn(batch, config.num_frames, config.visual_embed_dim, generator=generator)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "input_features": prompt["input_features"],
        "video_embeds": embeds.to(device),
    }


def measured_training_gib(
    folder: str,
    config: LavCapConfig,
    tokenizer: Any,
    precision: str,
    args: argparse.Namespace,
    device: torch.device,
) -> float:
    """Peak of two optimizer steps (the first allocates AdamW's state) of the recipe at `precision`, from a start
    with nothing else on the device."""
    from lavcap_hf.lora import apply_lora
    from lavcap_hf.quantization import prepare_for_kbit_training
    from lavcap_hf.training.compat import enable_activation_checkpointing

    model = load(folder, precision, device)
    model.model.vision_tower = None  # the recipe trains on precomputed CLIP embeddings
    release(device)
    if precision == "bf16":
        enable_activation_checkpointing(model)
    else:
        model = prepare_for_kbit_training(model)
    model = apply_lora(model).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    batch = training_batch(config, tokenizer, args.train_batch, args.caption_tokens, device)

    def steps() -> None:
        for _ in range(2):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    weights = resident_bytes(model, device)
    _, peak_mib = peak_memory_mib(steps, device)
    return (weights + peak_mib * 2**20) / 2**30


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measured_captioning_rows(
    folder: str,
    config: LavCapConfig,
    tokenizer: Any,
    precision: str,
    args: argparse.Namespace,
    device: torch.device,
) -> list[Row]:
    """The loaded model's weights, and the peak of `generate()` at each captioning batch size."""
    model = load(folder, precision, device)
    weights = resident_bytes(model, device)
    rows = [Row(precision, "weights", None, weights / 2**30)]
    settings = {
        "num_beams": args.beams,
        "do_sample": False,
        "max_new_tokens": args.new_tokens,
        "min_new_tokens": args.new_tokens,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    for batch in args.batch_sizes:
        inputs = build_inputs(config, tokenizer, batch, device)
        for key in ("input_features", "pixel_values_videos"):
            inputs[key] = inputs[key].to(torch.bfloat16)
        _, peak_mib = peak_memory_mib(functools.partial(model.generate, **inputs, **settings), device)
        rows.append(Row(precision, captioning_label(args), batch, (weights + peak_mib * 2**20) / 2**30))
    return rows


def measured_rows(
    args: argparse.Namespace, config: LavCapConfig, tokenizer: Any, device: torch.device
) -> list[Row]:
    """Each precision's rows, from one random-weight model saved in bf16; each model is freed before the next."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="lavcap-memory-") as folder:
        torch.manual_seed(0)
        build_model(config, device, torch.bfloat16).save_pretrained(
            folder
        )  # built where it is fastest to fill
        release(device)
        for precision in args.precisions:
            rows += measured_captioning_rows(folder, config, tokenizer, precision, args, device)
            release(device)
            gib = measured_training_gib(folder, config, tokenizer, precision, args, device)
            rows.append(Row(precision, training_label(precision), args.train_batch, gib))
            release(device)
    return rows


# -- output -------------------------------------------------------------------------------------------------------


def fits(gib: float) -> list[str]:
    return ["yes" if gib + CARD_RESERVE_GIB <= card else "no" for card in CARDS_GIB]


def print_table(rows: list[Row]) -> None:
    cards = " | ".join(f"{card} GB" for card in CARDS_GIB)
    print(f"| decoder | what | batch | GiB | {cards} |")
    print("|---|---|---:|---:|" + "---|" * len(CARDS_GIB))
    for row in rows:
        batch = "-" if row.batch is None else str(row.batch)
        print(f"| {row.precision} | {row.what} | {batch} | {row.gib:.2f} | {' | '.join(fits(row.gib))} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        choices=("paper", "small", "quick"),
        default="paper",
        help="paper: the paper's sizes; small: a small LAVCap with LLaMA's vocabulary; quick: the tiny test model "
        "(checks the measuring path in seconds)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--estimate", action="store_true", help="estimate from shapes (default without CUDA)")
    mode.add_argument("--measure", action="store_true", help="load and run the model (default on CUDA)")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8], help="captioning batches")
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=200, help="new tokens per caption (min = max)")
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument(
        "--caption-tokens", type=int, default=20, help="caption tokens after the prompt in a training example"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)
    measure = args.measure or (device.type == "cuda" and not args.estimate)
    tokenizer = word_level_tokenizer([])
    config = build_config(args.config, tokenizer)
    prompt_tokens = build_inputs(config, tokenizer, 1, torch.device("cpu"))["input_ids"].shape[1]
    if measure:
        where = (
            torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device} (resident-set peaks)"
        )
        print(f"measured on {where}; torch {torch.__version__}, transformers {transformers.__version__}")
        rows = measured_rows(args, config, tokenizer, device)
    else:
        print(
            "estimates: weights of the model built on the meta device (decoder linears at bitsandbytes' storage); "
            "KV cache, activations, logits and optimizer state from their shapes"
        )
        rows = estimate_rows(args, config, prompt_tokens)
    print(
        f"config: {args.config}; prompt {prompt_tokens} tokens, training examples {prompt_tokens} + "
        f"{args.caption_tokens} tokens on precomputed CLIP embeddings; unquantized parts bf16; a card fits when the "
        f"figure plus {CARD_RESERVE_GIB:.1f} GiB (CUDA context, allocator slack) is at most its size\n"
    )
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
