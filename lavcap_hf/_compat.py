"""Differences between the supported transformers releases (4.55 for optimum-habana, every 5.x), in one place.

Each helper detects the feature it needs, never a version number, so a release that renames something again
only needs a change here. This module imports nothing from the package, so that every module may use it.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from typing import Any

from torch import nn
from transformers import PretrainedConfig


def enable_activation_checkpointing(model: nn.Module, **kwargs: Any) -> None:
    """Turn on activation (gradient) checkpointing: late 5.x calls it `activation_checkpointing_enable` and
    deprecates `gradient_checkpointing_enable`, which is the only name 4.55 knows."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable(**kwargs)


def activation_checkpointing_argument() -> str:
    """Name of the `TrainingArguments` field that turns checkpointing on (`activation_checkpointing` in late
    5.x, where `gradient_checkpointing` is a deprecated alias; `gradient_checkpointing` before)."""
    from transformers import TrainingArguments

    fields = {field.name for field in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


def dtype_kwarg() -> str:
    """Name of `from_pretrained`'s dtype argument: `dtype` where Transformers renamed `torch_dtype` (which then
    survives as a config property), else `torch_dtype`."""
    return "dtype" if isinstance(getattr(PretrainedConfig, "torch_dtype", None), property) else "torch_dtype"


def processor_kwarg(trainer_class: type) -> str:
    """Name under which this Trainer takes the processor: `processing_class`, or `tokenizer` where older."""
    initialisers = [vars(cls)["__init__"] for cls in trainer_class.__mro__ if "__init__" in vars(cls)]
    takes = any("processing_class" in inspect.signature(init).parameters for init in initialisers)
    return "processing_class" if takes else "tokenizer"


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
