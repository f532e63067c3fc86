"""Real checkpoints -> this package: CED, CLIP and causal-LM components, and the released LAVCap training checkpoints.

Modules, each importing only those listed before it: `report` (`ConversionReport`), `checkpoints` (reading a state dict
from a file, folder or Hub id), `components` (CED / CLIP / LM -> a model, `build_from_components`), `official` (a
released training checkpoint -> that model, `convert_official_checkpoint`) and `command` (`lavcap convert`).

Layouts read here (key names as released):
- CED, original release (`audiotransformer_base_mAP_4999.pt`): `init_bn.1.*` (the BatchNorm sits inside an
  `nn.Sequential`), fused `blocks.N.attn.qkv.*` of shape (3C, C) in q, k, v order, `front_end.*` (buffers of its mel
  front end), `outputlayer.*` (AudioSet classifier) and `time_pos_embed` (1, C, 1, 63) for 1012 frames.
- CED on the Hub (`mispeech/ced-base`): the same tensors under `encoder.` (`encoder.init_bn.*`), the classifier as
  `outputlayer.*`.
- CED in this package's format (`CedModel.state_dict()`).
- CLIP (`openai/clip-vit-large-patch14`): `vision_model.*` and `visual_projection.weight` are kept, the text tower is
  dropped; keys without the `vision_model.` prefix are accepted too.
- any causal LM that `AutoModelForCausalLM` loads (`meta-llama/Llama-2-7b-chat-hf`).
- the released LAVCap trainer's `{"model": state_dict, "config": {...}, ...}`: peft-wrapped CED
  (`audio_encoder.base_model.model.*`) and LLaMA (`llama_decoder.base_model.model.*`), `speech_llama_proj.*` and
  `logit_scale`. That trainer drops every parameter that does not require gradients, so the file holds the LoRA
  factors, the projector, the OT logit scale and buffers (CED's BatchNorm statistics), not the frozen base weights:
  those come from the components.
"""

from .checkpoints import StateDictSource, load_state_dict, read_checkpoint, state_dict_of
from .command import run_convert
from .components import (
    FLOAT32_PARTS,
    add_placeholder_tokens,
    build_from_components,
    cast_model,
    ced_config_from_state_dict,
    clip_vision_config,
    from_pretrained_components,
    load_ced_weights,
    load_clip_vision_weights,
    load_language_model,
    normalize_ced_state_dict,
    part_dtypes,
)
from .official import (
    OFFICIAL_FUSION_TYPES,
    OFFICIAL_LORA_ALPHA,
    convert_official_checkpoint,
    fusion_type_of_release,
    official_config_kwargs,
    official_lora_settings,
)
from .report import ConversionReport

__all__ = [
    "FLOAT32_PARTS",
    "OFFICIAL_FUSION_TYPES",
    "OFFICIAL_LORA_ALPHA",
    "ConversionReport",
    "StateDictSource",
    "add_placeholder_tokens",
    "build_from_components",
    "cast_model",
    "ced_config_from_state_dict",
    "clip_vision_config",
    "convert_official_checkpoint",
    "from_pretrained_components",
    "fusion_type_of_release",
    "load_ced_weights",
    "load_clip_vision_weights",
    "load_language_model",
    "load_state_dict",
    "normalize_ced_state_dict",
    "official_config_kwargs",
    "official_lora_settings",
    "part_dtypes",
    "read_checkpoint",
    "run_convert",
    "state_dict_of",
]
