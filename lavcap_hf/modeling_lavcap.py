"""LAVCap: audio encoder + frozen CLIP frames + optimal-transport fusion + causal LM decoder."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, CLIPVisionModelWithProjection, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast, ModelOutput

from .configuration_lavcap import PIPELINE_TASK, LavCapConfig
from .modeling_ced import CedModel
from .optimal_transport import OT_FUSION_TYPES, build_fusion

IGNORE_INDEX = -100
# Devices on which the placeholder-count check runs on the device (`torch._assert_async`) rather than as a Python
# `if`, which would make the host wait for the device once per forward; meta tensors have no values to read.
_ON_DEVICE_CHECK_TYPES = ("cuda", "meta")


@dataclass
class LavCapModelOutput(ModelOutput):
    """
    Args:
        multimodal_embeds: fused tokens projected to the LM width (B, N, d_llm); N = 84 for the paper's model.
        ot_loss: `ot_loss_weight * (loss_v + loss_a)` for the OT fusion types, else None.
        ot_plan: transport plan exp(L) (B, V, A), rows sum to 1/V and columns to 1/A; only with `output_ot_plan`.
        audio_embeds: audio tokens after frequency pooling (B, A, C).
        video_embeds: one visual embedding per frame (B, V, C).
    """

    multimodal_embeds: torch.Tensor | None = None
    ot_loss: torch.Tensor | None = None
    ot_plan: torch.Tensor | None = None
    audio_embeds: torch.Tensor | None = None
    video_embeds: torch.Tensor | None = None


@dataclass
class LavCapCausalLMOutput(CausalLMOutputWithPast):
    """Causal LM output plus `lm_loss`, `ot_loss` (`loss = lm_loss + ot_loss`) and the OT plan on request."""

    lm_loss: torch.Tensor | None = None
    ot_loss: torch.Tensor | None = None
    ot_plan: torch.Tensor | None = None


class LavCapPreTrainedModel(PreTrainedModel):
    config_class = LavCapConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["CedBlock", "CLIPEncoderLayer", "LlamaDecoderLayer"]

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any, **kwargs: Any
    ):
        """`PreTrainedModel.from_pretrained`, except that a checkpoint tensor whose shape differs from the model's
        raises a ValueError naming each such key and both shapes (the library re-initialises it, or raises an error
        that names neither), unless `ignore_mismatched_sizes=True` asks for the re-initialisation."""
        if kwargs.get("ignore_mismatched_sizes"):
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
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

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            module.weight.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        if hasattr(module, "logit_scale") and isinstance(module.logit_scale, nn.Parameter):
            module.logit_scale.fill_(self.config.logit_scale_init)


def _describe_mismatches(
    mismatched: list[Any], model: nn.Module, source: str | os.PathLike, hub_kwargs: dict[str, Any]
) -> list[str]:
    """One `key: checkpoint (a, b) vs model (c, d)` per mismatched tensor. transformers 5.x lists (key, checkpoint
    shape, model shape); 4.55 lists keys only, so the checkpoint shapes are read from the safetensors headers."""
    if all(isinstance(entry, tuple) for entry in mismatched):
        entries = [(key, tuple(ckpt), tuple(ours)) for key, ckpt, ours in mismatched]
    else:
        stored = _checkpoint_shapes(source, hub_kwargs)
        state = model.state_dict()
        prefix = f"{model.base_model_prefix}."
        entries = [
            (key, stored.get(key, stored.get(prefix + key, "unknown")), tuple(state[key].shape))
            for key in mismatched
        ]
    return [f"{key}: checkpoint {ckpt} vs model {ours}" for key, ckpt, ours in entries]


def _checkpoint_shapes(source: str | os.PathLike, hub_kwargs: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of the safetensors weights (sharded or not) of a folder or Hub repo, from the file headers."""
    from safetensors import safe_open
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

    names = ("cache_dir", "revision", "subfolder", "token", "local_files_only")
    options = {k: hub_kwargs[k] for k in names if k in hub_kwargs}

    def resolve(filename: str) -> str | None:
        return cached_file(source, filename, _raise_exceptions_for_missing_entries=False, **options)

    index = resolve(SAFE_WEIGHTS_INDEX_NAME)
    if index is not None:
        with open(index, encoding="utf-8") as f:
            files = [resolve(shard) for shard in sorted(set(json.load(f)["weight_map"].values()))]
    else:
        files = [resolve(SAFE_WEIGHTS_NAME)]
    shapes = {}
    for file in filter(None, files):
        with safe_open(file, framework="pt") as handle:
            shapes.update({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()})
    return shapes


