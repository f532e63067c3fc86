"""LAVCap: audio encoder + frozen CLIP frames + optimal-transport fusion + causal LM decoder.

The layout of transformers' multimodal models (llava, qwen2_audio): `LavCapModel` holds the audio and vision towers,
the fusion, the projector and the decoder, and takes `input_ids`; `LavCapForConditionalGeneration` adds the LM head.
"""

import copy
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple, Unpack

import torch
from torch import nn
from transformers import (
    AutoModel,
    CLIPVisionModelWithProjection,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling, ModelOutput
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple

from ._compat import (
    CACHE_ARGUMENT,
    accept_old_cache_name,
    as_cache,
    decoder_cache_kwargs,
    dtype_kwarg,
    init,
    is_first_generation_step,
    multimodal_output_bases,
    passed_generation_config_wins,
    register_key_renames,
    slice_logits_to_keep,
    torch_compilable_check,
)
from .checkpoint_files import checkpoint_shapes, hub_options
from .configuration_lavcap import PIPELINE_TASK, LavCapConfig, LavCapGenerationConfig
from .modeling_ced import CedModel
from .optimal_transport import OT_FUSION_TYPES, build_fusion

IGNORE_INDEX = -100
# Devices on which the placeholder-count check runs on the device (`torch._assert_async`) rather than as a Python
# `if`, which would make the host wait for the device once per forward; meta tensors have no values to read.
_ON_DEVICE_CHECK_TYPES = ("cuda", "meta")

# Folders saved before the decoder moved into `LavCapModel` (and everything 5.x saves: it writes the older names
# back) hold the whole causal LM under `language_model.`: its decoder is now `model.language_model`, its head `lm_head`.
KEY_RENAMES_FROM_SEPARATE_LM = {
    r"^language_model\.model\.": "model.language_model.",
    r"^language_model\.lm_head\.": "lm_head.",
}
_KEY_MAPPING_4X = register_key_renames(LavCapConfig.model_type, KEY_RENAMES_FROM_SEPARATE_LM)


def _rename_older_layout_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """`load_state_dict` pre-hook: rename, in place, the keys under `prefix` that are in the older layout.

    `from_pretrained` renames them itself; this covers the loads that read a saved file straight into the module,
    as the Trainer does when it restores its best checkpoint or resumes a run (5.x saved those files in the older
    layout).
    """
    for key in [key for key in state_dict if key.startswith(prefix)]:
        local = key[len(prefix) :]
        for pattern, replacement in KEY_RENAMES_FROM_SEPARATE_LM.items():
            renamed = re.sub(pattern, replacement, local)
            if renamed != local:
                state_dict[prefix + renamed] = state_dict.pop(key)
                break


_BaseOutput, _CausalLMOutput = multimodal_output_bases()

MEDIA_INPUTS = ("input_features", "pixel_values_videos", "video_embeds", "multimodal_embeds")
"""The model inputs that carry a clip's media, or the vectors encoded from them."""
PLACEHOLDERS_WITHOUT_MEDIA = (
    "input_ids contain audio/video placeholder tokens but no input_features, pixel_values_videos, video_embeds or "
    "multimodal_embeds were given"
)


@dataclass
class LavCapMultimodalOutput(ModelOutput):
    """What the media of B clips become before they enter the decoder.

    Args:
        multimodal_embeds: fused tokens projected to the LM width (B, N, d_llm); N = 84 for the paper's model.
        ot_loss: `ot_loss_weight * (loss_v + loss_a)` for the OT fusion types, else None.
        ot_plan: transport plan exp(L) (B, V, A), rows sum to 1/V and columns to 1/A; only with `output_ot_plan`.
        audio_embeds: audio tokens after frequency pooling (B, A, C), the fusion's audio input.
        video_embeds: one embedding per frame (B, V, C), the fusion's visual input (from CLIP or as given).
        audio_outputs: CED's output (`pooler_output` holds `audio_embeds`).
        video_outputs: CLIP's output over the B * V frames (`pooler_output` holds `video_embeds`); None when
            precomputed `video_embeds` were given.
    """

    multimodal_embeds: torch.Tensor | None = None
    ot_loss: torch.Tensor | None = None
    ot_plan: torch.Tensor | None = None
    audio_embeds: torch.Tensor | None = None
    video_embeds: torch.Tensor | None = None
    audio_outputs: BaseModelOutputWithPooling | None = None
    video_outputs: BaseModelOutputWithPooling | None = None


@dataclass
class LavCapModelOutputWithPast(_BaseOutput):
    """The decoder's output (`last_hidden_state`, cache, hidden states, attentions), the encoders' outputs, and
    the fusion's `ot_loss` and `ot_plan` (B, V, A) (with `output_ot_plan`) when this call encoded the media."""

    ot_loss: torch.Tensor | None = None
    ot_plan: torch.Tensor | None = None


@dataclass
class LavCapCausalLMOutputWithPast(_CausalLMOutput):
    """Causal LM output plus `lm_loss`, `ot_loss` (`loss = lm_loss + ot_loss`) and the OT plan on request."""

    lm_loss: torch.Tensor | None = None
    ot_loss: torch.Tensor | None = None
    ot_plan: torch.Tensor | None = None


class LavCapPreTrainedModel(PreTrainedModel):
    config_class = LavCapConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("audio", "video", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    # CED and the decoder name their own blocks (CedBlock, the decoder family's layer class), which the library gathers
    # from the nested models, so any causal LM keeps its layers whole under a device map; CLIP's vision model with
    # projection names none in 4.55.
    _no_split_modules = ["CLIPEncoderLayer"]
    # Where this class holds the modules between the media and the decoder (`MediaModules`), and its output head:
    # the parts a quantized load leaves unquantized (`_unquantized_module_names`).
    _media_modules_prefix = ""
    _output_head_names: tuple[str, ...] = ()

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any, **kwargs: Any
    ):
        """`PreTrainedModel.from_pretrained`, except that:

        - a checkpoint tensor whose shape differs from the model's raises a ValueError naming each such key and both
          shapes (the library re-initialises it, or raises an error that names neither), unless
          `ignore_mismatched_sizes=True` asks for the re-initialisation;
        - folders in the older layout (a separate causal LM) load on every supported release;
        - without a dtype, the folder's dtypes are kept on every release (5.x's default, `dtype="auto"`; 4.x would
          load everything in float32): the language model's, and float32 for `config.float32_modules`;
        - the generation config is a [`LavCapGenerationConfig`] on every release: the folder's
          `generation_config.json` (each decoding setting it leaves out is the released one), or the released
          decoding where the folder has none; a `generation_config=` argument is used as given;
        - a `quantization_config` (bitsandbytes' 4-bit or 8-bit, or any quantizer with `modules_to_not_convert`)
          quantizes the decoder's linear layers only: CED (with its BatchNorm), the fusion, the projector and the
          output head are added to the modules it leaves alone, whatever it lists, and keep their dtype; CLIP's too,
          unless `quantize_vision_tower=True`.
        """
        quantize_vision_tower = kwargs.pop("quantize_vision_tower", False)
        if kwargs.get("quantization_config") is not None:
            kwargs["quantization_config"] = cls._leaving_media_unquantized(
                kwargs["quantization_config"], quantize_vision_tower
            )
        if _KEY_MAPPING_4X is not None and kwargs.get("key_mapping") is None:
            kwargs["key_mapping"] = _KEY_MAPPING_4X
        if kwargs.get("dtype") is None and kwargs.get("torch_dtype") is None:
            kwargs[dtype_kwarg()] = "auto"
        if kwargs.get("ignore_mismatched_sizes"):
            loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        else:
            loaded = cls._from_pretrained_checking_shapes(
                pretrained_model_name_or_path, *model_args, **kwargs
            )
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        if model.can_generate() and kwargs.get("generation_config") is None:
            model.generation_config = LavCapGenerationConfig.for_model(
                pretrained_model_name_or_path, model.config, **hub_options(kwargs)
            )
        return loaded

    @classmethod
    def _unquantized_module_names(cls, quantize_vision_tower: bool = False) -> list[str]:
        """The modules a quantized load of this class leaves alone, named from the model's root as both the 5.x
        quantizers (a prefix up to a module boundary) and 4.x's (`name + "."` inside the module's name) match them:
        the towers, the fusion, the projector and the output head (`MediaModules`, `_output_head_names`)."""
        media = [name for name in MediaModules._fields if name != "vision_tower" or not quantize_vision_tower]
        return [cls._media_modules_prefix + name for name in media] + list(cls._output_head_names)

    @classmethod
    def _leaving_media_unquantized(cls, quantization_config: Any, quantize_vision_tower: bool) -> Any:
        """A copy of `quantization_config` (a config object or its dict) whose list of modules left unquantized
        (`llm_int8_skip_modules` of bitsandbytes, `modules_to_not_convert` of other quantizers) also holds
        `_unquantized_module_names`. Given a list, the library skips nothing else by itself, so the head is named."""
        from transformers.quantizers import AutoQuantizationConfig

        if isinstance(quantization_config, dict):
            quantization_config = AutoQuantizationConfig.from_dict(quantization_config)
        quantization_config = copy.deepcopy(quantization_config)
        for field in ("llm_int8_skip_modules", "modules_to_not_convert"):
            if hasattr(quantization_config, field):
                listed = list(getattr(quantization_config, field) or [])
                kept = [
                    name
                    for name in cls._unquantized_module_names(quantize_vision_tower)
                    if name not in listed
                ]
                setattr(quantization_config, field, listed + kept)
                return quantization_config
        raise ValueError(
            f"{type(quantization_config).__name__} names no modules to leave unquantized (no llm_int8_skip_modules "
            "or modules_to_not_convert): LAVCap's audio tower, fusion, projector and head must keep their precision"
        )

    @classmethod
    def _from_pretrained_checking_shapes(
        cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any, **kwargs: Any
    ):
        return_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path,
            *model_args,
            ignore_mismatched_sizes=True,
            output_loading_info=True,
            **kwargs,
        )
        mismatched = list(info.get("mismatched_keys") or ())
        if mismatched:
            problems = _describe_mismatches(mismatched, model, pretrained_model_name_or_path, kwargs)
            raise ValueError(
                f"{pretrained_model_name_or_path}: checkpoint tensors do not fit the model built from its config: "
                f"{'; '.join(problems)}"
            )
        return (model, info) if return_info else model

    def _keep_float32_modules(self, media: nn.Module) -> None:
        """Have `from_pretrained` keep `config.float32_modules` in float32 whatever dtype it loads in: the library's
        `_keep_in_fp32_modules_strict`, read from the new instance (5.x also gathers the submodules' lists). Only
        modules that exist and hold parameters are named (4.x refuses a name no parameter carries)."""
        kept = [
            name
            for name in self.config.float32_modules
            if getattr(media, name) is not None and any(True for _ in getattr(media, name).parameters())
        ]
        inherited = list(type(self)._keep_in_fp32_modules_strict or [])
        self._keep_in_fp32_modules_strict = [*inherited, *kept] or None

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The fusion, the projector and the head; the towers and the decoder are initialised by their own classes
        (the library hands each nested `PreTrainedModel` to its own `_init_weights`). The library's init functions
        leave tensors alone that a checkpoint has filled.

        The released code builds the fusion and the projector from plain PyTorch modules and trains them from
        PyTorch's initialisation, so they start from it here too (`_init_as_pytorch`); the head is the decoder's,
        normal(0, `initializer_range`)."""
        if isinstance(module, nn.Linear) and module is self.get_output_embeddings():
            std = getattr(self.config.text_config, "initializer_range", 0.02)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.Linear, nn.MultiheadAttention)):
            _init_as_pytorch(module)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        if hasattr(module, "logit_scale") and isinstance(module.logit_scale, nn.Parameter):
            init.constant_(module.logit_scale, self.config.logit_scale_init)

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        """True: this class has no attention of its own; the towers and the decoder switch theirs (the library's
        check searches this module's source for its attention dispatch idiom, which is in theirs)."""
        return True

    @classmethod
    def is_custom_code(cls) -> bool:
        """False: for code outside the library, 5.x assumes in-place initialisers that ignore what a checkpoint
        filled, and takes a module without parameters of its own as initialised; under that rule the library's
        towers nested here (CLIP's attention and MLP blocks, which set their children's scaled init) would keep the
        generic std 0.02 where their weights are missing. `_init_weights` above uses the library's init functions,
        as the library's own models do."""
        return False


def _init_as_pytorch(module: nn.Linear | nn.MultiheadAttention) -> None:
    """Initialise `module` as its PyTorch constructor does, with the library's init functions.

    nn.Linear: weight kaiming-uniform (a = sqrt(5)) and bias uniform, both within +-1/sqrt(in_features).
    nn.MultiheadAttention: xavier-uniform input projections, zero input and output biases (its `out_proj`, an
    nn.Linear child, is initialised first, as the library visits children before their parent).
    """
    if isinstance(module, nn.Linear):
        init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        if module.bias is not None:
            bound = 1 / math.sqrt(module.in_features) if module.in_features > 0 else 0.0
            init.uniform_(module.bias, -bound, bound)
        return
    names = (
        ("in_proj_weight",)
        if module._qkv_same_embed_dim
        else ("q_proj_weight", "k_proj_weight", "v_proj_weight")
    )
    for name in names:
        init.xavier_uniform_(getattr(module, name))
    if module.in_proj_bias is not None:
        init.zeros_(module.in_proj_bias)
        init.zeros_(module.out_proj.bias)
    for bias in (module.bias_k, module.bias_v):
        if bias is not None:
            init.xavier_normal_(bias)


def _describe_mismatches(
    mismatched: list[Any], model: nn.Module, source: str | os.PathLike, hub_kwargs: dict[str, Any]
) -> list[str]:
    """One `key: checkpoint (a, b) vs model (c, d)` per mismatched tensor. transformers 5.x lists (key, checkpoint
    shape, model shape); 4.55 lists keys only, so the checkpoint shapes are read from the safetensors headers."""
    if all(isinstance(entry, tuple) for entry in mismatched):
        entries = [(key, tuple(ckpt), tuple(ours)) for key, ckpt, ours in mismatched]
    else:
        stored = checkpoint_shapes(source, hub_kwargs)
        state = model.state_dict()
        prefix = f"{model.base_model_prefix}."
        entries = [
            (key, stored.get(key, stored.get(prefix + key, "unknown")), tuple(state[key].shape))
            for key in mismatched
        ]
    return [f"{key}: checkpoint {ckpt} vs model {ours}" for key, ckpt, ours in entries]


RUNNING_STAT_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
"""Normalisation layers whose running statistics change in training mode (CED's input `init_bn`)."""


def tower_trains(tower: nn.Module) -> bool:
    """Whether any parameter of `tower` trains (LoRA inside it, or weights left unfrozen)."""
    return any(parameter.requires_grad for parameter in tower.parameters())


def keep_frozen_tower_statistics(tower: nn.Module) -> None:
    """In a tower that runs in training mode but none of whose parameters trains, put the BatchNorm layers in eval mode.

    A frozen encoder stays frozen whatever set up the training (the package's LoRA, plain peft on the decoder, a
    hand-made freeze): its running statistics are no trained weights, adapters saved from the run would not hold
    them, and the reloaded model must find them as they were. Called at each forward, so the order of `train()`
    and the freeze does not matter; a tower that trains (CED with the paper's LoRA) keeps the mode it was given,
    its statistics updating in training mode as in the released recipe.
    """
    if tower.training and not tower_trains(tower):
        for module in tower.modules():
            if isinstance(module, RUNNING_STAT_NORMS) and module.track_running_stats:
                module.eval()


class MediaModules(NamedTuple):
    """The modules between the media and the decoder (a tower is None where the fusion type does not use it)."""

    audio_tower: CedModel | None
    vision_tower: CLIPVisionModelWithProjection | None
    fusion: nn.Module
    multi_modal_projector: nn.Linear


def build_media_modules(config: LavCapConfig) -> MediaModules:
    """The towers, the fusion and the projector of `config`, randomly initialised."""
    _check_widths(config)
    audio_tower = CedModel(config.audio_config) if config.uses_audio else None
    has_vision = config.uses_visual and config.vision_config is not None
    vision_tower = CLIPVisionModelWithProjection(config.vision_config) if has_vision else None
    fusion_width = config.audio_config.hidden_size if config.uses_audio else config.visual_embed_dim
    fusion = build_fusion(
        config.fusion_type,
        hidden_size=fusion_width,
        sinkhorn_epsilon=config.sinkhorn_epsilon,
        sinkhorn_iterations=config.sinkhorn_iterations,
        logit_scale_init=config.logit_scale_init,
        logit_scale_max=config.logit_scale_max,
    )
    projector = nn.Linear(fusion.output_dim, config.text_config.hidden_size)
    return MediaModules(audio_tower, vision_tower, fusion, projector)


def _flag(value: bool | None, config: Any, name: str) -> bool:
    """An output switch as given, else as set in the (sub-)config."""
    return bool(value if value is not None else getattr(config, name, False))


def _check_widths(config: LavCapConfig) -> None:
    if (
        config.uses_audio
        and config.uses_visual
        and config.audio_config.hidden_size != config.visual_embed_dim
    ):
        raise ValueError(
            f"fusion_type={config.fusion_type!r} fuses audio tokens of width {config.audio_config.hidden_size} "
            f"with visual embeddings of width {config.visual_embed_dim}; they must be equal"
        )


class LavCapModel(LavCapPreTrainedModel):
    """Towers, OT fusion, projector and decoder (no LM head): the fused vectors replace the placeholder tokens."""

    def __init__(self, config: LavCapConfig) -> None:
        super().__init__(config)
        self.audio_tower, self.vision_tower, self.fusion, self.multi_modal_projector = build_media_modules(
            config
        )
        self.language_model = AutoModel.from_config(config.text_config)
        self._keep_float32_modules(self)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model

    def set_decoder(self, decoder: nn.Module) -> None:
        self.language_model = decoder

    @property
    def placeholder_token_ids(self) -> list[int]:
        return [i for i in (self.config.audio_token_id, self.config.video_token_id) if i is not None]

    @can_return_tuple
    def get_audio_features(
        self,
        input_features: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        """fbank (B, frames, mel) -> CED's output, with the audio tokens (B, frames/16, C) as `pooler_output`:
        the patches (B, F*T, C), frequency-major, averaged over the F frequency rows."""
        audio_config = self.config.audio_config
        keep_frozen_tower_statistics(self.audio_tower)
        output = self.audio_tower(
            input_features,
            output_hidden_states=_flag(output_hidden_states, audio_config, "output_hidden_states"),
            output_attentions=_flag(output_attentions, audio_config, "output_attentions"),
            return_dict=True,
        )
        patches = output.last_hidden_state
        batch, _, width = patches.shape
        return BaseModelOutputWithPooling(
            last_hidden_state=patches,
            pooler_output=patches.view(batch, audio_config.freq_patches, -1, width).mean(dim=1),
            hidden_states=output.hidden_states,
            attentions=output.attentions,
        )

    @can_return_tuple
    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        """frames (B, V, 3, H, W) -> CLIP's output per clip: `last_hidden_state` (B, V, P, C) over the P patch
        tokens of each frame (hidden states and attentions stay per frame, B * V first), and the projected image
        embeddings (B, V, C') as `pooler_output`."""
        if self.vision_tower is None:
            raise ValueError(
                "this model has no vision tower (vision_config is None): pass precomputed `video_embeds` "
                "of shape (batch, frames, visual_embed_dim) instead of `pixel_values_videos`"
            )
        if pixel_values_videos.ndim != 5:
            raise ValueError(
                "pixel_values_videos must have shape (batch, frames, 3, height, width), got "
                f"{tuple(pixel_values_videos.shape)}"
            )
        batch, frames = pixel_values_videos.shape[:2]
        pixels = pixel_values_videos.flatten(0, 1).to(self.vision_tower.dtype)
        vision_config = self.config.vision_config
        # A frozen tower stays out of the backward pass, also when gradient checkpointing hooks its inputs.
        keep_frozen_tower_statistics(self.vision_tower)
        with torch.set_grad_enabled(torch.is_grad_enabled() and tower_trains(self.vision_tower)):
            output = self.vision_tower(
                pixel_values=pixels,
                output_hidden_states=_flag(output_hidden_states, vision_config, "output_hidden_states"),
                output_attentions=_flag(output_attentions, vision_config, "output_attentions"),
                return_dict=True,
            )
        return BaseModelOutputWithPooling(
            last_hidden_state=output.last_hidden_state.unflatten(0, (batch, frames)),
            pooler_output=output.image_embeds.view(batch, frames, -1),
            hidden_states=output.hidden_states,
            attentions=output.attentions,
        )

    def get_multimodal_features(
        self,
        input_features: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_embeds: torch.Tensor | None = None,
        output_ot_plan: bool = False,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> LavCapMultimodalOutput:
        """Encode B clips into the vectors that replace their prompts' placeholder tokens.

        Args:
            input_features: normalised fbank (B, 1024, 64).
            pixel_values_videos: CLIP-preprocessed frames (B, V, 3, 224, 224), or
            video_embeds: precomputed projected CLIP embeddings (B, V, 768).
        """
        audio = self._audio_outputs(input_features, output_hidden_states, output_attentions)
        video, video_tokens = self._visual_outputs(
            pixel_values_videos, video_embeds, output_hidden_states, output_attentions
        )
        audio_tokens = audio.pooler_output if audio is not None else None
        fused = self.fusion(audio_tokens, video_tokens, output_ot_plan=output_ot_plan)
        ot_loss = None
        if self.config.fusion_type in OT_FUSION_TYPES:
            ot_loss = self.config.ot_loss_weight * (fused.loss_v + fused.loss_a)
        projector_dtype = self.multi_modal_projector.weight.dtype
        return LavCapMultimodalOutput(
            multimodal_embeds=self.multi_modal_projector(fused.fused.to(projector_dtype)),
            ot_loss=ot_loss,
            ot_plan=fused.log_plan.exp() if fused.log_plan is not None else None,
            audio_embeds=audio_tokens,
            video_embeds=video_tokens,
            audio_outputs=audio,
            video_outputs=video,
        )

    def _audio_outputs(
        self,
        input_features: torch.Tensor | None,
        output_hidden_states: bool | None,
        output_attentions: bool | None,
    ) -> BaseModelOutputWithPooling | None:
        if not self.config.uses_audio:
            return None
        if input_features is None:
            raise ValueError(
                f"fusion_type={self.config.fusion_type!r} needs `input_features` (batch, frames, mel)"
            )
        return self.get_audio_features(
            input_features, output_hidden_states=output_hidden_states, output_attentions=output_attentions
        )

    def _visual_outputs(
        self,
        pixel_values_videos: torch.Tensor | None,
        video_embeds: torch.Tensor | None,
        output_hidden_states: bool | None,
        output_attentions: bool | None,
    ) -> tuple[BaseModelOutputWithPooling | None, torch.Tensor | None]:
        """CLIP's output (None for precomputed embeddings) and the frame embeddings (B, V, C)."""
        if not self.config.uses_visual:
            return None, None
        if video_embeds is not None:
            expected = self.config.visual_embed_dim
            if video_embeds.ndim != 3 or video_embeds.shape[-1] != expected:
                raise ValueError(
                    f"video_embeds must have shape (batch, frames, {expected}), got {tuple(video_embeds.shape)}"
                )
            return None, video_embeds
        if pixel_values_videos is None:
            raise ValueError(
                f"fusion_type={self.config.fusion_type!r} needs `pixel_values_videos` or precomputed `video_embeds`"
            )
        video = self.get_video_features(pixel_values_videos, output_hidden_states, output_attentions)
        return video, video.pooler_output

    @can_return_tuple
    @accept_old_cache_name
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        input_features: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        multimodal_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        output_ot_plan: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> LavCapModelOutputWithPast:
        """
        Args:
            input_ids: prompt (+ caption) tokens with `placeholder_counts` placeholder tokens per clip (B, L), or
            inputs_embeds: their embeddings (B, L, d_llm); the media are merged into them at the placeholders.
            input_features: normalised fbank (B, 1024, 64).
            pixel_values_videos: CLIP-preprocessed frames (B, V, 3, 224, 224), or
            video_embeds: precomputed projected CLIP embeddings (B, V, 768), or
            multimodal_embeds: the fused vectors of `get_multimodal_features` (B, N, d_llm), encoded before.
            attention_mask: (B, L), 0 on padding.
            position_ids: (B, L); generation derives them from the attention mask so left padding is harmless. In a
                packed (padding-free) batch they restart at each prompt, with no attention mask and no cache.
            cache: the decoder's key/value cache to continue from (`past_key_values`, its 4.x name, also works).
            use_cache: whether the decoder returns its cache (default: the text config's `use_cache`).
            kwargs: for the decoder (`output_hidden_states`, `output_attentions`, ...).
        """
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        media = (input_features, pixel_values_videos, video_embeds)
        has_media = any(x is not None for x in media)
        if has_media and multimodal_embeds is not None:
            raise ValueError("pass either media inputs or their multimodal_embeds, not both")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        encoded = None
        if has_media:
            encoded = self.get_multimodal_features(
                *media,
                output_ot_plan=output_ot_plan,
                output_hidden_states=kwargs.get("output_hidden_states"),
                output_attentions=kwargs.get("output_attentions"),
            )
            multimodal_embeds = encoded.multimodal_embeds
        if multimodal_embeds is not None:
            inputs_embeds = self.merge_multimodal_embeds(input_ids, inputs_embeds, multimodal_embeds)
        elif input_ids is not None and cache is None and self.holds_placeholders(input_ids):
            # As the library's multimodal models, a forward without media reads the placeholders as the tokens they
            # are (text-only and packed batches of any ids run); captioning without them is refused in `generate`.
            warnings.warn(PLACEHOLDERS_WITHOUT_MEDIA + ": they are read as ordinary tokens", stacklevel=2)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **decoder_cache_kwargs(cache),
            **kwargs,
        )
        return LavCapModelOutputWithPast(
            **outputs,
            audio_outputs=encoded.audio_outputs if encoded is not None else None,
            video_outputs=encoded.video_outputs if encoded is not None else None,
            ot_loss=encoded.ot_loss if encoded is not None else None,
            ot_plan=encoded.ot_plan if encoded is not None else None,
        )

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor
    ) -> torch.Tensor:
        """(B, L) bool, True at the audio and video placeholders, found in `input_ids`, or where the embedding equals
        a placeholder's embedding when only `inputs_embeds` (B, L, d) is given."""
        if not self.placeholder_token_ids:
            raise ValueError(
                "config.audio_token_id / video_token_id are not set: the prompt has no placeholders"
            )
        mask = torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
        # Compared one id at a time: a tensor of the ids would be a host-to-device copy, which waits for the device.
        for token_id in self.placeholder_token_ids:
            if input_ids is not None:
                mask |= input_ids == token_id
            else:
                token = torch.full((), token_id, dtype=torch.long, device=inputs_embeds.device)
                mask |= (inputs_embeds == self.get_input_embeddings()(token)).all(-1)
        return mask

    def merge_multimodal_embeds(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, multimodal_embeds: torch.Tensor
    ) -> torch.Tensor:
        """Put the N fused vectors of each of C clips (C, N, d) at the placeholders of `inputs_embeds` (B, L, d), in
        order, counted row by row: the prompt of each clip in a row of its own (B = C), or, in a packed
        (padding-free) batch, the prompts of several clips one after another in a row, as the library's decoders
        take them with `position_ids` restarting at each prompt."""
        clips, num_vectors = multimodal_embeds.shape[:2]
        is_placeholder = self.get_placeholder_mask(input_ids, inputs_embeds)
        self._check_placeholder_counts(is_placeholder.sum(dim=1), num_vectors, clips)
        # The k-th placeholder of the batch takes the k-th of the clips' vectors. A gather, not masked_scatter, whose
        # backward selects by the mask and so waits for the device: static shapes keep both directions free of syncs.
        width = inputs_embeds.shape[-1]
        order = (is_placeholder.flatten().cumsum(dim=0) - 1).clamp_(0, clips * num_vectors - 1)
        vectors = multimodal_embeds.to(inputs_embeds.device, inputs_embeds.dtype).reshape(-1, width)
        vectors = vectors.gather(0, order.unsqueeze(-1).expand(-1, width)).view_as(inputs_embeds)
        return torch.where(is_placeholder.unsqueeze(-1), vectors, inputs_embeds)

    def _check_placeholder_counts(self, counts: torch.Tensor, per_clip: int, clips: int) -> None:
        """The prompts (placeholders per row, counts (B,)) must hold `per_clip` placeholders for each of the `clips`
        clips, whole clips per row: ValueError naming the counts, or on CUDA a device-side assertion with the same
        message, raised at the next synchronisation."""
        message = (
            f"the prompts must hold {per_clip} placeholder tokens (audio then video) per clip for fusion_type="
            f"{self.config.fusion_type!r}, each clip's in one row (several clips' one after another in a packed row)"
        )
        fits = (counts % per_clip == 0).all() & (counts.sum() == clips * per_clip)
        if counts.device.type in _ON_DEVICE_CHECK_TYPES or torch.compiler.is_compiling():
            # Not the library's `torch_compilable_check`: it reads `fits` on the host, a wait for the device.
            torch._assert_async(fits, message)
        else:
            torch_compilable_check(
                fits,
                lambda: f"{message}; got {clips} clips for {len(counts)} prompts holding {counts.tolist()}",
            )

    def holds_placeholders(self, input_ids: torch.LongTensor) -> bool:
        """Whether `input_ids` hold placeholder tokens (read only where reading the ids costs no device wait)."""
        if input_ids.device.type in _ON_DEVICE_CHECK_TYPES or torch.compiler.is_compiling():
            return False
        return any(bool((input_ids == token_id).any()) for token_id in self.placeholder_token_ids)


def _input_embedding_key(model: LavCapModel) -> str:
    """The decoder's input embedding weight, named inside the decoder: `embed_tokens.weight` (LLaMA, Qwen2, Gemma),
    `wte.weight` (GPT-2), `decoder.embed_tokens.weight` (OPT), `embed_in.weight` (GPT-NeoX), ..."""
    weight = model.get_input_embeddings().weight
    for name, parameter in model.language_model.named_parameters(remove_duplicate=False):
        if parameter is weight:
            return name
    raise ValueError(f"{type(model.language_model).__name__}'s input embeddings are not among its parameters")


def _causal_lm_head_tp_plan(text_config: PretrainedConfig) -> dict[str, Any]:
    """`{"lm_head": style}` as the causal LM class of `text_config`'s family shards its head, or {} where that family
    has no tensor-parallel plan for it (GPT-2, OPT) or no causal LM class is registered."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        causal_lm_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(text_config)]
    except (KeyError, ValueError):
        return {}
    style = (getattr(causal_lm_class, "_tp_plan", None) or {}).get("lm_head")
    return {"lm_head": style} if style is not None else {}


class LavCapForConditionalGeneration(LavCapPreTrainedModel, GenerationMixin):
    """LAVCap captioner: [`LavCapModel`] and the LM head.

    `generate()` runs the encoders and the fusion once per call, on the B clips (not on their beam copies).
    """

    # The loss is the released recipe's: the mean over this batch's caption tokens plus the OT loss of its clips,
    # not a sum to be divided over a gradient-accumulation window; the Trainer scales it per step.
    accepts_loss_kwargs = False
    generation_config_class = LavCapGenerationConfig
    _media_modules_prefix = "model."
    _output_head_names = ("lm_head",)

    def __init__(self, config: LavCapConfig) -> None:
        super().__init__(config)
        # 5.x builds it from `generation_config_class`, 4.x a plain GenerationConfig.
        if not isinstance(self.generation_config, LavCapGenerationConfig):
            self.generation_config = LavCapGenerationConfig.from_model_config(config)
        # 4.x finds no loss type in this class's name (5.x maps `ForConditionalGeneration`): name it, so that
        # `loss_function` is the causal-LM loss without a warning.
        self.loss_type = "ForCausalLM"
        self.model = LavCapModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        # Per instance, as the library's models whose tied names depend on their config: the head is tied (where
        # the config ties) to the decoder's own input embeddings, whatever its family calls them.
        self._tied_weights_keys = {
            "lm_head.weight": f"model.language_model.{_input_embedding_key(self.model)}"
        }
        self.register_load_state_dict_pre_hook(_rename_older_layout_keys)
        self._keep_float32_modules(self.model)
        self.post_init()
        # After `post_init`, which copies the class's (empty) plan: the head is sharded as the decoder family's own
        # causal LM shards its head, and not at all where that family has no tensor-parallel plan.
        self._tp_plan = {**(self._tp_plan or {}), **_causal_lm_head_tp_plan(config.text_config)}

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Save as usual, with the remote-code entries a folder needs where this package is not installed.

        `register_for_auto_class` keeps one auto class per model class (AutoModelForCausalLM here), so the
        AutoModel entry is added here; the registered `audio-visual-captioning` pipeline is saved alongside as
        `custom_pipelines`, so that `pipeline(model=folder, trust_remote_code=True)` finds it.

        The config's dtype is the language model's: the library records the first parameter's, CED's, which stays
        float32 in a model that keeps `config.float32_modules` in float32, and `from_pretrained(dtype="auto")`
        would then load the whole model in float32. `push_to_hub=True` uploads the folder once it is complete.
        """
        if getattr(type(self), "_auto_class", None) is not None:
            module = type(self).__module__.split(".")[-1]
            auto_map = getattr(self.config, "auto_map", None) or {}
            self.config.auto_map = {**auto_map, "AutoModel": f"{module}.{type(self).__name__}"}
            self._save_custom_pipeline(save_directory)
        push_to_hub = kwargs.pop("push_to_hub", False)
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            setattr(self.config, dtype_kwarg(), self.language_model.dtype)
            self.config.save_pretrained(save_directory)
        if push_to_hub:
            hub = ("commit_message", "private", "token", "create_pr", "revision")
            self.push_to_hub(
                kwargs.get("repo_id", os.path.basename(os.path.normpath(save_directory))),
                **{name: kwargs[name] for name in hub if name in kwargs},
            )

    def _save_custom_pipeline(self, save_directory: str | os.PathLike) -> None:
        from transformers.dynamic_module_utils import custom_object_save
        from transformers.pipelines import PIPELINE_REGISTRY

        task = PIPELINE_TASK
        if task not in PIPELINE_REGISTRY.supported_tasks:
            return
        impl = PIPELINE_REGISTRY.supported_tasks[task]
        os.makedirs(save_directory, exist_ok=True)
        custom_object_save(impl["impl"], save_directory)
        self.config.custom_pipelines = {
            task: {
                "impl": f"{impl['impl'].__module__.split('.')[-1]}.{impl['impl'].__name__}",
                "pt": [c.__name__ for c in impl["pt"]],
                "type": impl.get("type", "multimodal"),
            }
        }

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_decoder(self) -> nn.Module:
        return self.model.get_decoder()

    def set_decoder(self, decoder: nn.Module) -> None:
        self.model.set_decoder(decoder)

    @property
    def language_model(self) -> nn.Module:
        return self.model.language_model

    @property
    def audio_tower(self) -> CedModel | None:
        return self.model.audio_tower

    @property
    def vision_tower(self) -> CLIPVisionModelWithProjection | None:
        return self.model.vision_tower

    @property
    def placeholder_token_ids(self) -> list[int]:
        return self.model.placeholder_token_ids

    def get_multimodal_features(self, *args: Any, **kwargs: Any) -> LavCapMultimodalOutput:
        """[`LavCapModel.get_multimodal_features`]: the fused vectors (B, N, d_llm), OT loss and plan of B clips."""
        return self.model.get_multimodal_features(*args, **kwargs)

    @can_return_tuple
    @accept_old_cache_name
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        input_features: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        multimodal_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        output_ot_plan: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> LavCapCausalLMOutputWithPast:
        """
        Args:
            input_ids, inputs_embeds, attention_mask, position_ids, media, `multimodal_embeds`, cache and
                `use_cache`: as in [`LavCapModel.forward`].
            labels: (B, L), -100 everywhere but the caption and EOS (`shift_labels` in `kwargs`: the same, already
                aligned with the logits).
            logits_to_keep: compute the logits of the last N positions only (0: all of them; `generate()` passes 1,
                so that the prefill does not build (B x beams, L, vocab) logits). Must be 0 with `labels`.
            kwargs: for the decoder (`output_hidden_states`, `output_attentions`, ...).
        Returns:
            `loss = lm_loss + ot_loss`, `lm_loss`, `ot_loss`, `logits` (B, L or N, vocab), the cache, the encoders'
            outputs, and `ot_plan` (B, V, A) when `output_ot_plan`.
        """
        shift_labels = kwargs.pop("shift_labels", None)
        keeps_all_logits = isinstance(logits_to_keep, int) and logits_to_keep == 0
        # The library's causal LMs do not refuse: their loss then fails on mismatched shapes, or, where as many
        # positions are kept as there are tokens (a tensor of positions), is computed silently on the wrong ones.
        if (labels is not None or shift_labels is not None) and not keeps_all_logits:
            raise ValueError("the loss needs the logits of every position: pass logits_to_keep=0 with labels")
        outputs = self.model(
            input_ids=input_ids,
            input_features=input_features,
            pixel_values_videos=pixel_values_videos,
            video_embeds=video_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            multimodal_embeds=multimodal_embeds,
            cache=cache if cache is not None else past_key_values,
            use_cache=use_cache,
            output_ot_plan=output_ot_plan,
            return_dict=True,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        lm_loss = None
        if labels is not None or shift_labels is not None:
            # The library's causal-LM loss: the mean next-token cross entropy, in fp32, over the targets that are
            # not -100, i.e. `labels` shifted by one, or `shift_labels` as given (aligned before the sequence was cut
            # into shards for sequence / context parallel training, they are the only correct ones there). Without
            # `num_items_in_batch`: see `accepts_loss_kwargs`.
            lm_loss = self.loss_function(
                logits,
                labels,
                vocab_size=logits.shape[-1],
                shift_labels=shift_labels,
                ignore_index=IGNORE_INDEX,
            )
        loss = lm_loss
        if lm_loss is not None and outputs.ot_loss is not None:
            loss = lm_loss + outputs.ot_loss
        decoder_fields = {k: v for k, v in outputs.items() if k != "last_hidden_state"}
        return LavCapCausalLMOutputWithPast(loss=loss, logits=logits, lm_loss=lm_loss, **decoder_fields)

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.LongTensor | None = None,
        *args: Any,
        input_features: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """`GenerationMixin.generate` with the media encoded up front, and the prompt prefilled, once per clip.

        The encoders, the fusion and the projector run on the B clips. With several beams (or returned samples) per
        clip and a dynamic cache, the decoder also reads each prompt once: all but its last token fill a cache of B
        rows, which is then repeated for the beams, and `GenerationMixin.generate` continues from it (without this,
        it reads every prompt once per beam). Otherwise `generate()` repeats the clips' vectors
        (`multimodal_embeds`, (B, N, d_llm)) for the beams, and each forward that reads the placeholders (the
        prefill, or every step without a cache) merges them into the prompt's embeddings.
        `share_prefill=False` turns the shared prefill off (the captions are the same).
        The placeholder tokens are never generated (`suppress_tokens` adds to them).
        `compile_decoding=True` decodes over a static cache with the decoding step compiled as one graph
        (`torch.compile(fullgraph=True)`; on CUDA with CUDA graphs), where the library compiles: on accelerators.
        It pays off over many calls of one shape (a corpus), not for one caption; off by default.
        The output holds the prompt ids then the new tokens, (B * num_return_sequences, L + new), as usual.

        Settings: the arguments, then a `generation_config=` argument, then `self.generation_config` (a saved
        folder's, else the released decoding: `LavCapGenerationConfig`). A passed `generation_config` wins for every
        setting it holds on every supported release (4.x would replace its settings that equal the library's
        defaults, `num_beams=1` among them, by the model's); pass it by keyword.
        """
        kwargs = passed_generation_config_wins(kwargs)
        kwargs["suppress_tokens"] = self._suppressed_tokens(kwargs)
        share_prefill = kwargs.pop("share_prefill", True)
        if kwargs.pop("compile_decoding", False):
            kwargs = _compiled_decoding(kwargs)
        media = (input_features, pixel_values_videos, video_embeds)
        if any(x is not None for x in media):
            if kwargs.get("multimodal_embeds") is not None:
                raise ValueError("pass either media inputs or their multimodal_embeds, not both")
            kwargs["multimodal_embeds"] = self.model.get_multimodal_features(*media).multimodal_embeds
        elif kwargs.get("multimodal_embeds") is None and not _given_cache(kwargs):
            prompt = inputs if inputs is not None else kwargs.get("input_ids")
            if prompt is not None and kwargs.get("inputs_embeds") is None:
                if self.model.holds_placeholders(prompt):
                    raise ValueError(PLACEHOLDERS_WITHOUT_MEDIA)
        if inputs is not None and kwargs.get("input_ids") is None and inputs.dtype == torch.long:
            inputs, kwargs["input_ids"] = None, inputs
        copies = self._copies_per_prompt(kwargs)
        if share_prefill and copies > 1 and self._can_share_prefill(kwargs):
            kwargs = self._prefill_once_per_prompt(kwargs, copies)
        return super().generate(inputs, *args, **kwargs)

    def _suppressed_tokens(self, kwargs: dict[str, Any]) -> list[int] | None:
        """The tokens `generate()` never emits: the ones the settings name, and the placeholders, which the
        released model could not emit (its vocabulary has none: the fused vectors enter as embeddings) and which
        would be read back as placeholders without media."""
        tokens = list(self._generation_setting(kwargs, "suppress_tokens", None) or [])
        tokens += [token for token in self.placeholder_token_ids if token not in tokens]
        return tokens or None

    def _generation_setting(self, kwargs: dict[str, Any], name: str, default: Any) -> Any:
        """The value `generate()` will use for setting `name`: the argument, else the passed `generation_config`'s,
        else the model's (a None value is unset)."""
        passed = kwargs.get("generation_config")
        for value in (
            kwargs.get(name),
            getattr(passed, name, None),
            getattr(self.generation_config, name, None),
        ):
            if value is not None:
                return value
        return default

    def _copies_per_prompt(self, kwargs: dict[str, Any]) -> int:
        """How many rows `generate()` makes of each prompt: its beams, or its returned samples without beams."""
        beams = int(self._generation_setting(kwargs, "num_beams", 1))
        return beams if beams > 1 else int(self._generation_setting(kwargs, "num_return_sequences", 1))

    def _can_share_prefill(self, kwargs: dict[str, Any]) -> bool:
        """A prompt given as ids, decoded with a dynamic cache that starts empty and by the model alone, without
        per-step attentions or hidden states (the first step's span the prompt), whose last token is not a
        placeholder (that token is read after the cache is repeated, without the media)."""
        input_ids = kwargs.get("input_ids")
        if input_ids is None or input_ids.shape[1] < 2 or kwargs.get("inputs_embeds") is not None:
            return False
        if self._generation_setting(kwargs, "use_cache", True) is False or _given_cache(kwargs):
            return False
        if self._generation_setting(kwargs, "cache_implementation", None) is not None:
            return False
        if any(
            self._generation_setting(kwargs, name, False)
            for name in ("output_attentions", "output_hidden_states")
        ):
            return False
        if any(kwargs.get(name) is not None for name in ("assistant_model", "prompt_lookup_num_tokens")):
            return False
        last = input_ids[:, -1:]
        return not any(bool((last == token_id).any()) for token_id in self.placeholder_token_ids)

    def _prefill_once_per_prompt(self, kwargs: dict[str, Any], copies: int) -> dict[str, Any]:
        """Read all but the last token of the B prompts (B, L) into a cache, repeat its rows `copies` times (the
        layout `generate()` gives the beams: each prompt's copies next to each other) and hand it to `generate()`."""
        input_ids = kwargs["input_ids"]
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        head_mask = attention_mask[:, :-1]
        # Positions as `generate()` derives them: counted over the real tokens, so left padding is harmless.
        positions = (head_mask.long().cumsum(-1) - 1).clamp_(min=0)
        prefill = self.model(
            input_ids=input_ids[:, :-1],
            attention_mask=head_mask,
            position_ids=positions,
            multimodal_embeds=kwargs.pop("multimodal_embeds", None),
            use_cache=True,
            return_dict=True,
        )
        cache = as_cache(prefill[1])  # the cache field (`cache` in late 5.x, `past_key_values` before)
        cache.batch_repeat_interleave(copies)
        return {**kwargs, "attention_mask": attention_mask, CACHE_ARGUMENT: cache}

    def prepare_inputs_for_generation(
        self, input_ids: torch.LongTensor, inputs_embeds: torch.Tensor | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Pass the media (or their vectors) where the step's tokens hold the placeholders: on the first step (5.x
        says so with `is_first_iteration`, 4.x's first step starts at cache position 0) and on every step without a
        cache; the decoding steps of a cached run read the prompt from the cache."""
        media = {key: kwargs.pop(key, None) for key in MEDIA_INPUTS}
        model_inputs = super().prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds, **kwargs)
        if not kwargs.get("use_cache", True) or is_first_generation_step(kwargs):
            model_inputs.update(media)
        return model_inputs


def _compiled_decoding(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`generate()` settings for a static cache and a decoding step compiled as one graph, unless given."""
    from transformers import CompileConfig

    return {
        "cache_implementation": "static",
        "compile_config": CompileConfig(fullgraph=True, dynamic=False),
        **kwargs,
    }


def _given_cache(kwargs: dict[str, Any]) -> bool:
    return kwargs.get("cache", kwargs.get("past_key_values")) is not None
