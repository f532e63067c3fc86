"""Configurations of the CED audio encoder and of the LAVCap captioning model."""

from __future__ import annotations

import os
import warnings
from typing import Any

from transformers import CLIPVisionConfig, GenerationConfig, PretrainedConfig
from transformers.models.auto import CONFIG_MAPPING, AutoConfig

from .optimal_transport import (
    FUSION_TYPES,
    FUSIONS,
    LOGIT_SCALE_INIT,
    LOGIT_SCALE_MAX,
    SINKHORN_EPSILON,
    SINKHORN_ITERATIONS,
    FusionSpec,
)

FLOAT32_MODULE_CHOICES = ("audio_tower", "vision_tower", "fusion", "multi_modal_projector")
"""The modules of `LavCapModel` between the media and the decoder, which `float32_modules` may keep in float32."""

PIPELINE_TASK = "audio-visual-captioning"
"""The task name of `AudioVisualCaptioningPipeline`, as registered with transformers and recorded in saved configs."""

USES_AUDIO = tuple(name for name, spec in FUSIONS.items() if spec.uses_audio)
USES_VISUAL = tuple(name for name, spec in FUSIONS.items() if spec.uses_visual)
RENAMED_FUSION_TYPES = {former: spec.name for spec in FUSIONS.values() for former in spec.former_names}
"""Former `fusion_type` values -> current names; configs saved with a former name load under the current one."""

LLAMA2_VOCAB_SIZE = 32000
"""Tokens of the LLaMA-2 tokenizer the paper's decoder (LLaMA-2-7B-chat) was trained with."""
PAPER_PAD_TOKEN_ID, PAPER_AUDIO_TOKEN_ID, PAPER_VIDEO_TOKEN_ID = range(
    LLAMA2_VOCAB_SIZE, LLAMA2_VOCAB_SIZE + 3
)
"""Ids that `add_lavcap_special_tokens` gives `[PAD]`, `<|audio|>` and `<|video|>` on the LLaMA-2 tokenizer, in the
order it adds them (as `lavcap convert` does)."""


def paper_text_config(**overrides: Any) -> PretrainedConfig:
    """LLaMA-2-7B's config with its vocabulary grown by `[PAD]` and the two placeholder tokens (32,003 rows), `[PAD]`
    as pad token: the decoder of the paper's model as `lavcap convert` builds it."""
    settings = {
        "vocab_size": PAPER_VIDEO_TOKEN_ID + 1,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": PAPER_PAD_TOKEN_ID,
    }
    return CONFIG_MAPPING["llama"](**{**settings, **overrides})


class CedConfig(PretrainedConfig):
    r"""Configuration of [`CedModel`], the CED audio transformer (Dinkel et al., 2023).

    The defaults are CED-base as used by LAVCap: 64 mel bins, 1024 frames (10.24 s), 16x16 patches, 768-d, 12 layers.

    Args:
        num_mel_bins: mel bins of the input fbank.
        target_length: frames of the input fbank the time position embeddings cover.
        patch_size: side of the square patches cut from the (mel, time) plane.
        hidden_size: token width.
        num_hidden_layers: transformer blocks.
        num_attention_heads: attention heads per block.
        mlp_ratio: width of the MLP hidden layer relative to `hidden_size`.
        qkv_bias: whether the q/k/v projections have a bias.
        layer_norm_eps: epsilon of the LayerNorms.
        batch_norm_momentum: momentum of the input BatchNorm over mel bins.
        initializer_range: std of the truncated normal used to initialise weights.
    """

    model_type = "ced"

    def __init__(
        self,
        num_mel_bins: int = 64,
        target_length: int = 1024,
        patch_size: int = 16,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        layer_norm_eps: float = 1e-6,
        batch_norm_momentum: float = 0.01,
        initializer_range: float = 0.02,
        **kwargs: Any,
    ) -> None:
        if num_mel_bins % patch_size or target_length % patch_size:
            raise ValueError(
                f"num_mel_bins ({num_mel_bins}) and target_length ({target_length}) must be multiples of "
                f"patch_size ({patch_size})"
            )
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}"
            )
        self.num_mel_bins = num_mel_bins
        self.target_length = target_length
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.mlp_ratio = mlp_ratio
        self.qkv_bias = qkv_bias
        self.layer_norm_eps = layer_norm_eps
        self.batch_norm_momentum = batch_norm_momentum
        self.initializer_range = initializer_range
        super().__init__(**kwargs)

    @property
    def freq_patches(self) -> int:
        """Patch rows along the mel axis (4 for 64 mel bins)."""
        return self.num_mel_bins // self.patch_size

    @property
    def time_patches(self) -> int:
        """Patch columns along time (64 for 1024 frames)."""
        return self.target_length // self.patch_size


