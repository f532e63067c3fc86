"""Writing a released LAVCap training checkpoint into a model built from the same components: the released key names
mapped to this package's, LoRA factors merged into the weights or loaded into peft adapters."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn

from ..model.modeling_ced import interpolate_time_pos_embed
from ..model.modeling_lavcap import LavCapForConditionalGeneration
from ..model.optimal_transport import FUSIONS
from .checkpoints import StateDictSource, read_checkpoint, state_dict_of
from .report import ConversionReport

OFFICIAL_LORA_ALPHA = 32.0
"""`enc_lora_alpha` / `dec_lora_alpha` of the released configuration, used when a checkpoint carries no config."""

OFFICIAL_FUSION_TYPES = {released: spec.name for spec in FUSIONS.values() for released in spec.released_names}
"""Released `fusion_type` values -> the fusion type here whose forward computes the same (`FusionSpec.released_names`).
Any other released value is refused: those the released code cannot run without its Q-Former (`aud_embed_only`,
`vis_embed_only`, `chancat_afQF`) or that only its comments name."""

_OFFICIAL_SETTINGS = {
    "ot_loss_weight": "ot_loss_weight",
    "sinkhorn_epsilon": "sinkhorn_epsilon",
    "num_sinkhorn_iter": "sinkhorn_iterations",
}
"""Released config keys -> `LavCapConfig` arguments."""
_OFFICIAL_PREFIXES = (
    ("audio_encoder.base_model.model.", "model.audio_tower."),
    ("audio_encoder.", "model.audio_tower."),
    ("llama_decoder.base_model.model.model.", "model.language_model."),
    ("llama_decoder.base_model.model.lm_head.", "lm_head."),
    ("llama_decoder.model.", "model.language_model."),
    ("llama_decoder.lm_head.", "lm_head."),
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
    (
        "model.language_model.",
        "frozen LLM weight, not saved by the released trainer; kept from the LLM component",
    ),
    ("lm_head.", "frozen LLM weight, not saved by the released trainer; kept from the LLM component"),
)
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.[^.]+\.weight$")


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
    merged_dtype: torch.dtype | None = None,
) -> ConversionReport:
    """Write a released LAVCap training checkpoint into `model`, built beforehand from the same components.

    With a plain model, the LoRA factors are merged into the base weights (`W + alpha / r * B @ A`, computed in
    float32 and rounded once to `merged_dtype`); with a
    `PeftModel` from `lavcap_hf.lora.apply_lora` (same rank and alpha, see `official_lora_settings`) they are
    loaded into its adapters, and the projector and OT logit scale into its `modules_to_save` copies.

    Args:
        checkpoint: the checkpoint (`{"model": state_dict, "config": ...}`) or its state dict; files are read with
            `weights_only=True`.
        model: the model to write into.
        lora_alpha: LoRA alpha of both towers; default: the checkpoint's config, else 32 (the released default).
        merged_dtype: dtype of the merged weights; default: each weight's own. `lavcap convert` keeps them float32
            and casts each part once to its final dtype afterwards.

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
        tower_alpha = settings.get(
            "enc_lora_alpha" if module.startswith("model.audio_tower.") else "dec_lora_alpha"
        )
        alpha = float(lora_alpha if lora_alpha is not None else (tower_alpha or OFFICIAL_LORA_ALPHA))
        _apply_lora(base, module, factors, alpha, adapter, merged_dtype)
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
    root: nn.Module,
    module_path: str,
    factors: dict[str, torch.Tensor],
    alpha: float,
    adapter: str | None,
    merged_dtype: torch.dtype | None = None,
) -> None:
    """Load LoRA factors A (r, in), B (out, r) into the adapter of `module_path`, or merge them into its weight:
    `W + alpha / r * B @ A` in float32, stored in `merged_dtype` (default: the weight's dtype)."""
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
    delta = (alpha / rank) * (lora_b.float() @ lora_a.float())
    if delta.shape != weight.shape:
        raise ValueError(
            f"{module_path}: LoRA update of shape {tuple(delta.shape)} for a weight {tuple(weight.shape)}"
        )
    merged = weight.detach().float() + delta.to(weight.device)
    weight.data = merged.to(merged_dtype or weight.dtype)


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