class LavCapModel(LavCapPreTrainedModel):
    """The audio-visual front end: encoders, OT fusion and the projector to the LM width (no language model)."""

    def __init__(self, config: LavCapConfig) -> None:
        super().__init__(config)
        self._check_widths(config)
        self.audio_tower = CedModel(config.audio_config) if config.uses_audio else None
        has_vision = config.uses_visual and config.vision_config is not None
        self.vision_tower = CLIPVisionModelWithProjection(config.vision_config) if has_vision else None
        fusion_width = config.audio_config.hidden_size if config.uses_audio else config.visual_embed_dim
        self.fusion = build_fusion(
            config.fusion_type,
            hidden_size=fusion_width,
            sinkhorn_epsilon=config.sinkhorn_epsilon,
            sinkhorn_iterations=config.sinkhorn_iterations,
            logit_scale_init=config.logit_scale_init,
            logit_scale_max=config.logit_scale_max,
        )
        self.multi_modal_projector = nn.Linear(self.fusion.output_dim, config.text_config.hidden_size)
        self.post_init()

    @staticmethod
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

    def get_audio_features(self, input_features: torch.Tensor) -> torch.Tensor:
        """fbank (B, frames, mel) -> audio tokens (B, frames/16, C), CED patches averaged over frequency rows."""
        patches = self.audio_tower(input_features).last_hidden_state  # (B, F*T, C), frequency-major
        batch, _, width = patches.shape
        freq_rows = self.config.audio_config.freq_patches
        return patches.view(batch, freq_rows, -1, width).mean(dim=1)

    def get_video_features(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        """frames (B, V, 3, H, W) -> projected CLIP image embeddings (B, V, C)."""
        if self.vision_tower is None:
            raise ValueError(
                "this model has no vision tower (vision_config is None): pass precomputed `video_embeds` "
                "of shape (batch, frames, visual_embed_dim) instead of `pixel_values_videos`"
            )
        if pixel_values_videos.ndim != 5:
            raise ValueError(
                f"pixel_values_videos must have shape (batch, frames, 3, height, width), got {tuple(pixel_values_videos.shape)}"
            )
        batch, frames = pixel_values_videos.shape[:2]
        pixels = pixel_values_videos.flatten(0, 1).to(self.vision_tower.dtype)
        # A frozen tower stays out of the backward pass, also when gradient checkpointing hooks its inputs.
        trainable = any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            embeds = self.vision_tower(pixel_values=pixels).image_embeds
        return embeds.view(batch, frames, -1)

    def forward(
        self,
        input_features: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_embeds: torch.Tensor | None = None,
        output_ot_plan: bool = False,
    ) -> LavCapModelOutput:
        """Encode a batch of clips into the LM input vectors that replace the placeholder tokens.

        Args:
            input_features: normalised fbank (B, 1024, 64).
            pixel_values_videos: CLIP-preprocessed frames (B, V, 3, 224, 224), or
            video_embeds: precomputed projected CLIP embeddings (B, V, 768).
        """
        audio_embeds = self._audio_tokens(input_features)
        video_embeds = self._visual_tokens(pixel_values_videos, video_embeds)
        fused = self.fusion(audio_embeds, video_embeds, output_ot_plan=output_ot_plan)
        ot_loss = None
        if self.config.fusion_type in OT_FUSION_TYPES:
            ot_loss = self.config.ot_loss_weight * (fused.loss_v + fused.loss_a)
        projector_dtype = self.multi_modal_projector.weight.dtype
        return LavCapModelOutput(
            multimodal_embeds=self.multi_modal_projector(fused.fused.to(projector_dtype)),
            ot_loss=ot_loss,
            ot_plan=fused.log_plan.exp() if fused.log_plan is not None else None,
            audio_embeds=audio_embeds,
            video_embeds=video_embeds,
        )

    def _audio_tokens(self, input_features: torch.Tensor | None) -> torch.Tensor | None:
        if not self.config.uses_audio:
            return None
        if input_features is None:
            raise ValueError(
                f"fusion_type={self.config.fusion_type!r} needs `input_features` (batch, frames, mel)"
            )
        return self.get_audio_features(input_features)

    def _visual_tokens(
        self, pixel_values_videos: torch.Tensor | None, video_embeds: torch.Tensor | None
    ) -> torch.Tensor | None:
        if not self.config.uses_visual:
            return None
        if video_embeds is not None:
            expected = self.config.visual_embed_dim
            if video_embeds.ndim != 3 or video_embeds.shape[-1] != expected:
                raise ValueError(
                    f"video_embeds must have shape (batch, frames, {expected}), got {tuple(video_embeds.shape)}"
                )
            return video_embeds
        if pixel_values_videos is None:
            raise ValueError(
                f"fusion_type={self.config.fusion_type!r} needs `pixel_values_videos` or precomputed `video_embeds`"
            )
        return self.get_video_features(pixel_values_videos)


class LavCapForConditionalGeneration(LavCapPreTrainedModel, GenerationMixin):
    """LAVCap captioner: [`LavCapModel`] front end + any causal LM; fused vectors replace the placeholder tokens.

    `generate()` runs the encoders and the fusion once per call, on the B clips (not on their beam copies).
    """

    def __init__(self, config: LavCapConfig) -> None:
        super().__init__(config)
        self.model = LavCapModel(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Save as usual, with the remote-code entries a folder needs where this package is not installed.

        `register_for_auto_class` keeps one auto class per model class (AutoModelForCausalLM here), so the
        AutoModel entry is added here; the registered `audio-visual-captioning` pipeline is saved alongside as
        `custom_pipelines`, so that `pipeline(model=folder, trust_remote_code=True)` finds it.
        """
        if getattr(type(self), "_auto_class", None) is not None:
            module = type(self).__module__.split(".")[-1]
            auto_map = getattr(self.config, "auto_map", None) or {}
            self.config.auto_map = {**auto_map, "AutoModel": f"{module}.{type(self).__name__}"}
            self._save_custom_pipeline(save_directory)
        super().save_pretrained(save_directory, *args, **kwargs)

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
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    @property
    def placeholder_token_ids(self) -> list[int]:
        return [i for i in (self.config.audio_token_id, self.config.video_token_id) if i is not None]

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
        output_ot_plan: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
        **lm_kwargs: Any,
    ) -> LavCapCausalLMOutput:
        """
        Args:
            input_ids: prompt (+ caption) tokens with `placeholder_counts` placeholder tokens per row (B, L).
            attention_mask: (B, L), 0 on padding.
            position_ids: (B, L); generation derives them from the attention mask so left padding is harmless.
            input_features: normalised fbank (B, 1024, 64).
            pixel_values_videos: CLIP-preprocessed frames (B, V, 3, 224, 224), or
            video_embeds: precomputed projected CLIP embeddings (B, V, 768).
            labels: (B, L), -100 everywhere but the caption and EOS.
            logits_to_keep: compute the logits of the last N positions only (0: all of them; `generate()` passes 1,
                so that the prefill does not build (B x beams, L, vocab) logits). Must be 0 with `labels`.
            lm_kwargs: passed to the language model (cache, position ids, `use_cache`, ...).
        Returns:
            `loss = lm_loss + ot_loss`, `lm_loss`, `ot_loss`, `logits` (B, L or N, vocab), the cache, and `ot_plan`
            (B, V, A) when `output_ot_plan`.
        """
        keeps_all_logits = isinstance(logits_to_keep, int) and logits_to_keep == 0
        if labels is not None and not keeps_all_logits:
            raise ValueError("the loss needs the logits of every position: pass logits_to_keep=0 with labels")
        if not keeps_all_logits:
            lm_kwargs["logits_to_keep"] = logits_to_keep
        has_media = any(x is not None for x in (input_features, pixel_values_videos, video_embeds))
        front = None
        if inputs_embeds is None and has_media:
            inputs_embeds, front = self._embed_prompt(
                input_ids, input_features, pixel_values_videos, video_embeds, output_ot_plan
            )
        elif inputs_embeds is None:
            inputs_embeds = self._embed_tokens(input_ids)
            if self._count_placeholders(input_ids).any() and not self._has_cache(lm_kwargs):
                raise ValueError(
                    "input_ids contain audio/video placeholder tokens but no input_features, pixel_values_videos "
                    "or video_embeds were given"
                )
        lm_out = self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, **lm_kwargs
        )
        lm_loss = self._lm_loss(lm_out.logits, labels) if labels is not None else None
        ot_loss = front.ot_loss if front is not None else None
        loss = None
        if lm_loss is not None:
            loss = lm_loss + ot_loss if ot_loss is not None else lm_loss
        extra = {k: v for k, v in lm_out.items() if k not in ("loss", "logits")}
        return LavCapCausalLMOutput(
            loss=loss,
            logits=lm_out.logits,
            lm_loss=lm_loss,
            ot_loss=ot_loss,
            ot_plan=front.ot_plan if front is not None else None,
            **extra,
        )

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
        """`GenerationMixin.generate` with the media encoded up front, once per clip.

        The encoders, the fusion and the projector run on the B clips; their vectors replace the placeholders of
        `input_ids` (B, L) and the language model decodes from these `inputs_embeds`, which `generate()` repeats
        for the beams (as the released code does). Without media inputs this is the plain `generate()`.
        The output holds the prompt ids then the new tokens, (B * num_return_sequences, L + new), as usual.
        """
        media = (input_features, pixel_values_videos, video_embeds)
        if all(x is None for x in media):
            return super().generate(inputs, *args, **kwargs)
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError(
                "pass either inputs_embeds or media inputs (input_features, pixel_values_videos, ...)"
            )
        input_ids = kwargs.pop("input_ids", None)
        if (input_ids is None) == (inputs is None):
            raise ValueError(
                "generate() with media inputs needs the prompt ids once: as input_ids or as inputs"
            )
        input_ids = input_ids if input_ids is not None else inputs
        inputs_embeds, _ = self._embed_prompt(input_ids, *media)
        return super().generate(None, *args, input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)

    def _embed_prompt(
        self,
        input_ids: torch.LongTensor,
        input_features: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_embeds: torch.Tensor | None = None,
        output_ot_plan: bool = False,
    ) -> tuple[torch.Tensor, LavCapModelOutput]:
        """Prompt embeddings (B, L, d) with the B clips' fused vectors at the placeholders, and the front end's
        output (OT loss, and the plan when `output_ot_plan`)."""
        token_embeds = self._embed_tokens(input_ids)
        front = self.model(input_features, pixel_values_videos, video_embeds, output_ot_plan=output_ot_plan)
        return self._scatter_multimodal(input_ids, token_embeds, front.multimodal_embeds), front

    def _embed_tokens(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Token embeddings (B, L, d); placeholders are looked up too (they are in the vocabulary) then replaced."""
        if input_ids is None:
            raise ValueError("pass either input_ids or inputs_embeds")
        return self.get_input_embeddings()(input_ids)

    def _placeholder_mask(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """(B, L) bool, True at the audio and video placeholder tokens."""
        # Compared one id at a time: a tensor of the ids would be a host-to-device copy, which waits for the device.
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for token_id in self.placeholder_token_ids:
            mask |= input_ids == token_id
        return mask

    def _count_placeholders(self, input_ids: torch.LongTensor) -> torch.Tensor:
        return self._placeholder_mask(input_ids).sum(dim=1)

    def _scatter_multimodal(
        self, input_ids: torch.LongTensor, inputs_embeds: torch.Tensor, multimodal_embeds: torch.Tensor
    ) -> torch.Tensor:
        """Put the N fused vectors of each row (B, N, d) at that row's N placeholder positions, in order."""
        if not self.placeholder_token_ids:
            raise ValueError(
                "config.audio_token_id / video_token_id are not set: the prompt has no placeholders"
            )
        if multimodal_embeds.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"got {multimodal_embeds.shape[0]} clips for {input_ids.shape[0]} prompts: pass one clip per prompt"
            )
        num_vectors = multimodal_embeds.shape[1]
        is_placeholder = self._placeholder_mask(input_ids)
        self._check_placeholder_counts(is_placeholder.sum(dim=1), num_vectors)
        # The k-th placeholder of a row takes the row's k-th vector. A gather, not masked_scatter, whose backward
        # selects by the mask and so waits for the device: static shapes keep both directions free of syncs.
        order = (is_placeholder.cumsum(dim=1) - 1).clamp_(0, num_vectors - 1)
        index = order.unsqueeze(-1).expand(-1, -1, inputs_embeds.shape[-1])
        vectors = multimodal_embeds.to(inputs_embeds.dtype).gather(1, index)
        return torch.where(is_placeholder.unsqueeze(-1), vectors, inputs_embeds)

    def _check_placeholder_counts(self, counts: torch.Tensor, expected: int) -> None:
        """Every prompt of the batch (counts (B,)) must hold `expected` placeholders: ValueError naming the counts,
        or on CUDA a device-side assertion with the same message, raised at the next synchronisation."""
        message = (
            f"each prompt must hold {expected} placeholder tokens (audio then video) for fusion_type="
            f"{self.config.fusion_type!r}"
        )
        if counts.device.type in _ON_DEVICE_CHECK_TYPES:
            torch._assert_async((counts == expected).all(), message)
        elif (counts != expected).any():
            raise ValueError(f"{message}; got {counts.tolist()} for a batch of {len(counts)} clips")

    @staticmethod
    def _has_cache(lm_kwargs: dict[str, Any]) -> bool:
        cache = lm_kwargs.get("cache", lm_kwargs.get("past_key_values"))
        return cache is not None and cache.get_seq_length() > 0

    @staticmethod
    def _lm_loss(logits: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
        """Mean next-token cross entropy over the label positions that are not -100, in fp32."""
        shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
        shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
        return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)

    def prepare_inputs_for_generation(
        self,
        *args: Any,
        inputs_embeds: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Pass media inputs on the prefill step only (where `GenerationMixin.generate` is called with them directly:
        `generate()` above encodes them itself). `inputs_embeds` is named so that `generate()` forwards it."""
        model_inputs = super().prepare_inputs_for_generation(*args, inputs_embeds=inputs_embeds, **kwargs)
        if not self._has_cache(model_inputs) or not kwargs.get("use_cache", True):
            model_inputs.update(
                input_features=input_features,
                pixel_values_videos=pixel_values_videos,
                video_embeds=video_embeds,
            )
        return model_inputs
