"""`pipeline("audio-visual-captioning")`: caption the sound of a video file (or arrays) with LAVCap."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from transformers import GenerationConfig
from transformers.pipelines.base import ChunkPipeline

from ._compat import pipeline_generate_kwargs
from .configuration_lavcap import PIPELINE_TASK as TASK

# Imported here too because `media` needs it: transformers 4.55 copies only this file's own relative imports into its
# remote-code cache when a saved folder's pipeline loads.
from .feature_extraction_lavcap import resample  # noqa: F401
from .media_decoding import load_media

LONG_AUDIO_MODES = ("truncate", "windows")

# (audio, sampling_rate, frames, video_embeds) of one clip, as the processor takes them.
ClipInputs = tuple[Any, Any, Any, Any]


class AudioVisualCaptioningPipeline(ChunkPipeline):
    """Captions clips with a LAVCap model and its processor.

    Inputs, one or a list (batched with `batch_size`):
    - a path to a video file (or to an audio file for an `audio_only` model);
    - `{"audio": array, "sampling_rate": int, "frames": uint8 (F, H, W, 3)}`;
    - `{"audio": array, "sampling_rate": int, "video_embeds": (F, 768)}`.

    Decoding follows transformers' generating pipelines: the model's `generation_config` gives the defaults;
    generation arguments (`num_beams`, `max_new_tokens`, `num_return_sequences`, ...) given when the pipeline is
    built, then those of the call (flat or as `generate_kwargs={...}`), override them. `return_ot_plan=True` adds
    the OT plan (V, A) of each clip to each of its results.

    Clips longer than the model's audio window (`max_length` fbank frames, 10.24 s): `long_audio="truncate"`
    (default) captions the first window and logs a warning; `long_audio="windows"` captions every consecutive
    window (`LavCapFeatureExtractor.split_windows`) and returns one result per window with its `"timestamp"`,
    (start, end) in seconds, the windows following each other. A file's windows each get the frames of their own
    time span; the `frames` or `video_embeds` of a dict input serve every window.

    Returns, per input, a list of `{"caption": str}` with one dict per returned sequence (`num_return_sequences`,
    best first), as the text-generation pipeline does (plus `"ot_plan"` on request); with windows, the dicts of
    each window in turn, each with its `"timestamp"`.
    """

    _pipeline_calls_generate = True
    # No pipeline defaults (an empty config: 4.55 needs one): the model's generation_config is the one home of the
    # decoding settings.
    _default_generation_config = GenerationConfig()

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
        long_audio: str | None = None,
        **kwargs: Any,
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        preprocess: dict[str, Any] = {}
        if instruction is not None:
            preprocess["instruction"] = instruction
        if long_audio is not None:
            if long_audio not in LONG_AUDIO_MODES:
                raise ValueError(f"long_audio must be one of {LONG_AUDIO_MODES}, got {long_audio!r}")
            preprocess["long_audio"] = long_audio
        given_twice = set(generate_kwargs or {}) & set(kwargs)
        if given_twice:
            raise ValueError(
                f"{sorted(given_twice)} given twice, in generate_kwargs and as arguments: pass each once"
            )
        forward = {"generate_kwargs": {**(generate_kwargs or {}), **kwargs}}
        if return_ot_plan is not None:
            forward["return_ot_plan"] = return_ot_plan
        return preprocess, forward, {}

    def preprocess(
        self,
        inputs: str | os.PathLike | dict[str, Any],
        instruction: str | None = None,
        long_audio: str = "truncate",
    ) -> Iterator[dict[str, Any]]:
        """Model inputs of the clip, or of each of its windows, flagged `is_last` on the clip's last one."""
        windowed = long_audio == "windows" and self.processor.num_audio_tokens > 0
        clips = self._read_windows(inputs) if windowed else [(self._read_input(inputs), None)]
        for index, (clip, timestamp) in enumerate(clips):
            model_inputs = self._model_inputs(*clip, instruction=instruction)
            yield {**model_inputs, "timestamp": timestamp, "is_last": index == len(clips) - 1}

    def _model_inputs(
        self, audio: Any, sampling_rate: Any, frames: Any, video_embeds: Any, instruction: str | None
    ) -> dict[str, torch.Tensor]:
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
            # The processor prepares one modality alone; a caption needs every one the model reads.
            if self.processor.num_audio_tokens and inputs.get("audio") is None:
                raise ValueError(
                    "this model captions audio: give the input's `audio` and its `sampling_rate`"
                )
            if (
                self.model.config.uses_visual
                and inputs.get("frames") is None
                and inputs.get("video_embeds") is None
            ):
                raise ValueError(
                    "this model uses the frames: give the input's `frames` (uint8 (frames, height, width, 3)) or "
                    "`video_embeds`"
                )
            if inputs.get("audio") is not None and inputs.get("sampling_rate") is None:
                # A raw waveform says nothing of its rate; the pipeline does not guess it.
                raise ValueError(
                    "sampling_rate is required with raw audio: pass the rate of `audio` in Hz (the model uses "
                    f"{self.processor.feature_extractor.sampling_rate} Hz)"
                )
            return (
                inputs.get("audio"),
                inputs.get("sampling_rate"),
                inputs.get("frames"),
                inputs.get("video_embeds"),
            )
        raise ValueError(f"inputs must be a file path or a dict, got {type(inputs).__name__}")

    def _read_windows(self, inputs: Any) -> list[tuple[ClipInputs, tuple[float, float]]]:
        """Clip inputs and (start, end) seconds of each consecutive audio window of `inputs`."""
        extractor = self.processor.feature_extractor
        is_file = isinstance(inputs, (str, os.PathLike))
        if is_file:
            audio = load_media(inputs, sampling_rate=extractor.sampling_rate, need_frames=False).audio
            sampling_rate, frames, video_embeds = extractor.sampling_rate, None, None
        else:
            audio, sampling_rate, frames, video_embeds = self._read_input(inputs)
        windows = extractor.split_windows(audio, sampling_rate)
        # Consecutive spans; each window also hears the 15 ms after its span that its last fbank frame covers.
        stride, rate = extractor.window_stride, extractor.sampling_rate
        spans = [
            (index * stride / rate, (index * stride + min(stride, len(window))) / rate)
            for index, window in enumerate(windows)
        ]
        frames_per_window = [frames] * len(windows)
        if is_file and self.model.config.uses_visual:
            count = extractor.num_frames
            decoded = load_media(inputs, num_frames=count, need_audio=False, frame_spans=spans).frames
            frames_per_window = [decoded[i * count : (i + 1) * count] for i in range(len(windows))]
        return [
            ((window, extractor.sampling_rate, window_frames, video_embeds), span)
            for window, window_frames, span in zip(windows, frames_per_window, spans, strict=True)
        ]

    def _forward(
        self,
        model_inputs: dict[str, torch.Tensor],
        generate_kwargs: dict[str, Any],
        return_ot_plan: bool = False,
    ) -> dict[str, Any]:
        is_last, timestamp = model_inputs.pop("is_last"), model_inputs.pop("timestamp")
        media = {
            k: model_inputs[k]
            for k in ("input_features", "pixel_values_videos", "video_embeds")
            if k in model_inputs
        }
        if "pixel_values_videos" in media:
            pixels = media["pixel_values_videos"]
            media["pixel_values_videos"] = pixels.view(pixels.shape[0], -1, 3, *pixels.shape[-2:])
        prompt = {"input_ids": model_inputs["input_ids"], "attention_mask": model_inputs["attention_mask"]}
        plan = None
        if return_ot_plan:
            # One encoding gives both the plan and the vectors that generate() decodes from.
            encoded_media = self.model.get_multimodal_features(**media, output_ot_plan=True)
            if encoded_media.ot_plan is None:
                raise ValueError(f"fusion_type={self.model.config.fusion_type!r} has no OT plan")
            plan, encoded = encoded_media.ot_plan, {"multimodal_embeds": encoded_media.multimodal_embeds}
        else:
            encoded = media  # generate() encodes them
        generate_kwargs = pipeline_generate_kwargs(self, generate_kwargs, return_dict_in_generate=False)
        sequences = self.model.generate(**prompt, **encoded, **generate_kwargs)
        # (B * n, T) -> (B, n, T): the n returned sequences of each clip stay with it when a batch is split per clip.
        batch = model_inputs["input_ids"].shape[0]
        out = {
            "sequences": sequences.view(batch, -1, sequences.shape[-1]),
            "prompt_length": torch.full((batch,), model_inputs["input_ids"].shape[1]),
            "timestamp": timestamp,
            "is_last": is_last,
        }
        if plan is not None:
            out["ot_plan"] = plan
        return out

    def postprocess(self, model_outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The results of one input: each window's (one window without `long_audio="windows"`), one dict per
        returned sequence, with `timestamp` and `ot_plan` where present."""
        return [result for output in model_outputs for result in self._results(output)]

    def _results(self, output: dict[str, Any]) -> list[dict[str, Any]]:
        """One dict per returned sequence of one clip or window; `output` holds it as a batch of one."""
        prompt_length = int(output["prompt_length"].reshape(-1)[0])
        (sequences,) = output["sequences"]  # (n, T)
        captions = self.processor.batch_decode(sequences, prompt_length=prompt_length)
        extra: dict[str, Any] = {}
        if output["timestamp"] is not None:
            extra["timestamp"] = tuple(output["timestamp"])
        if "ot_plan" in output:
            (plan,) = output["ot_plan"]  # the clip's plan, shared by its captions
            extra["ot_plan"] = plan.float().cpu().numpy().astype(np.float32)
        return [{"caption": caption, **extra} for caption in captions]
