"""LAVCap audio-visual captioning as a Hugging Face Transformers model."""

import transformers
from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, AutoModelForCausalLM, AutoProcessor
from transformers.pipelines import PIPELINE_REGISTRY

from .model.configuration_lavcap import FUSION_TYPES, CedConfig, LavCapConfig
from .model.feature_extraction_lavcap import LavCapFeatureExtractor
from .model.modeling_ced import CedModel
from .model.modeling_lavcap import (
    LavCapCausalLMOutputWithPast,
    LavCapForConditionalGeneration,
    LavCapModel,
    LavCapModelOutputWithPast,
    LavCapMultimodalOutput,
    LavCapPreTrainedModel,
)
from .model.pipeline_lavcap import TASK, AudioVisualCaptioningPipeline
from .model.processing_lavcap import LavCapProcessor

__version__ = "0.1.0"

AutoConfig.register(CedConfig.model_type, CedConfig, exist_ok=True)
AutoConfig.register(LavCapConfig.model_type, LavCapConfig, exist_ok=True)
AutoModel.register(CedConfig, CedModel, exist_ok=True)
AutoModel.register(LavCapConfig, LavCapForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(LavCapConfig, LavCapForConditionalGeneration, exist_ok=True)
# The library's auto class for multimodal generation (transformers 5.x: qwen2-audio, qwen2.5-omni, llava, ...).
if hasattr(transformers, "AutoModelForMultimodalLM"):
    transformers.AutoModelForMultimodalLM.register(
        LavCapConfig, LavCapForConditionalGeneration, exist_ok=True
    )
AutoFeatureExtractor.register(LavCapConfig, LavCapFeatureExtractor, exist_ok=True)
AutoProcessor.register(LavCapConfig, LavCapProcessor, exist_ok=True)

# `auto_map` entries written by save_pretrained, so that a saved folder loads with trust_remote_code=True
# where this package is not installed.
LavCapConfig.register_for_auto_class()
# One auto class per model class is kept; save_pretrained adds the AutoModel entry.
LavCapForConditionalGeneration.register_for_auto_class("AutoModelForCausalLM")
LavCapProcessor.register_for_auto_class("AutoProcessor")

PIPELINE_REGISTRY.register_pipeline(
    TASK, pipeline_class=AudioVisualCaptioningPipeline, pt_model=AutoModel, type="multimodal"
)

__all__ = [
    "AudioVisualCaptioningPipeline",
    "FUSION_TYPES",
    "CedConfig",
    "CedModel",
    "LavCapCausalLMOutputWithPast",
    "LavCapConfig",
    "LavCapFeatureExtractor",
    "LavCapForConditionalGeneration",
    "LavCapModel",
    "LavCapModelOutputWithPast",
    "LavCapMultimodalOutput",
    "LavCapPreTrainedModel",
    "LavCapProcessor",
]
