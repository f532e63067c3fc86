"""Captions generated for scoring, the one path that `lavcap evaluate` and the Trainer's evaluation share: generate from
collated, left-padded prompts, cut the prompt off, decode; the captions are then scored by
`lavcap_hf.evaluation.metrics.score_captions`."""

from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import GenerationConfig

from ..model.processing_lavcap import LavCapProcessor


def generation_settings(generation_config: GenerationConfig, **overrides: Any) -> dict[str, Any]:
    """The settings `generate()` decodes with when called with `overrides` (None: keep the config's) on a model
    whose `generation_config` this is: every setting that has a value, as `GenerationConfig.to_json_string` writes
    it (private keys and the transformers version left out), e.g. `{"num_beams": 4, "max_new_tokens": 200, ...}`."""
    config = copy.deepcopy(generation_config)
    config.update(**{key: value for key, value in overrides.items() if value is not None})
    settings = json.loads(config.to_json_string(use_diff=False))
    return {
        key: value
        for key, value in settings.items()
        if value is not None and not key.startswith("_") and key != "transformers_version"
    }


def generate_caption_ids(
    model: nn.Module, inputs: dict[str, torch.Tensor], **generation: Any
) -> torch.Tensor:
    """The token ids (B, T) that `model.generate(**inputs, **generation)` adds after the prompts of `inputs` (left
    padded, so every prompt ends at column `input_ids.shape[1]`); rows that finish early are padded."""
    with torch.no_grad():
        sequences = model.generate(**inputs, **generation)
    return sequences[:, inputs["input_ids"].shape[1] :]


def decode_captions(processor: LavCapProcessor, token_ids: torch.Tensor | np.ndarray) -> list[str]:
    """The captions of generated token ids (N, T): special tokens skipped, surrounding whitespace stripped. Negative
    ids (the filler the Trainer puts after shorter rows when it gathers batches) are read as padding."""
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.cpu().numpy()
    token_ids = np.asarray(token_ids)
    token_ids = np.where(token_ids < 0, processor.tokenizer.pad_token_id, token_ids)
    return processor.batch_decode(token_ids, prompt_length=0)
