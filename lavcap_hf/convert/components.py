"""Building LAVCap from its pretrained parts: CED and CLIP weights renamed and loaded into their towers, a causal LM
loaded once and put into the model, the tokenizer given the placeholder tokens."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPConfig,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..model._compat import dtype_kwarg
from ..model.configuration_lavcap import CedConfig, LavCapConfig
from ..model.modeling_ced import CedModel, interpolate_time_pos_embed
from ..model.modeling_lavcap import LavCapForConditionalGeneration, MediaModules, build_media_modules
from ..model.processing_lavcap import add_lavcap_special_tokens
from .checkpoints import StateDictSource, load_state_dict
from .report import ConversionReport

_CED_DROPPED = (
    (
        "front_end.",
        "mel front end of the CED release: this package computes the fbank in its feature extractor",
    ),
    ("outputlayer.", "AudioSet classifier head of CED: LAVCap uses the patch tokens"),
    ("output_layer.", "AudioSet classifier head of CED: LAVCap uses the patch tokens"),
)
FLOAT32_PARTS = ("audio_tower", "fusion", "multi_modal_projector")
"""The parts `lavcap convert` keeps in float32, as the release ran them: CED, the fusion (the OT logit scale, and the
cross-attention where there is one) and the projector."""

_CLIP_DROPPED = (
    ("text_model.", "CLIP text tower: LAVCap encodes frames only"),
    ("text_projection.", "CLIP text projection: LAVCap encodes frames only"),
    ("logit_scale", "CLIP's contrastive temperature: unused"),
)


def normalize_ced_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Rename a CED checkpoint of any supported layout to `CedModel` names.

    Strips the Hub's `encoder.` prefix, renames `init_bn.1.*` to `init_bn.*`, splits each fused `qkv` (3C, C) into
    `q_proj`, `k_proj`, `v_proj` (C, C) and drops the mel front end and the classifier. Position embeddings are
    left at their stored length.
    """
    report = ConversionReport()
    hub_layout = any(key.startswith("encoder.") for key in state_dict)
    weights: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        name = key.removeprefix("encoder.") if hub_layout else key
        reason = next((why for prefix, why in _CED_DROPPED if name.startswith(prefix)), None)
        if reason is not None:
            report.skipped[key] = reason
            continue
        name = name.replace("init_bn.1.", "init_bn.")
        if re.search(r"\.attn\.qkv\.(weight|bias)$", name):
            for projection, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0), strict=True):
                weights[name.replace(".qkv.", f".{projection}.")] = part.contiguous()
            report.mapped[key] = name.replace(".qkv.", ".{q,k,v}_proj.")
            continue
        weights[name] = tensor
        report.mapped[key] = name
    return weights, report


def ced_config_from_state_dict(state_dict: Mapping[str, torch.Tensor], **overrides: Any) -> CedConfig:
    """CED hyper-parameters read off weights of any supported layout; `overrides` (e.g. `target_length`) win.

    The head count is `hidden_size // 64`: every released CED size (tiny to base) uses 64-wide heads.
    """
    weights, _ = normalize_ced_state_dict(state_dict)
    try:
        patch_weight = weights["patch_embed.proj.weight"]  # (C, 1, p, p)
        freq_pos_embed = weights["freq_pos_embed"]  # (1, C, F, 1)
        fc1_weight = weights["blocks.0.mlp.fc1.weight"]  # (C * mlp_ratio, C)
    except KeyError as error:
        raise ValueError(f"not a CED checkpoint: it has no {error.args[0]!r} tensor") from None
    hidden_size, patch_size = patch_weight.shape[0], patch_weight.shape[-1]
    settings: dict[str, Any] = {
        "num_mel_bins": freq_pos_embed.shape[2] * patch_size,
        "patch_size": patch_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("blocks.")),
        "num_attention_heads": max(1, hidden_size // 64),
        "mlp_ratio": fc1_weight.shape[0] / hidden_size,
        "qkv_bias": "blocks.0.attn.q_proj.bias" in weights,
    }
    settings.update(overrides)
    return CedConfig(**settings)


