"""Differences between the supported Trainer releases (4.55 for optimum-habana, every 5.x): the names of activation
checkpointing and of the Trainer's processor argument. Each helper detects the feature, never a version number."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from torch import nn


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


def processor_kwarg(trainer_class: type) -> str:
    """Name under which this Trainer takes the processor: `processing_class`, or `tokenizer` where older."""
    initialisers = [vars(cls)["__init__"] for cls in trainer_class.__mro__ if "__init__" in vars(cls)]
    takes = any("processing_class" in inspect.signature(init).parameters for init in initialisers)
    return "processing_class" if takes else "tokenizer"
