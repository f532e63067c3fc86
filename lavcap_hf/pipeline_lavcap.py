"""`pipeline("audio-visual-captioning")`: caption the sound of a video file (or arrays) with LAVCap."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from transformers import Pipeline

from .media import load_media

TASK = "audio-visual-captioning"


class AudioVisualCaptioningPipeline(Pipeline):
    """Captions clips with a LAVCap model and its processor.

    Inputs, one or a list (batched with `batch_size`):
    - a path to a video file (or to an audio file for an `audio_only` model);
    - `{"audio": array, "sampling_rate": int, "frames": uint8 (F, H, W, 3)}`;
    - `{"audio": array, "sampling_rate": int, "video_embeds": (F, 768)}`.

    Generation keyword arguments (`num_beams`, `max_new_tokens`, ...) pass through to `generate()`, also as
    `generate_kwargs={...}`. `return_ot_plan=True` adds the OT plan (V, A) of each clip to its result.

    Returns `[{"caption": str}]` per input (plus `"ot_plan"` on request).
    """

    _load_processor = True
    _load_tokenizer = False
    _load_feature_extractor = False
    _load_image_processor = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.processor is None:
            raise ValueError(f"the {TASK} pipeline needs the model's LavCapProcessor (processor=...)")
        # Batching pads with the tokenizer and the feature extractor; prompts are left-padded for generation.
        self.tokenizer = self.processor.tokenizer
        self.feature_extractor = self.processor.feature_extractor
        self.tokenizer.padding_side = "left"
        self.feature_extractor.padding_side = "left"

    def _sanitize_parameters(
        self,
        return_ot_plan: bool | None = None,
        generate_kwargs: dict[str, Any] | None = None,
        instruction: str | None = None,
        **kwargs: Any,
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        preprocess: dict[str, Any] = {}
        if instruction is not None:
            preprocess["instruction"] = instruction
        forward = {"generate_kwargs": {**(generate_kwargs or {}), **kwargs}}
        if return_ot_plan is not None:
            forward["return_ot_plan"] = return_ot_plan
        return preprocess, forward, {}

    def preprocess(self, inputs: str | os.PathLike | dict[str, Any], instruction: str | None = None) -> dict:
        audio, sampling_rate, frames, video_embeds = self._read_input(inputs)
        # Channel-concat and cross-attention fusions use the frames without video placeholders in the prompt.
        uses_visual = self.model.config.uses_visual
        model_inputs = self.processor(
            audio=audio if self.processor.num_audio_tokens else None,
            videos=frames if uses_visual else None,
            video_embeds=video_embeds if uses_visual else None,
            sampling_rate=sampling_rate,
            instruction=instruction,
            return_tensors="pt",
        )
        if "pixel_values_videos" in model_inputs:
            # Batching in transformers 4.55 stacks tensors of up to 4 dims: (1, F, 3, H, W) travels as (1, F*3, H, W).
            model_inputs["pixel_values_videos"] = model_inputs["pixel_values_videos"].flatten(1, 2)
        return model_inputs

    def _read_input(self, inputs: Any) -> tuple[Any, int | None, Any, Any]:
        """(audio, sampling_rate, frames, video_embeds) from a path or a dict."""
        if isinstance(inputs, (str, os.PathLike)):
            extractor = self.processor.feature_extractor
            decoded = load_media(
                inputs,
                sampling_rate=extractor.sampling_rate,
                num_frames=extractor.num_frames,
                need_audio=self.processor.num_audio_tokens > 0,
                need_frames=self.model.config.uses_visual,
            )
            return decoded.audio, decoded.sampling_rate, decoded.frames, None
        if isinstance(inputs, dict):
            unknown = set(inputs) - {"audio", "sampling_rate", "frames", "video_embeds"}
            if unknown:
                raise ValueError(
                    f"unknown input keys {sorted(unknown)}: use audio, sampling_rate, frames, video_embeds"
                )
            return (
                inputs.get("audio"),
                inputs.get("sampling_rate"),
                inputs.get("frames"),
                inputs.get("video_embeds"),
            )
        raise ValueError(f"inputs must be a file path or a dict, got {type(inputs).__name__}")

    def _forward(
        self,
        model_inputs: dict[str, torch.Tensor],
        generate_kwargs: dict[str, Any],
        return_ot_plan: bool = False,
    ) -> dict[str, Any]:
        media = {
            k: model_inputs[k]
            for k in ("input_features", "pixel_values_videos", "video_embeds")
            if k in model_inputs
        }
        if "pixel_values_videos" in media:
            pixels = media["pixel_values_videos"]
            media["pixel_values_videos"] = pixels.view(pixels.shape[0], -1, 3, *pixels.shape[-2:])
        sequences = self.model.generate(
            input_ids=model_inputs["input_ids"],
            attention_mask=model_inputs["attention_mask"],
            **media,
            **generate_kwargs,
        )
        # A tensor (one entry per clip) so that batched outputs split per clip like the sequences.
        prompt_length = torch.full((len(sequences),), model_inputs["input_ids"].shape[1])
        out = {"sequences": sequences, "prompt_length": prompt_length}
        if return_ot_plan:
            plan = self.model.model(**media, output_ot_plan=True).ot_plan
            if plan is None:
                raise ValueError(f"fusion_type={self.model.config.fusion_type!r} has no OT plan")
            out["ot_plan"] = plan
        return out

    def postprocess(self, model_outputs: dict[str, Any]) -> list[dict[str, Any]]:
        prompt_length = int(model_outputs["prompt_length"].reshape(-1)[0])
        captions = self.processor.batch_decode(model_outputs["sequences"], prompt_length=prompt_length)
        results: list[dict[str, Any]] = [{"caption": caption} for caption in captions]
        if "ot_plan" in model_outputs:
            for result, plan in zip(results, model_outputs["ot_plan"], strict=True):
                result["ot_plan"] = plan.float().cpu().numpy().astype(np.float32)
        return results