def load_ced_weights(model: CedModel, state_dict: Mapping[str, torch.Tensor]) -> ConversionReport:
    """Load CED weights of any supported layout into `model`.

    The time position embeddings are cut, or bilinearly interpolated, to the model's `time_patches` (63 -> 64 for the
    release's 1012-frame embeddings and LAVCap's 1024 frames).
    """
    weights, report = normalize_ced_state_dict(state_dict)
    if "time_pos_embed" in weights:
        weights["time_pos_embed"] = interpolate_time_pos_embed(
            weights["time_pos_embed"], model.config.time_patches
        )
    _load_complete(model, weights, report, "CED")
    return report


def clip_vision_config(source: str | os.PathLike) -> CLIPVisionConfig:
    """The vision config of a CLIP checkpoint (folder or Hub id), with CLIP's `projection_dim`."""
    config = AutoConfig.from_pretrained(source)
    if isinstance(config, CLIPConfig):
        vision = config.vision_config
        vision.projection_dim = config.projection_dim
        return vision
    if isinstance(config, CLIPVisionConfig):
        return config
    raise ValueError(f"{source} is a {type(config).__name__} checkpoint, not CLIP")


def load_clip_vision_weights(
    model: CLIPVisionModelWithProjection, state_dict: Mapping[str, torch.Tensor]
) -> ConversionReport:
    """Load the vision tower and visual projection of a CLIP checkpoint into `model`; the text tower is dropped.

    Vision keys may or may not carry the `vision_model.` prefix; they are written with the prefix `model` uses.
    """
    report = ConversionReport()
    expected = model.state_dict()
    prefixed = any(key.startswith("vision_model.") for key in expected)
    weights: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        reason = next((why for prefix, why in _CLIP_DROPPED if key.startswith(prefix)), None)
        if reason is not None:
            report.skipped[key] = reason
            continue
        name = key.removeprefix("vision_model.")
        if prefixed and not name.startswith("visual_projection."):
            name = f"vision_model.{name}"
        if name.endswith("position_ids") and name not in expected:
            report.skipped[key] = "position ids buffer: recomputed by this Transformers version"
            continue
        weights[name] = tensor
        report.mapped[key] = name
    _load_complete(model, weights, report, "CLIP")
    return report


def _load_complete(
    model: nn.Module, weights: dict[str, torch.Tensor], report: ConversionReport, what: str
) -> None:
    """Load `weights` into `model`, which they must cover exactly (shapes included); extra keys are reported."""
    expected = model.state_dict()
    unexpected = {key for key in weights if key not in expected}
    for key in unexpected:
        del weights[key]
        report.skipped[key] = f"not a tensor of {type(model).__name__}"
    report.mapped = {source: target for source, target in report.mapped.items() if target not in unexpected}
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(
            f"the {what} checkpoint lacks {len(missing)} tensors of {type(model).__name__}: {missing[:8]}"
        )
    for key, tensor in weights.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"{what} tensor {key} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict(weights)


