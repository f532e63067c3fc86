"""Real checkpoints -> this package: CED, CLIP and causal-LM components, and the released LAVCap training checkpoints.

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

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file
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

from ._compat import dtype_kwarg
from .configuration_lavcap import CedConfig, LavCapConfig
from .lora import apply_lora, lavcap_lora_config
from .modeling_ced import CedModel, interpolate_time_pos_embed
from .modeling_lavcap import LavCapForConditionalGeneration, LavCapModel
from .optimal_transport import FUSIONS
from .processing_lavcap import add_lavcap_special_tokens

StateDictSource = str | os.PathLike | Mapping[str, torch.Tensor]
"""A state dict, a weights file (.safetensors, or .pt/.pth/.bin/.ckpt read with `weights_only=True`), a folder holding
one (sharded checkpoints included), or a Hub repository id."""

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
OFFICIAL_LORA_ALPHA = 32.0
"""`enc_lora_alpha` / `dec_lora_alpha` of the released configuration, used when a checkpoint carries no config."""

OFFICIAL_FUSION_TYPES = {released: spec.name for spec in FUSIONS.values() for released in spec.released_names}
"""Released `fusion_type` values -> the fusion type here whose forward computes the same (`FusionSpec.released_names`).
Any other released value is refused: those the released code cannot run without its Q-Former (`aud_embed_only`,
`vis_embed_only`, `chancat_afQF`) or that only its comments name."""

_CED_DROPPED = (
    (
        "front_end.",
        "mel front end of the CED release: this package computes the fbank in its feature extractor",
    ),
    ("outputlayer.", "AudioSet classifier head of CED: LAVCap uses the patch tokens"),
    ("output_layer.", "AudioSet classifier head of CED: LAVCap uses the patch tokens"),
)
_CLIP_DROPPED = (
    ("text_model.", "CLIP text tower: LAVCap encodes frames only"),
    ("text_projection.", "CLIP text projection: LAVCap encodes frames only"),
    ("logit_scale", "CLIP's contrastive temperature: unused"),
)
_OFFICIAL_SETTINGS = {
    "ot_loss_weight": "ot_loss_weight",
    "sinkhorn_epsilon": "sinkhorn_epsilon",
    "num_sinkhorn_iter": "sinkhorn_iterations",
}
"""Released config keys -> `LavCapConfig` arguments."""
_OFFICIAL_PREFIXES = (
    ("audio_encoder.base_model.model.", "model.audio_tower."),
    ("audio_encoder.", "model.audio_tower."),
    ("llama_decoder.base_model.model.", "language_model."),
    ("llama_decoder.", "language_model."),
    ("speech_llama_proj.", "model.multi_modal_projector."),
    ("cross_attn.", "model.fusion.cross_attn."),
    ("logit_scale", "model.fusion.logit_scale"),
)
_OFFICIAL_UNUSED = (
    (
        "speech_Qformer.",
        "Q-Former of the released Q-Former variants (use_speech_Qformer=True): not in this model",
    ),
    ("speech_query_tokens", "Q-Former queries of the released Q-Former variants: not in this model"),
    ("ln_aud.", "LayerNorm of the released av_embed_norm variant: not in this model"),
    ("ln_vis.", "LayerNorm of the released av_embed_norm variant: not in this model"),
    (
        "visual_llama_proj.",
        "visual projector of the released tempcat_afQF variant, used only with its Q-Former: not in this model",
    ),
)
_MISSING_REASONS = (
    (
        "model.vision_tower.",
        "CLIP vision tower: the released model used precomputed CLIP features, so its checkpoint has none; "
        "kept from the CLIP component",
    ),
    (
        "model.audio_tower.",
        "frozen CED weight, not saved by the released trainer; kept from the CED component",
    ),
    ("language_model.", "frozen LLM weight, not saved by the released trainer; kept from the LLM component"),
)
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.[^.]+\.weight$")


@dataclass
class ConversionReport:
    """What a conversion did with every tensor.

    Attributes:
        mapped: source key -> target key it was written to (`{q,k,v}_proj` for a split fused projection,
            `... (+ LoRA)` for a LoRA factor merged into or loaded next to a weight).
        skipped: source key -> why it was not used.
        missing: target key the source did not provide -> where its value comes from instead.
    """

    mapped: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)

    def merge(self, other: ConversionReport, source_prefix: str = "", target_prefix: str = "") -> None:
        """Add `other`'s entries, its source keys prefixed by `source_prefix`, its target keys by `target_prefix`."""
        self.mapped.update({source_prefix + k: target_prefix + v for k, v in other.mapped.items()})
        self.skipped.update({source_prefix + k: v for k, v in other.skipped.items()})
        self.missing.update({target_prefix + k: v for k, v in other.missing.items()})

    def summary(self, examples: int = 3) -> str:
        """Counts, and the skipped and missing keys grouped by reason with a few examples each."""
        lines = [f"mapped: {len(self.mapped)} tensors"]
        for title, entries in (("skipped", self.skipped), ("missing", self.missing)):
            lines.append(f"{title}: {len(entries)} tensors")
            by_reason: dict[str, list[str]] = defaultdict(list)
            for key, reason in entries.items():
                by_reason[reason].append(key)
            for reason, keys in by_reason.items():
                shown = ", ".join(keys[:examples]) + (", ..." if len(keys) > examples else "")
                lines.append(f"  {len(keys)} x {reason}: {shown}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Reading checkpoints


def read_checkpoint(source: StateDictSource) -> Mapping[str, Any]:
    """The mapping stored at `source` (see `StateDictSource`): a state dict, or a training checkpoint holding one."""
    if isinstance(source, Mapping):
        return source
    path = Path(source)
    if not path.exists():
        if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(source)) or str(source).endswith(WEIGHT_SUFFIXES):
            raise ValueError(f"checkpoint {source}: no such file or folder, and not a Hub repository id")
        path = _download(str(source))
    return _read_folder(path) if path.is_dir() else _read_file(path)