def _sub_config(value: PretrainedConfig | dict, default_type: str) -> PretrainedConfig:
    """Build a sub-config from a config or a dict with `model_type` (`default_type` when it has none)."""
    if isinstance(value, PretrainedConfig):
        return value
    value = dict(value)
    return CONFIG_MAPPING[value.pop("model_type", default_type)](**value)


def _without_installed_pipeline(custom_pipelines: dict[str, Any]) -> dict[str, Any]:
    """A saved config names the folder's own copy of the pipeline code (`custom_pipelines`), for users without this
    package; transformers then insists on `trust_remote_code=True` even where the package is installed. Where this
    process has the package's pipeline registered under the same task and class, that entry is dropped, so that the
    installed, reviewed code runs and nothing downloaded does."""
    from transformers.pipelines import PIPELINE_REGISTRY

    saved = custom_pipelines.get(PIPELINE_TASK)
    installed = PIPELINE_REGISTRY.supported_tasks.get(PIPELINE_TASK)
    if saved is None or installed is None or saved["impl"].rsplit(".", 1)[-1] != installed["impl"].__name__:
        return custom_pipelines
    return {task: spec for task, spec in custom_pipelines.items() if task != PIPELINE_TASK}


RELEASED_DECODING = {"num_beams": 4, "max_new_tokens": 200, "do_sample": False}
"""The released captioning decoding (the `generate` section of the release's configs/config_best.yaml): beam search,
4 beams, up to 200 new tokens, no sampling. Its other settings change nothing here: `temperature` 1.0 and `top_p`
0.9 act only when sampling; `repetition_penalty` and `length_penalty` 1.0 are the library's defaults; `min_length` 1
counts the prompt embeddings there, which the library subtracts, leaving 0."""


class LavCapGenerationConfig(GenerationConfig):
    r"""The model's `generation_config`: a [`GenerationConfig`] whose unset decoding settings are the released ones.

    Each setting of `RELEASED_DECODING` not given (as an argument, or as a key of a folder's
    `generation_config.json`) takes the released value, so `generate()` without arguments decodes as the release
    did; a folder's own settings win, and `generate()`'s arguments win over both. The released settings are always
    written to `generation_config.json`, also where they equal the library's defaults (`num_beams` 1 on
    transformers 4.x), so that a saved choice is read back as it was made.
    """

    def __init__(self, **kwargs: Any) -> None:
        for name, value in RELEASED_DECODING.items():
            kwargs.setdefault(name, value)
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, model_config: PretrainedConfig | dict) -> LavCapGenerationConfig:
        """The token ids of `model_config`'s language model and the released decoding (transformers 4.x would
        copy the model config's default decoding settings: a LAVCap config carries none of its own)."""
        generation_config = super().from_model_config(model_config)
        generation_config.update(**RELEASED_DECODING)
        generation_config._original_object_hash = hash(generation_config)
        return generation_config

    @classmethod
    def for_model(
        cls, source: str | os.PathLike | None, model_config: PretrainedConfig, **hub_options: Any
    ) -> LavCapGenerationConfig:
        """The generation config of the model folder or Hub repository `source`: its `generation_config.json`, else
        the released decoding with `model_config`'s token ids. Read here rather than by the library, which without
        the file builds a plain config from `config.json` (5.x) or keeps the new model's (4.x)."""
        if source is None:  # weights given as a state dict
            return cls.from_model_config(model_config)
        try:
            return cls.from_pretrained(source, **hub_options)
        except OSError:
            return cls.from_model_config(model_config)

    def to_diff_dict(self) -> dict[str, Any]:
        return {**super().to_diff_dict(), **{name: getattr(self, name) for name in RELEASED_DECODING}}


