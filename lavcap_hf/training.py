"""Fine-tuning LAVCap: the paper's LoRA set-up (peft)."""

from __future__ import annotations

from collections.abc import Sequence

from peft import LoraConfig, PeftModel, get_peft_model

from .modeling_lavcap import LavCapForConditionalGeneration

TRAINED_MODULES = ("multi_modal_projector", "fusion")
"""Modules trained in full next to the adapters: the projector, and the fusion (OT logit scale, cross-attention)."""


def lavcap_lora_config(
    r: int = 8,
    lora_alpha: int = 32,
    lora_dropout: float = 0.1,
    audio_target_modules: Sequence[str] = ("q_proj", "v_proj"),
    text_target_modules: Sequence[str] = ("q_proj", "v_proj"),
) -> LoraConfig:
    """The paper's adapters: LoRA on CED's and the LLM's q/v projections (r 8, alpha 32, dropout 0.1).

    CLIP's attention also has `q_proj`/`v_proj`; the pattern names the audio tower and the language model only,
    so the frozen vision tower gets no adapters.
    """
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


def apply_lora(model: LavCapForConditionalGeneration, lora_config: LoraConfig | None = None) -> PeftModel:
    """Freeze every base weight (CED, CLIP, LLM) and add the adapters; the projector and fusion stay trainable."""
    model.requires_grad_(False)
    return get_peft_model(model, lora_config or lavcap_lora_config())
