"""Differences between the supported transformers releases (4.55 for optimum-habana, every 5.x), in one place.

Each helper detects the feature it needs, never a version number, so a release that renames something again
only needs a change here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn
from transformers import TrainingArguments


def enable_activation_checkpointing(model: nn.Module, **kwargs: Any) -> None:
    """Turn on activation (gradient) checkpointing: late 5.x calls it `activation_checkpointing_enable` and
    deprecates `gradient_checkpointing_enable`, which is the only name 4.55 knows."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable(**kwargs)


def activation_checkpointing_argument() -> str:
    """Name of the `TrainingArguments` field that turns checkpointing on (`activation_checkpointing` in late
    5.x, where `gradient_checkpointing` is a deprecated alias; `gradient_checkpointing` before)."""
    fields = {field.name for field in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