def load_language_model(
    source: str | os.PathLike, dtype: torch.dtype | str | None = None, device_map: Any = None, **kwargs: Any
) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained(source)`, `dtype` and `device_map` passed under the installed names."""
    if dtype is not None:
        kwargs[dtype_kwarg()] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    return AutoModelForCausalLM.from_pretrained(source, **kwargs)


def add_placeholder_tokens(
    tokenizer: PreTrainedTokenizerBase, language_model: PreTrainedModel
) -> tuple[int, int]:
    """Add `[PAD]` (when missing) and the `<|audio|>` / `<|video|>` placeholders; grow the LM's embeddings to fit.

    Returns the (audio, video) placeholder ids. The released code adds `[PAD]` to LLaMA's tokenizer the same way.
    """
    audio_id, video_id = add_lavcap_special_tokens(tokenizer)
    if len(tokenizer) > language_model.get_input_embeddings().num_embeddings:
        language_model.resize_token_embeddings(len(tokenizer))
    language_model.config.pad_token_id = tokenizer.pad_token_id
    return audio_id, video_id


def build_from_components(
    audio: StateDictSource | None,
    vision: StateDictSource | None,
    text: str | os.PathLike | PreTrainedModel,
    tokenizer: str | os.PathLike | PreTrainedTokenizerBase | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device_map: Any = None,
    report: ConversionReport | None = None,
    float32_modules: Sequence[str] = (),
    **config_kwargs: Any,
) -> tuple[LavCapForConditionalGeneration, PreTrainedTokenizerBase]:
    """Build LAVCap from its pretrained parts, as the paper does before training.

    Args:
        audio: CED weights (see `StateDictSource`): the original release, `mispeech/ced-base`, or this package's
            format. None leaves the audio tower randomly initialised.
        vision: a CLIP checkpoint (folder or Hub id; a bare state dict or file needs `vision_config=`). None builds a
            model that takes precomputed `video_embeds` (as the released code, which used stored CLIP features).
        text: a causal LM, loaded (a `PreTrainedModel`) or a folder / Hub id for `AutoModelForCausalLM`.
        tokenizer: the LM's tokenizer or where to load it from (default: `text`); it gets `[PAD]` when it has no
            pad token and the `<|audio|>` / `<|video|>` placeholders, and the LM's embeddings grow to fit.
        dtype: dtype of the LM (passed to `from_pretrained`); the rest of the model is cast to the LM's dtype too,
            but for `float32_modules`. `"auto"` loads the LM in its stored dtype and leaves the rest in float32.
        device_map: passed to the LM's `from_pretrained`; the towers, fusion and projector stay on the CPU
            (move them with `.to(...)`: `model.model.audio_tower`, `.vision_tower`, `.fusion`, `.multi_modal_projector`).
        report: filled with what happened to every component tensor.
        float32_modules: parts that stay float32 (e.g. `FLOAT32_PARTS`), recorded in the config so that
            `from_pretrained` keeps them float32 (see `cast_model`).
        config_kwargs: `LavCapConfig` arguments (`fusion_type`, `num_frames`, ...); `audio_config` /
            `vision_config` replace the configs read from the checkpoints.

    Returns:
        `(model, tokenizer)`. The LM is loaded once: it is put into the model, not rebuilt.
    """
    report = report if report is not None else ConversionReport()
    language_model = (
        text if isinstance(text, PreTrainedModel) else load_language_model(text, dtype, device_map)
    )
    tokenizer = _resolve_tokenizer(tokenizer, text)
    audio_id, video_id = add_placeholder_tokens(tokenizer, language_model)

    audio_weights = load_state_dict(audio) if audio is not None else None
    audio_config = config_kwargs.pop("audio_config", None)
    if audio_config is None and audio_weights is not None:
        audio_config = ced_config_from_state_dict(audio_weights)
    vision_config = config_kwargs.pop("vision_config", None)
    if vision_config is None and vision is not None:
        if isinstance(vision, Mapping) or Path(vision).is_file():
            raise ValueError("a CLIP state dict or weights file carries no config: pass vision_config=")
        vision_config = clip_vision_config(vision)
    config = LavCapConfig(
        audio_config=audio_config,
        vision_config=vision_config,
        text_config=language_model.config,
        audio_token_id=audio_id,
        video_token_id=video_id,
        float32_modules=float32_modules,
        **config_kwargs,
    )
    model = _assemble(config, language_model)
    _load_tower(model.model.audio_tower, audio_weights, "audio", report)
    _load_tower(
        model.model.vision_tower, load_state_dict(vision) if vision is not None else None, "vision", report
    )
    if dtype is not None and dtype != "auto":  # the decoder and head came in that dtype
        cast_model(model, language_model.dtype, float32_modules)
    for name in ("bos_token_id", "eos_token_id"):
        setattr(model.generation_config, name, getattr(language_model.generation_config, name, None))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def cast_model(
    model: LavCapForConditionalGeneration, dtype: torch.dtype, float32_modules: Sequence[str] = ()
) -> None:
    """Cast the language model, its head and every part of `model.model` but `float32_modules` to `dtype` (each
    tensor once), `float32_modules` to float32; record them in `config.float32_modules`, so that `from_pretrained`
    keeps them float32 whatever dtype it loads in. CED's BatchNorm is float32 in any case."""
    unknown = sorted(set(float32_modules) - set(MediaModules._fields))
    if unknown:
        raise ValueError(f"float32_modules must be among {MediaModules._fields}, got {unknown}")
    model.model.language_model.to(dtype)
    model.lm_head.to(dtype)
    for name in MediaModules._fields:
        module = getattr(model.model, name)
        if module is not None:
            module.to(torch.float32 if name in float32_modules else dtype)
    model.config.float32_modules = list(float32_modules)


def part_dtypes(model: LavCapForConditionalGeneration) -> dict[str, str]:
    """The dtype(s) of each part's floating-point parameters and saved buffers: the language model, its head, the
    towers (CED's BatchNorm on its own, as `audio_tower.init_bn`), the fusion and the projector."""
    parts: dict[str, nn.Module] = {"language_model": model.model.language_model, "lm_head": model.lm_head}
    for name in MediaModules._fields:
        part = getattr(model.model, name)
        if part is None:
            continue
        parts[name] = part
        norms = [(n, m) for n, m in part.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        parts.update({f"{name}.{norm_name}": norm for norm_name, norm in norms})
    dtypes = {}
    for name, part in parts.items():
        nested = tuple(other[len(name) + 1 :] + "." for other in parts if other.startswith(name + "."))
        found = {
            str(tensor.dtype).removeprefix("torch.")
            for key, tensor in part.state_dict().items()
            if tensor.is_floating_point() and not key.startswith(nested)
        }
        dtypes[name] = ", ".join(sorted(found))
    return dtypes


def from_pretrained_components(
    *, text: Any, audio: Any = None, vision: Any = None, tokenizer: Any = None, **kwargs: Any
) -> LavCapForConditionalGeneration:
    """The paper's model built from CED, CLIP and causal-LM checkpoints (`build_from_components`), with the
    tokenizer (`[PAD]` and the placeholder tokens added) attached as `model.tokenizer`.

    Example: `from_pretrained_components(audio="audiotransformer_base_mAP_4999.pt",
    vision="openai/clip-vit-large-patch14", text="meta-llama/Llama-2-7b-chat-hf", dtype=torch.float16)`.
    """
    model, tokenizer = build_from_components(audio, vision, text, tokenizer, **kwargs)
    model.tokenizer = tokenizer
    return model


def _resolve_tokenizer(
    tokenizer: str | os.PathLike | PreTrainedTokenizerBase | None, text: str | os.PathLike | PreTrainedModel
) -> PreTrainedTokenizerBase:
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    if tokenizer is None and isinstance(text, PreTrainedModel):
        raise ValueError("pass the tokenizer of the given language model (tokenizer=)")
    return AutoTokenizer.from_pretrained(tokenizer if tokenizer is not None else text)


def _assemble(config: LavCapConfig, language_model: PreTrainedModel) -> LavCapForConditionalGeneration:
    """The model around an already loaded causal LM (its decoder and head are put in, not copied): built on the
    meta device, then given randomly initialised towers, fusion and projector."""
    with torch.device("meta"):
        model = LavCapForConditionalGeneration(config)
    media = build_media_modules(config)
    media.fusion.apply(model._init_weights)
    media.multi_modal_projector.apply(model._init_weights)
    for name, module in media._asdict().items():
        setattr(model.model, name, module)
    model.model.language_model = language_model.get_decoder()
    model.lm_head = language_model.get_output_embeddings()
    return model


def _load_tower(
    tower: nn.Module | None, weights: dict[str, torch.Tensor] | None, component: str, report: ConversionReport
) -> None:
    """Load one component into its tower and record it in `report` under `model.<component>_tower.`."""
    prefix = f"model.{component}_tower."
    if tower is None:
        if weights is not None:
            raise ValueError(f"{component} weights were given but fusion_type builds no {component} tower")
        return
    if weights is None:
        report.missing[prefix + "*"] = f"no {component} checkpoint given: randomly initialised"
        return
    load = load_ced_weights if component == "audio" else load_clip_vision_weights
    report.merge(load(tower, weights), f"{component}:", prefix)