def load_state_dict(source: StateDictSource) -> dict[str, torch.Tensor]:
    """The state dict at `source`; `{"model": ...}` / `{"state_dict": ...}` training checkpoints are unwrapped."""
    return state_dict_of(read_checkpoint(source))


def state_dict_of(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """`checkpoint` itself when it maps names to tensors, else its `model` or `state_dict` entry."""
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return dict(checkpoint)
    for key in ("model", "state_dict"):
        if isinstance(checkpoint.get(key), Mapping):
            return state_dict_of(checkpoint[key])
    raise ValueError(
        f"the checkpoint holds no state dict: expected a mapping of names to tensors, or one under 'model' or "
        f"'state_dict'; its keys are {sorted(checkpoint)[:10]}"
    )


def _download(repo_id: str) -> Path:
    """Snapshot of a Hub repository's configs and weights (safetensors when it has them)."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"]))
        if not any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir()):
            folder = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.bin", "*.pt", "*.pth"]))
    except Exception as error:  # the Hub client raises many unrelated types (HTTP, validation, offline mode)
        raise ValueError(
            f"checkpoint {repo_id!r} is not a local file or folder, and downloading it from the Hub failed: {error}"
        ) from error
    return folder


def _read_folder(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of a saved model folder: a sharded checkpoint's index, else its one weights file."""
    for index_name in SHARD_INDEXES:
        index = folder / index_name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            merged: dict[str, torch.Tensor] = {}
            for shard in shards:
                merged.update(_read_file(folder / shard))
            return merged
    files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    preferred = [p for p in files if p.suffix == ".safetensors"] or files
    if len(preferred) != 1:
        raise ValueError(
            f"{folder} holds {len(preferred)} weight files ({[p.name for p in preferred]}); pass the file to use"
        )
    return _read_file(preferred[0])


def _read_file(path: Path) -> Mapping[str, Any]:
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and safetensors failures share no base class
        raise ValueError(f"could not read checkpoint {path}: {error}") from error


# ---------------------------------------------------------------------------------------------------------------
# Components


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
        dtype: dtype of the LM (passed to `from_pretrained`); the rest of the model is cast to the LM's dtype too.
        device_map: passed to the LM's `from_pretrained`; the front end stays on the CPU, move it with
            `model.model.to(...)`.
        report: filled with what happened to every component tensor.
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
        **config_kwargs,
    )
    model = _assemble(config, language_model)
    _load_tower(model.model.audio_tower, audio_weights, "audio", report)
    _load_tower(
        model.model.vision_tower, load_state_dict(vision) if vision is not None else None, "vision", report
    )
    if dtype is not None:
        model.model.to(language_model.dtype)
    for name in ("bos_token_id", "eos_token_id"):
        setattr(model.generation_config, name, getattr(language_model.generation_config, name, None))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


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
    """The model around an already loaded LM: built on the meta device, then given a real front end and the LM."""
    with torch.device("meta"):
        model = LavCapForConditionalGeneration(config)
    model.model = LavCapModel(config)
    model.language_model = language_model
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


