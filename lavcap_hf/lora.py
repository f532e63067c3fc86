"""LoRA set-up (peft) for LAVCap and the helpers that reload or merge trained adapters.

The paper's adapters: LoRA r 8 / alpha 32 / dropout 0.1 on the q/v projections of CED and of the LLM; the projector
and the fusion are trained in full (`modules_to_save`), CLIP and the base weights stay frozen.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn
from transformers import PreTrainedModel

from .model.configuration_lavcap import LavCapGenerationConfig
from .model.modeling_lavcap import RUNNING_STAT_NORMS, LavCapForConditionalGeneration
from .model.processing_lavcap import LavCapProcessor
from .quantization import is_quantized_layer

TRAINED_MODULES = ("multi_modal_projector", "fusion")
"""Modules trained in full next to the adapters: the projector, and the fusion (OT logit scale, cross-attention)."""


PAPER_TARGET_MODULES = ("q_proj", "v_proj")
"""The paper's LoRA targets in CED and in LLaMA: the query and value projections."""


def decoder_lora_targets(text_model_type: str | None) -> tuple[str, ...]:
    """LoRA targets for a decoder family: peft's defaults for it (`c_attn` for GPT-2, `query_key_value` for GPT-NeoX,
    q/v for LLaMA, Qwen2, Mistral, Gemma, OPT, ...), the paper's q/v where peft has none or no family is given."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    return tuple(
        TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(text_model_type) or PAPER_TARGET_MODULES
    )


def lavcap_lora_config(
    r: int = 8,
    lora_alpha: int = 32,
    lora_dropout: float = 0.1,
    audio_target_modules: Sequence[str] = PAPER_TARGET_MODULES,
    text_target_modules: Sequence[str] | None = None,
    text_model_type: str | None = None,
) -> LoraConfig:
    """The paper's adapters: LoRA on CED's and the LLM's q/v projections (r 8, alpha 32, dropout 0.1).

    `text_target_modules` None: the targets of `decoder_lora_targets(text_model_type)`, the paper's q/v for LLaMA
    (and where no family is given), peft's defaults for the families whose attention is named otherwise.
    CLIP's attention also has `q_proj`/`v_proj`; the pattern names the audio tower and the language model only,
    so the frozen vision tower gets no adapters.
    """
    if text_target_modules is None:
        text_target_modules = decoder_lora_targets(text_model_type)
    audio = "|".join(audio_target_modules)
    text = "|".join(text_target_modules)
    pattern = rf"(.*\.)?(model\.audio_tower\..*\.({audio})|language_model\..*\.({text}))"
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=pattern,
        modules_to_save=list(TRAINED_MODULES),
    )


def running_stat_modules(model: nn.Module) -> list[str]:
    """Names of the BatchNorm layers whose running statistics change in training mode (CED's input `init_bn`)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, RUNNING_STAT_NORMS) and module.track_running_stats
    ]


def apply_lora(model: LavCapForConditionalGeneration, lora_config: LoraConfig | None = None) -> PeftModel:
    """Freeze every base weight (CED, CLIP, LLM) and add the adapters; the projector and fusion stay trainable.

    Without `lora_config`, the paper's adapters with the decoder family's targets (`lavcap_lora_config`). Targets
    meant for the language model that reach none of its layers are a ValueError naming its layers.

    BatchNorm layers with running statistics (CED's input normalisation) keep updating them in training mode, as in
    the released code; they are added to `modules_to_save` with frozen affine weights, so that checkpoints and
    merged models carry the statistics. Trainable tensors are kept in float32 when the base model is half precision.
    """
    lora_config = lora_config or lavcap_lora_config(text_model_type=model.config.text_config.model_type)
    _check_decoder_targets(model, lora_config)
    model.requires_grad_(False)
    norms = [name for name in running_stat_modules(model) if name not in (lora_config.modules_to_save or [])]
    lora_config = dataclasses.replace(
        lora_config, modules_to_save=[*(lora_config.modules_to_save or []), *norms]
    )
    peft_model = get_peft_model(model, lora_config)
    for name, parameter in peft_model.named_parameters():
        if any(f"{norm}.modules_to_save." in name for norm in norms):
            parameter.requires_grad_(False)
        elif parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    return peft_model


