"""Differences between the supported transformers releases (4.55 for optimum-habana, every 5.x), in one place.

Each helper detects the feature it needs, never a version number, so a release that renames something again
only needs a change here. This module imports nothing from the package, so that every module may use it.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from collections.abc import Callable
from typing import Any

from transformers import PretrainedConfig
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast


def dtype_kwarg() -> str:
    """Name of `from_pretrained`'s dtype argument: `dtype` where Transformers renamed `torch_dtype` (which then
    survives as a config property), else `torch_dtype`."""
    return "dtype" if isinstance(getattr(PretrainedConfig, "torch_dtype", None), property) else "torch_dtype"


def name_portable_tokenizer_class(save_directory: str | os.PathLike) -> None:
    """transformers 5.x records a plain `tokenizer.json` tokenizer as "TokenizersBackend", a class 4.55 lacks;
    "PreTrainedTokenizerFast" loads the same file on both stacks."""
    path = os.path.join(save_directory, "tokenizer_config.json")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)


def register_key_renames(model_type: str, renames: dict[str, str]) -> dict[str, str] | None:
    """Make `from_pretrained` rename checkpoint keys (regex -> replacement) of folders saved in an older layout.

    5.x keeps a registry of conversions, applied on load and reverted on save (so saved folders keep the older
    key names, which every release reads); the registration happens here, once per process. 4.55 only applies
    mappings for its own vision-language classes: the mapping is returned, for `from_pretrained(key_mapping=...)`.
    """
    try:
        from transformers.conversion_mapping import register_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # transformers 4.x
        return renames
    register_checkpoint_conversion_mapping(
        model_type,
        [WeightRenaming(source_patterns=src, target_patterns=dst) for src, dst in renames.items()],
        overwrite=True,
    )
    return None


try:
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:  # transformers 4.x: its causal LMs slice inline, as here

    def slice_logits_to_keep(hidden_states: Any, logits_to_keep: Any) -> Any:
        """The hidden states (B, L, d) of the positions whose logits are needed: the last N (an int; 0 keeps all),
        or the positions a 1D tensor names."""
        indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden_states[:, indices, :]


try:
    from transformers.utils import torch_compilable_check
except ImportError:  # transformers 4.x

    def torch_compilable_check(
        cond: Any, msg: str | Callable[[], str], error_type: type[Exception] = ValueError
    ) -> None:
        """Raise `error_type` with `msg` (or what the callable `msg` returns) where `cond`, a bool or a bool tensor,
        is not (all) true."""
        if not (bool(cond.all()) if hasattr(cond, "all") else cond):
            raise error_type(msg() if callable(msg) else msg)


def multimodal_output_bases() -> tuple[type, type]:
    """The library's multimodal output classes (base model, causal LM): 5.x has them; for 4.x, stand-ins with
    the same per-modality fields on the plain outputs."""
    from transformers import modeling_outputs

    if hasattr(modeling_outputs, "MultimodalBaseModelOutputWithPast"):
        return (
            modeling_outputs.MultimodalBaseModelOutputWithPast,
            modeling_outputs.MultimodalCausalLMOutputWithPast,
        )
    return MultimodalBaseModelOutput4x, MultimodalCausalLMOutput4x


@dataclasses.dataclass
class MultimodalBaseModelOutput4x(BaseModelOutputWithPast):
    """4.x stand-in for `MultimodalBaseModelOutputWithPast`: the encoders' outputs beside the decoder's."""

    video_outputs: Any = None
    audio_outputs: Any = None


@dataclasses.dataclass
class MultimodalCausalLMOutput4x(CausalLMOutputWithPast):
    """4.x stand-in for `MultimodalCausalLMOutputWithPast`."""

    video_outputs: Any = None
    audio_outputs: Any = None


def attention_function(implementation: str | None, eager: Callable[..., Any]) -> Callable[..., Any]:
    """The attention function registered for `config._attn_implementation` ("sdpa", "flash_attention_2", a kernel
    registered with `AttentionInterface`, ...), `eager` for "eager" or None. 5.x has
    `ALL_ATTENTION_FUNCTIONS.get_interface`, which also rejects unknown names; 4.55 indexes the registry."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)
    if implementation in (None, "eager"):
        return eager
    return ALL_ATTENTION_FUNCTIONS[implementation]