class LavCapConfig(PretrainedConfig):
    r"""Configuration of [`LavCapForConditionalGeneration`].

    Args:
        audio_config: [`CedConfig`] (or dict) of the audio encoder.
        vision_config: CLIP vision config (or dict) of the frozen frame encoder, or None when the model only ever gets
            precomputed `video_embeds`.
        text_config: config (or dict with `model_type`) of any causal LM. None: the paper's, LLaMA-2-7B with the
            vocabulary grown by `[PAD]`, `<|audio|>` and `<|video|>` (`paper_text_config`).
        fusion_type: one of `FUSION_TYPES` (see `lavcap_hf.model.optimal_transport.FUSIONS`); a name in
            `RENAMED_FUSION_TYPES` is replaced by its current name with a FutureWarning.
        ot_loss_weight: weight of the OT alignment loss in `loss = lm_loss + ot_loss`.
        sinkhorn_epsilon: entropic regularisation of the Sinkhorn iterations.
        sinkhorn_iterations: Sinkhorn iterations.
        num_frames: frames per clip (visual tokens).
        visual_embed_dim: width of one frame's visual embedding (CLIP's `projection_dim`, 768 for ViT-L/14).
        audio_token_id: id of the `<|audio|>` placeholder token in the text vocabulary. None with the default
            `text_config`: 32001, the id `add_lavcap_special_tokens` gives it on the LLaMA-2 tokenizer.
        video_token_id: id of the `<|video|>` placeholder token (None with the default `text_config`: 32002).
        logit_scale_init: initial OT logit scale (ln(1/0.07)).
        logit_scale_max: the scale is clamped to [0, logit_scale_max] every forward (4.6052, as released).
        float32_modules: modules of [`LavCapModel`] among `FLOAT32_MODULE_CHOICES` that stay float32 when the
            model is loaded in half precision (`from_pretrained(dtype=...)`, `"auto"` included): `lavcap convert`
            keeps CED, the fusion (the OT logit scale) and the projector in float32, as the release ran them.
    """

    model_type = "lavcap"
    sub_configs = {"audio_config": CedConfig, "vision_config": CLIPVisionConfig, "text_config": AutoConfig}

    def __init__(
        self,
        audio_config: CedConfig | dict | None = None,
        vision_config: CLIPVisionConfig | dict | None = None,
        text_config: PretrainedConfig | dict | None = None,
        fusion_type: str = "ot_att",
        ot_loss_weight: float = 1.0,
        sinkhorn_epsilon: float = SINKHORN_EPSILON,
        sinkhorn_iterations: int = SINKHORN_ITERATIONS,
        num_frames: int = 20,
        visual_embed_dim: int | None = None,
        audio_token_id: int | None = None,
        video_token_id: int | None = None,
        logit_scale_init: float = LOGIT_SCALE_INIT,
        logit_scale_max: float = LOGIT_SCALE_MAX,
        float32_modules: list[str] | tuple[str, ...] = (),
        **kwargs: Any,
    ) -> None:
        if kwargs.get("custom_pipelines"):
            kwargs["custom_pipelines"] = _without_installed_pipeline(kwargs["custom_pipelines"])
        fusion_type = _current_fusion_type(fusion_type)
        if isinstance(audio_config, dict):
            audio_config = CedConfig(**{k: v for k, v in audio_config.items() if k != "model_type"})
        self.audio_config = audio_config if audio_config is not None else CedConfig()
        if isinstance(vision_config, dict):
            vision_config = CLIPVisionConfig(**{k: v for k, v in vision_config.items() if k != "model_type"})
        self.vision_config = vision_config
        if vision_config is None:
            # Precomputed frame features only: no vision sub-config to serialise or to set a dtype on.
            self.sub_configs = {k: v for k, v in type(self).sub_configs.items() if k != "vision_config"}
        if text_config is None:
            # The paper's decoder, whose vocabulary has room for the tokens the processor adds.
            text_config = paper_text_config()
            audio_token_id = PAPER_AUDIO_TOKEN_ID if audio_token_id is None else audio_token_id
            video_token_id = PAPER_VIDEO_TOKEN_ID if video_token_id is None else video_token_id
        self.text_config = _sub_config(text_config, "llama")
        self.fusion_type = fusion_type
        self.ot_loss_weight = ot_loss_weight
        self.sinkhorn_epsilon = sinkhorn_epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.num_frames = num_frames
        if visual_embed_dim is None:
            visual_embed_dim = vision_config.projection_dim if vision_config is not None else 768
        self.visual_embed_dim = visual_embed_dim
        self.audio_token_id = audio_token_id
        self.video_token_id = video_token_id
        self.logit_scale_init = logit_scale_init
        self.logit_scale_max = logit_scale_max
        unknown = sorted(set(float32_modules) - set(FLOAT32_MODULE_CHOICES))
        if unknown:
            raise ValueError(f"float32_modules must be among {FLOAT32_MODULE_CHOICES}, got {unknown}")
        self.float32_modules = list(float32_modules)
        # The LM head shares the input embedding matrix exactly when the language model's config says so.
        kwargs.setdefault("tie_word_embeddings", getattr(self.text_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """`PretrainedConfig.from_pretrained`, except that a config declaring another `model_type` is a ValueError
        (the library only warns, then builds a default, LLaMA-7B-sized LAVCap around the foreign settings)."""
        config_dict, _ = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
        declared = config_dict.get("model_type", cls.model_type)
        if declared != cls.model_type:
            raise ValueError(
                f"{pretrained_model_name_or_path}: its config declares model_type={declared!r}, not "
                f"{cls.model_type!r}; this is not a LAVCap checkpoint (official LAVCap checkpoints convert with "
                "lavcap_hf.convert)"
            )
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output.pop("sub_configs", None)  # set per instance when there is no vision config; not a setting
        return output

    @property
    def num_audio_tokens(self) -> int:
        """Audio tokens after the frequency mean-pooling: one per CED time patch (64)."""
        return self.audio_config.time_patches

    @property
    def fusion_spec(self) -> FusionSpec:
        """The row of `FUSIONS` that describes `fusion_type`."""
        return FUSIONS[self.fusion_type]

    @property
    def uses_audio(self) -> bool:
        return self.fusion_spec.uses_audio

    @property
    def uses_visual(self) -> bool:
        return self.fusion_spec.uses_visual

    @property
    def placeholder_counts(self) -> tuple[int, int]:
        """(audio placeholders, video placeholders) the prompt carries: one per fused token, from the fusion type's
        token layout. At the paper's sizes: 64 + 20 for `ot_att`, 64 + 40 for `concat` (the frames twice), 64 + 0
        for the types that keep the audio positions (channel concatenation, cross-attention), 0 + 20 for
        `visual_only`."""
        return self.fusion_spec.token_counts(self.num_audio_tokens, self.num_frames)


def _current_fusion_type(fusion_type: str) -> str:
    """`fusion_type`, or its current name if it is a former one (with a FutureWarning); ValueError if unknown."""
    if fusion_type in RENAMED_FUSION_TYPES:
        current = RENAMED_FUSION_TYPES[fusion_type]
        warnings.warn(
            f"fusion_type={fusion_type!r} is now called {current!r}: {FUSIONS[current].description}. Loading it as "
            f"{current!r}, which computes the same with the same weights; lavcap_hf.model.optimal_transport.FUSIONS "
            "lists the fusion types and the released ones they reproduce.",
            FutureWarning,
            stacklevel=3,
        )
        return current
    if fusion_type not in FUSION_TYPES:
        raise ValueError(f"fusion_type must be one of {FUSION_TYPES}, got {fusion_type!r}")
    return fusion_type
