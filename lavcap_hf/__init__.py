"""LAVCap audio-visual captioning as a Hugging Face Transformers model."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_lavcap import FUSION_TYPES, CedConfig, LavCapConfig
from .modeling_ced import CedModel
from .modeling_lavcap import (
    LavCapCausalLMOutput,
    LavCapForConditionalGeneration,
    LavCapModel,
    LavCapModelOutput,
    LavCapPreTrainedModel,
)

__version__ = "0.1.0"

AutoConfig.register(CedConfig.model_type, CedConfig, exist_ok=True)
AutoConfig.register(LavCapConfig.model_type, LavCapConfig, exist_ok=True)
AutoModel.register(CedConfig, CedModel, exist_ok=True)
AutoModel.register(LavCapConfig, LavCapForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(LavCapConfig, LavCapForConditionalGeneration, exist_ok=True)

# `auto_map` entries written by save_pretrained, so that a saved folder loads with trust_remote_code=True
# where this package is not installed.
LavCapConfig.register_for_auto_class()
# One auto class per model class is kept; save_pretrained adds the AutoModel entry.
LavCapForConditionalGeneration.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "FUSION_TYPES",
    "CedConfig",
    "CedModel",
    "LavCapCausalLMOutput",
    "LavCapConfig",
    "LavCapForConditionalGeneration",
    "LavCapModel",
    "LavCapModelOutput",
    "LavCapPreTrainedModel",
]
