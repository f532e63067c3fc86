"""`lavcap convert`: build from components, apply a released checkpoint when given, save the folder."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..lora import apply_lora, lavcap_lora_config
from .checkpoints import read_checkpoint
from .components import build_from_components
from .official import convert_official_checkpoint, official_config_kwargs, official_lora_settings
from .report import ConversionReport


def run_convert(args: argparse.Namespace) -> ConversionReport:
    """`lavcap convert`: build from components, apply a released checkpoint if given, save; prints the report."""
    raw = read_checkpoint(args.checkpoint) if args.checkpoint else {}
    config_kwargs = official_config_kwargs(raw)
    if args.fusion_type is not None:
        config_kwargs["fusion_type"] = args.fusion_type
    report = ConversionReport()
    model, tokenizer = build_from_components(
        args.audio,
        args.vision,
        args.text,
        args.tokenizer,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        report=report,
        num_frames=args.num_frames,
        visual_embed_dim=args.visual_embed_dim,
        **config_kwargs,
    )
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
        report.merge(convert_official_checkpoint(raw, model, lora_alpha=args.lora_alpha), "checkpoint:")
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    print(report.summary())
    print(f"saved to {output}" + (f" (adapters in {output / 'adapter'})" if args.adapters else ""))
    return report