# ---------------------------------------------------------------------------------------------------------------
# Released LAVCap checkpoints


def official_config_kwargs(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """`LavCapConfig` arguments recorded in a released checkpoint's `config` (empty when it has none).

    Raises:
        ValueError: the checkpoint was trained with a variant this package does not implement.
    """
    settings = _official_model_config(checkpoint)
    if not settings:
        return {}
    if settings.get("use_speech_Qformer"):
        raise ValueError(
            "the checkpoint uses the released Q-Former variant (use_speech_Qformer=True): not supported"
        )
    if settings.get("av_embed_norm"):
        raise ValueError("the checkpoint uses the released av_embed_norm variant: not supported")
    if settings.get("spec_f_mean") is False:
        raise ValueError(
            "the checkpoint was trained without frequency mean pooling (spec_f_mean=False): not supported"
        )
    kwargs = {ours: settings[theirs] for theirs, ours in _OFFICIAL_SETTINGS.items() if theirs in settings}
    if settings.get("fusion_type") is not None:
        kwargs["fusion_type"] = fusion_type_of_release(settings["fusion_type"])
    return kwargs


def fusion_type_of_release(released: str) -> str:
    """This package's fusion type that computes what the released code's `fusion_type=released` computes.

    Raises:
        ValueError: naming `released` and the released types that convert, when none here reproduces it.
    """
    if released not in OFFICIAL_FUSION_TYPES:
        convertible = ", ".join(f"{theirs} -> {ours}" for theirs, ours in OFFICIAL_FUSION_TYPES.items())
        raise ValueError(
            f"the checkpoint's fusion_type {released!r} has no equivalent here; the released fusion types this "
            f"package reproduces are: {convertible}"
        )
    return OFFICIAL_FUSION_TYPES[released]


def _official_model_config(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    config = checkpoint.get("config")
    model = config.get("model") if isinstance(config, Mapping) else None
    return model if isinstance(model, Mapping) else {}


def official_lora_settings(checkpoint: Mapping[str, Any]) -> tuple[int, float]:
    """(rank, alpha) of a released checkpoint's LoRA: the rank from its factors, alpha from its config (else 32).

    One pair for both towers, as `lavcap_lora_config` builds one adapter config; mismatching towers raise ValueError.
    """
    ranks = {t.shape[0] for k, t in state_dict_of(checkpoint).items() if ".lora_A." in k}
    settings = _official_model_config(checkpoint)
    alphas = {float(settings.get(k, OFFICIAL_LORA_ALPHA)) for k in ("enc_lora_alpha", "dec_lora_alpha")}
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(
            f"expected one LoRA rank and alpha for both towers, found ranks {ranks} and alphas {alphas}"
        )
    return ranks.pop(), alphas.pop()


def convert_official_checkpoint(
    checkpoint: StateDictSource,
    model: LavCapForConditionalGeneration | PeftModel,
    lora_alpha: float | None = None,
) -> ConversionReport:
    """Write a released LAVCap training checkpoint into `model`, built beforehand from the same components.

    With a plain model, the LoRA factors are merged into the base weights (`W + alpha / r * B @ A`); with a
    `PeftModel` from `lavcap_hf.lora.apply_lora` (same rank and alpha, see `official_lora_settings`) they are
    loaded into its adapters, and the projector and OT logit scale into its `modules_to_save` copies.

    Args:
        checkpoint: the checkpoint (`{"model": state_dict, "config": ...}`) or its state dict; files are read with
            `weights_only=True`.
        model: the model to write into.
        lora_alpha: LoRA alpha of both towers; default: the checkpoint's config, else 32 (the released default).

    Returns:
        The report: which keys were written where, which were skipped and why, and which model tensors the
        checkpoint did not hold (the CLIP tower, and the frozen base weights the released trainer does not save).
    """
    raw = read_checkpoint(checkpoint)
    is_peft = isinstance(model, PeftModel)
    base = model.get_base_model() if is_peft else model
    adapter = model.active_adapter if is_peft else None
    official = official_config_kwargs(raw).get("fusion_type")
    if official is not None and official != base.config.fusion_type:
        raise ValueError(
            f"the checkpoint was trained with fusion_type {official!r} (in this package's names) but the model has "
            f"fusion_type {base.config.fusion_type!r}"
        )
    settings = _official_model_config(raw)
    report = ConversionReport()
    written: set[str] = set()
    lora: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    lora_sources: dict[str, list[str]] = defaultdict(list)
    for key, tensor in state_dict_of(raw).items():
        target, reason = _official_target(key)
        if target is None:
            report.skipped[key] = reason
            continue
        match = _LORA_KEY.match(target)
        if match:
            lora[match["module"]][match["factor"]] = tensor
            lora_sources[match["module"]].append(key)
            continue
        try:
            _copy_tensor(base, target, tensor, adapter)
        except LookupError:
            report.skipped[key] = f"this model (fusion_type={base.config.fusion_type!r}) has no {target}"
            continue
        report.mapped[key] = target
        written.add(target)
    for module, factors in lora.items():
        tower_alpha = settings.get("enc_lora_alpha" if module.startswith("model.") else "dec_lora_alpha")
        alpha = float(lora_alpha if lora_alpha is not None else (tower_alpha or OFFICIAL_LORA_ALPHA))
        _apply_lora(base, module, factors, alpha, adapter)
        for key in lora_sources[module]:
            report.mapped[key] = f"{module}.weight (+ LoRA)"
    for key in _plain_keys(base, adapter):
        if key not in written:
            report.missing[key] = next(
                (why for prefix, why in _MISSING_REASONS if key.startswith(prefix)),
                "not in the checkpoint: keeps its current value",
            )
    return report


def _official_target(key: str) -> tuple[str | None, str | None]:
    """(this package's key, None) for a released key, or (None, why it is skipped)."""
    reason = next((why for prefix, why in _OFFICIAL_UNUSED if key.startswith(prefix)), None)
    if reason is not None:
        return None, reason
    for source, target in _OFFICIAL_PREFIXES:
        if not key.startswith(source):
            continue
        rest = key[len(source) :].replace(".base_layer.", ".")
        if target == "model.audio_tower.":
            if rest.startswith(("output_layer.", "outputlayer.")):
                return None, "AudioSet classifier head of CED: LAVCap uses the patch tokens"
            rest = rest.replace("init_bn.1.", "init_bn.")
        if rest.endswith("rotary_emb.inv_freq"):
            return None, "rotary frequencies: recomputed by the language model"
        return target + rest, None
    return None, "not a tensor of the released LAVCap model"


def _unwrap(module: nn.Module, adapter: str | None) -> nn.Module:
    """The module that holds the weights: a LoRA layer's base layer, a `modules_to_save` wrapper's trained copy."""
    if isinstance(module, ModulesToSaveWrapper):
        return module.modules_to_save[adapter]
    if isinstance(module, BaseTunerLayer):
        return module.get_base_layer()
    return module


def _submodule(root: nn.Module, path: str, adapter: str | None) -> nn.Module:
    """`root.get_submodule(path)` through peft's wrappers; LookupError when there is none."""
    module = root
    for part in path.split(".") if path else ():
        child = _unwrap(module, adapter)._modules.get(part)
        if child is None:
            raise LookupError(path)
        module = child
    return module


def _copy_tensor(root: nn.Module, key: str, tensor: torch.Tensor, adapter: str | None) -> None:
    """`root`'s tensor `key` (this package's name) <- `tensor`.

    Time position embeddings of another length are cut or interpolated; a vocabulary matrix with fewer rows (the
    released [PAD]-only vocabulary) fills the first rows, the placeholder rows keep their values.
    """
    module_path, _, name = key.rpartition(".")
    owner = _unwrap(_submodule(root, module_path, adapter), adapter)
    target = owner._parameters.get(name, owner._buffers.get(name))
    if target is None:
        raise LookupError(key)
    if name == "time_pos_embed":
        tensor = interpolate_time_pos_embed(tensor, target.shape[-1])
    rows = tensor.shape[0] if tensor.ndim == 2 else None
    if (
        key.endswith(("embed_tokens.weight", "lm_head.weight"))
        and rows is not None
        and rows < target.shape[0]
    ):
        target = target[:rows]
    if tensor.shape != target.shape:
        raise ValueError(
            f"{key}: the checkpoint has shape {tuple(tensor.shape)}, the model {tuple(target.shape)}"
        )
    with torch.no_grad():
        target.copy_(tensor)


def _apply_lora(
    root: nn.Module, module_path: str, factors: dict[str, torch.Tensor], alpha: float, adapter: str | None
) -> None:
    """Load LoRA factors A (r, in), B (out, r) into the adapter of `module_path`, or merge them into its weight."""
    if set(factors) != {"A", "B"}:
        raise ValueError(f"LoRA of {module_path} has factors {sorted(factors)}, expected A and B")
    lora_a, lora_b = factors["A"], factors["B"]
    rank = lora_a.shape[0]
    try:
        module = _submodule(root, module_path, adapter)
    except LookupError:
        raise ValueError(
            f"the checkpoint has LoRA factors for {module_path}, which this model lacks"
        ) from None
    if isinstance(module, LoraLayer) and adapter in module.lora_A:
        scaling = module.scaling[adapter]
        if module.r[adapter] != rank or not math.isclose(scaling, alpha / rank, rel_tol=1e-6):
            raise ValueError(
                f"{module_path}: the checkpoint's LoRA has rank {rank} and scale {alpha / rank:g}, the adapter rank "
                f"{module.r[adapter]} and scale {scaling:g}; build it with lavcap_lora_config(r={rank}, lora_alpha={alpha:g})"
            )
        with torch.no_grad():
            module.lora_A[adapter].weight.copy_(lora_a)
            module.lora_B[adapter].weight.copy_(lora_b)
        return
    weight = _unwrap(module, adapter).weight
    delta = (alpha / rank) * (lora_b.double() @ lora_a.double())
    if delta.shape != weight.shape:
        raise ValueError(
            f"{module_path}: LoRA update of shape {tuple(delta.shape)} for a weight {tuple(weight.shape)}"
        )
    with torch.no_grad():
        weight.copy_(weight.double() + delta.to(weight.device))


def _plain_keys(root: nn.Module, adapter: str | None) -> list[str]:
    """`root`'s state-dict keys under this package's names, peft's LoRA factors and wrapper levels removed."""
    keys = []
    for key in root.state_dict():
        if ".lora_" in key or ".original_module." in key:
            continue
        key = key.replace(".base_layer.", ".")
        if adapter is not None:
            key = key.replace(f".modules_to_save.{adapter}.", ".")
        keys.append(key)
    return keys


# ---------------------------------------------------------------------------------------------------------------
# `lavcap convert`


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
