"""`lavcap convert`: build from components, apply a released checkpoint when given, save the folder."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..lora import apply_lora, lavcap_lora_config
from .checkpoints import read_checkpoint
from .components import FLOAT32_PARTS, build_from_components, cast_model, part_dtypes
from .official import convert_official_checkpoint, official_config_kwargs, official_lora_settings
from .report import ConversionReport


def run_convert(args: argparse.Namespace) -> ConversionReport:
    """`lavcap convert`: build from components, apply a released checkpoint if given, save; prints the report.

    Each tensor is rounded at most once: the language model is read in its stored dtype and CED, CLIP and the
    projector in float32, the LoRA updates are merged in float32, and only then is each part cast to its final
    dtype: `--dtype` (default: the language model's stored dtype) for the language model and CLIP, float32 for
    `FLOAT32_PARTS` unless `--cast-all`.
    """
    raw = read_checkpoint(args.checkpoint) if args.checkpoint else {}
    config_kwargs = official_config_kwargs(raw)
    if args.fusion_type is not None:
        config_kwargs["fusion_type"] = args.fusion_type
    report = ConversionReport()
    float32_modules = () if args.cast_all else FLOAT32_PARTS
    model, tokenizer = build_from_components(
        args.audio,
        args.vision,
        args.text,
        args.tokenizer,
        dtype="auto",
        report=report,
        float32_modules=float32_modules,
        num_frames=args.num_frames,
        visual_embed_dim=args.visual_embed_dim,
        **config_kwargs,
    )
    dtype = getattr(torch, args.dtype) if args.dtype else model.language_model.dtype
    output = Path(args.output_dir)
    if args.adapters and not raw:
        raise ValueError("--adapters needs --checkpoint")
    if args.adapters:
        rank, alpha = official_lora_settings(raw)
        alpha = args.lora_alpha if args.lora_alpha is not None else alpha
        peft_model = apply_lora(model, lavcap_lora_config(r=rank, lora_alpha=alpha))
        report.merge(convert_official_checkpoint(raw, peft_model, lora_alpha=alpha), "checkpoint:")
        peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path = str(output)
        peft_model.save_pretrained(output / "adapter")
        # Without the LoRA layers; the trained copies of `modules_to_save` (projector, fusion) stay in place.
        model = peft_model.unload()
    elif raw:
        merged = convert_official_checkpoint(raw, model, args.lora_alpha, merged_dtype=torch.float32)
        report.merge(merged, "checkpoint:")
    cast_model(model, dtype, float32_modules)
    report.dtypes = part_dtypes(model)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    print(report.summary())
    print(f"saved to {output}" + (f" (adapters in {output / 'adapter'})" if args.adapters else ""))
    return report