def _generation_cache_name() -> str:
    from transformers import GenerationMixin

    parameters = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return "cache" if "cache" in parameters else "past_key_values"


CACHE_ARGUMENT = _generation_cache_name()
"""What `generate()` calls the key/value cache it hands to `forward`: `cache` in late 5.x, `past_key_values` before."""


def _generation_flags_first_step() -> bool:
    from transformers import GenerationMixin

    return "is_first_iteration" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters


_FIRST_STEP_FLAGGED = _generation_flags_first_step()


def _generate_merges_model_defaults() -> bool:
    from transformers import GenerationMixin

    return "use_model_defaults" in inspect.signature(GenerationMixin.generate).parameters


_MERGES_MODEL_DEFAULTS = _generate_merges_model_defaults()


def passed_generation_config_wins(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`generate()` keyword arguments under which a passed `generation_config` wins for every setting it holds.

    4.x (`use_model_defaults`, on by default) replaces each of its settings that equals the library's default by the
    model's, so a passed `num_beams=1` became the model's beam count; 5.x takes every setting it sets and the model's
    for those it leaves unset (None), which is what it holds on 4.x, where every setting has a value.
    """
    if _MERGES_MODEL_DEFAULTS and kwargs.get("generation_config") is not None:
        return {"use_model_defaults": False, **kwargs}
    return kwargs


def is_first_generation_step(kwargs: dict[str, Any]) -> bool:
    """Whether `prepare_inputs_for_generation` prepares a batch's first forward: 5.x says so with
    `is_first_iteration`; in 4.x that forward starts at cache position 0."""
    if _FIRST_STEP_FLAGGED:
        return bool(kwargs.get("is_first_iteration", False))
    cache_position = kwargs.get("cache_position")
    return cache_position is None or bool(cache_position[0] == 0)


def accept_old_cache_name(forward: Any) -> Any:
    """Where the cache is called `cache`, let `forward` also take it as `past_key_values`, with the library's
    deprecation warning (as its own models do); elsewhere `forward` is returned as it is."""
    if CACHE_ARGUMENT != "cache":
        return forward
    from transformers.utils.deprecation import deprecate_kwarg

    return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)


def as_cache(cache: Any) -> Any:
    """A decoder's returned key/value cache as a `Cache`: 4.x decoders still written for the legacy format (GPT-2)
    return a tuple of per-layer (key, value) pairs when they were given no cache; 5.x decoders return a `Cache`."""
    if isinstance(cache, tuple):
        from transformers import DynamicCache

        return DynamicCache.from_legacy_cache(cache)
    return cache


def decoder_cache_kwargs(cache: Any) -> dict[str, Any]:
    """The cache argument of the library's decoders (`LlamaModel.forward`, ...), under this release's name."""
    return {} if cache is None else {CACHE_ARGUMENT: cache}


def _weight_init_functions() -> Any:
    """`transformers.initialization` (5.x: the `torch.nn.init` functions, skipping tensors a checkpoint filled), or
    `torch.nn.init` itself on 4.x, whose loader only initialises modules with missing weights."""
    try:
        from transformers import initialization
    except ImportError:  # transformers 4.x
        from torch.nn import init as initialization
    return initialization


init = _weight_init_functions()
"""Weight initialisers for `_init_weights` (`init.normal_`, `init.uniform_`, `init.kaiming_uniform_`, ...)."""


def pipeline_generate_kwargs(
    pipeline: Any, generate_kwargs: dict[str, Any], **overrides: Any
) -> dict[str, Any]:
    """The `generate()` arguments of one call of a generating pipeline (`_pipeline_calls_generate = True`): the
    call's arguments over those given when the pipeline was built, over the model's `generation_config`, plus the
    pipeline's `overrides`. 5.x merges them in `Pipeline._prepare_generate_kwargs`; 4.55 folds the model's
    generation config and the build's arguments into `pipeline.generation_config` when the pipeline is built."""
    prepare = getattr(pipeline, "_prepare_generate_kwargs", None)
    if prepare is not None:
        return prepare(generate_kwargs, **overrides)
    kwargs = {**generate_kwargs, **overrides}
    kwargs.setdefault("generation_config", pipeline.generation_config)
    return kwargs