def _check_decoder_targets(model: LavCapForConditionalGeneration, lora_config: LoraConfig) -> None:
    """ValueError, before anything is changed, where targets meant for the language model (layer names, or a pattern
    naming `language_model`) match none of its layers: peft would adapt the rest without a word."""
    targets = lora_config.target_modules
    if targets is None or (isinstance(targets, str) and "language_model" not in targets):
        return
    prefix = f"{model.base_model_prefix}.language_model."
    layers = [
        f"{prefix}{name}" for name, layer in model.language_model.named_modules() if _is_adaptable(layer)
    ]
    if any(check_target_module_exists(lora_config, name) for name in layers):
        return
    names = sorted({name.rsplit(".", 1)[-1] for name in layers})
    raise ValueError(
        f"the LoRA targets {targets!r} match no layer of the language model ({model.config.text_config.model_type}); "
        f"its linear layers are named {', '.join(names)}: pass the ones to adapt as "
        "lavcap_lora_config(text_target_modules=...)"
    )


def _is_adaptable(layer: nn.Module) -> bool:
    """A layer LoRA can adapt: a linear layer, or the transposed one GPT-2's family uses (`Conv1D`)."""
    return isinstance(layer, nn.Linear) or type(layer).__name__ == "Conv1D"


def merge_adapters(model: PeftModel) -> nn.Module:
    """`merge_and_unload`, refused where the adapters sit on a quantized decoder (QLoRA): peft would dequantize each
    weight, add the update and quantize it again, losing most of a small update. Such adapters merge onto the
    unquantized model they were trained from (`merge_checkpoint`). The adapters are float32 (`apply_lora`, and
    peft's loading of half-precision ones), so the update is added in float32 and rounded once to the weight's dtype.
    """
    if any(is_quantized_layer(module) for module in model.modules()):
        raise ValueError(
            "the adapters sit on a quantized decoder: merge them onto the unquantized model they were trained from "
            "(lavcap_hf.lora.merge_checkpoint(checkpoint, output_dir), which loads it unquantized)"
        )
    return model.merge_and_unload()


def merge_and_save(
    model: PeftModel, output_dir: str | os.PathLike, processor: LavCapProcessor | None = None
) -> LavCapForConditionalGeneration:
    """Fold the adapters into the base weights (in place: `model` is unwrapped; `merge_adapters`) and save a plain
    model folder, with the processor, that `LavCapForConditionalGeneration.from_pretrained` and `pipeline(...)`
    load."""
    merged = merge_adapters(model)
    merged.save_pretrained(output_dir)
    if processor is not None:
        processor.save_pretrained(output_dir)
    return merged


def load_trained(
    checkpoint: str | os.PathLike,
    base_model: str | os.PathLike | PreTrainedModel | None = None,
    merge: bool = False,
    **from_pretrained_kwargs: Any,
) -> PeftModel | LavCapForConditionalGeneration:
    """A fine-tuned model from a training checkpoint (or a finished run's output folder).

    Args:
        checkpoint: folder with `adapter_config.json` and the adapter weights (what the Trainer saves); its
            `generation_config.json`, where there is one, replaces the base model's.
        base_model: the model training started from, loaded or a folder; default: the base path recorded in
            `adapter_config.json`.
        merge: fold the adapters into the weights (`merge_adapters`) and return a plain
            `LavCapForConditionalGeneration`; the base model must then be unquantized.
        from_pretrained_kwargs: for the base model's `from_pretrained` (dtype, device_map, ...).
    """
    if not isinstance(base_model, PreTrainedModel):
        path = base_model or PeftConfig.from_pretrained(checkpoint).base_model_name_or_path
        if not path:
            raise ValueError(f"{checkpoint}: adapter_config.json names no base model; pass base_model=")
        base_model = LavCapForConditionalGeneration.from_pretrained(path, **from_pretrained_kwargs)
    try:  # the Trainer saves the model's generation config next to the adapters
        base_model.generation_config = LavCapGenerationConfig.from_pretrained(checkpoint)
    except OSError:  # a checkpoint without one decodes as its base model does
        pass
    model = PeftModel.from_pretrained(base_model, checkpoint)
    return merge_adapters(model) if merge else model


def merge_checkpoint(
    checkpoint: str | os.PathLike, output_dir: str | os.PathLike, base_model: str | os.PathLike | None = None
) -> LavCapForConditionalGeneration:
    """Merge a training checkpoint into a plain model folder, with the processor saved in the checkpoint. The base
    model is loaded unquantized, also for adapters trained on a quantized decoder (QLoRA): the folder holds the
    base model's dtypes and loads without bitsandbytes."""
    merged = load_trained(checkpoint, base_model, merge=True)
    merged.save_pretrained(output_dir)
    LavCapProcessor.from_pretrained(checkpoint).save_pretrained(output_dir)
    return merged
