"""LavCapProcessor: prompt with placeholder tokens, tokenization, labels, audio features and frames in one call."""

import json
import os
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Template
from jinja2.sandbox import ImmutableSandboxedEnvironment
from transformers import AutoTokenizer, BatchFeature, PreTrainedTokenizerBase
from transformers.processing_utils import (
    AudioKwargs,
    MultiModalData,
    ProcessingKwargs,
    ProcessorMixin,
    TextKwargs,
    Unpack,
)

from ._compat import name_portable_tokenizer_class
from .feature_extraction_lavcap import LavCapFeatureExtractor

AUDIO_TOKEN = "<|audio|>"
VIDEO_TOKEN = "<|video|>"
PAD_TOKEN = "[PAD]"
IGNORE_INDEX = -100
PROCESSOR_CONFIG = "processor_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
LEGACY_CHAT_TEMPLATE_FILE = "chat_template.json"
ADDITIONAL_CHAT_TEMPLATES_DIR = "additional_chat_templates"
ASSISTANT_MARK = re.compile(r"ASSISTANT\s*:")
PLACEHOLDER = re.compile(f"{re.escape(AUDIO_TOKEN)}|{re.escape(VIDEO_TOKEN)}")
MAX_CAPTION_LENGTH = 300
"""Caption tokens kept in training by default: the released `max_txt_len`."""

DEFAULT_INSTRUCTION = "Please describe the audio."
TRAINING_INSTRUCTIONS = (
    "Listen to this audio clip and provide its caption.",
    "Describe the following audio in a caption.",
    "Based on the sound you hear, create a caption for this audio.",
    "Can you describe the scene or event depicted in this audio?",
    "Could you summarise what's happening in this audio?",
    "What does this audio describe?",
    "Please describe the audio.",
    "Please write down what your hear in the audio.",
)
"""The paper's 8 training instructions, one drawn at random per training example (spelling as released)."""


# One `<|audio|>` / `<|video|>` per conversation turn; the processor expands each to the model's token count.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "USER: <Speech>"
    "{%- for part in message['content'] if part['type'] == 'audio' -%}<|audio|>{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'video' -%}<|video|>{%- endfor -%}"
    "</Speech>"
    "{%- for part in message['content'] if part['type'] == 'text' %} {{ part['text'] }}{%- endfor -%}"
    "{{ '\\n' }}ASSISTANT:"
    "{%- elif message['role'] == 'assistant' %} {{ message['content'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


# No `from __future__ import annotations` in this module: the library reads these TypedDicts' annotations at run
# time, as types, not strings.
class LavCapTextKwargs(TextKwargs, total=False):
    """Text settings of `LavCapProcessor.__call__` beyond the tokenizer's.

    max_caption_length: caption tokens kept (before EOS); None keeps the released `max_txt_len`, 300.
    random_instruction: draw each clip's instruction from the paper's 8 training instructions.
    """

    max_caption_length: int | None
    random_instruction: bool


class LavCapAudioKwargs(AudioKwargs, total=False):
    """Audio settings of `LavCapProcessor.__call__` beyond the library's.

    spec_augment: SpecAugment the fbank (training only).
    """

    spec_augment: bool


class LavCapProcessorKwargs(ProcessingKwargs, total=False):
    text_kwargs: LavCapTextKwargs
    audio_kwargs: LavCapAudioKwargs
    _defaults = {
        # Left padding: generation continues every row from its last prompt token.
        "text_kwargs": {"padding": "longest", "padding_side": "left", "random_instruction": False},
        "audio_kwargs": {"spec_augment": False},
        "common_kwargs": {"return_tensors": "pt"},
    }


def add_lavcap_special_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """Add `[PAD]` (when the tokenizer has no pad token) and the two placeholder tokens; return their ids.

    Resize the language model's embeddings to `len(tokenizer)` afterwards.
    """
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.add_tokens([AUDIO_TOKEN, VIDEO_TOKEN], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(AUDIO_TOKEN), tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)


def draw_training_instructions(generator: np.random.Generator, count: int) -> list[str]:
    """`count` of the paper's training instructions, drawn uniformly (with replacement) from `generator`."""
    return [TRAINING_INSTRUCTIONS[i] for i in generator.integers(len(TRAINING_INSTRUCTIONS), size=count)]


class LavCapProcessor(ProcessorMixin):
    r"""Builds LAVCap model inputs from audio, frames (or precomputed frame embeddings) and captions.

    Prompt (docs/architecture.md, section 1):
    `BOS USER: <Speech>{64 x <|audio|>}{20 x <|video|>}</Speech> {instruction}\nASSISTANT:`
    then, for training, the caption and EOS. The placeholder counts follow the model's fusion type
    (`LavCapConfig.placeholder_counts`); the model swaps the placeholders for the fused audio-visual vectors.
    As in the released code, the text on each side of the placeholders and the caption are tokenised separately
    (see `_tokenize`), and BOS comes first whenever the tokenizer has one.

    `text` is the prompt, as for llava and qwen2-audio: one per clip, with one `<|audio|>` and one `<|video|>`
    (what `apply_chat_template` renders from a conversation with an audio and a video entry), each expanded here to
    the model's count. Without `text`, the processor writes the prompt above around `instruction`. Reference
    captions (training) go in `captions`.

    Args:
        feature_extractor: [`LavCapFeatureExtractor`] (fbank and frame preprocessing).
        tokenizer: the language model's tokenizer with the placeholder tokens added (`add_lavcap_special_tokens`).
        num_audio_tokens: `<|audio|>` tokens per prompt (64 in the paper, 0 for `visual_only`).
        num_video_tokens: `<|video|>` tokens per prompt (20 in the paper, 0 when the fusion keeps only audio tokens).
        chat_template: Jinja template of the prompt.
    """

    attributes = ["feature_extractor", "tokenizer"]
    valid_processor_kwargs = LavCapProcessorKwargs
    # Read by 4.x only, whose `ProcessorMixin.__init__` checks each attribute against the class named here (an
    # Auto class: its base class). Not "LavCapFeatureExtractor": 4.x finds that name only where this package has
    # registered it, never in a remote-code copy. `from_pretrained` below builds the real one.
    feature_extractor_class = "AutoFeatureExtractor"
    tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        feature_extractor: LavCapFeatureExtractor,
        tokenizer: PreTrainedTokenizerBase,
        num_audio_tokens: int = 64,
        num_video_tokens: int = 20,
        chat_template: str | None = None,
    ) -> None:
        self.num_audio_tokens = num_audio_tokens
        self.num_video_tokens = num_video_tokens
        missing = [t for t in (AUDIO_TOKEN, VIDEO_TOKEN) if t not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(
                f"the tokenizer lacks the placeholder tokens {missing}: call "
                "lavcap_hf.model.processing_lavcap.add_lavcap_special_tokens(tokenizer) and resize the model's embeddings"
            )
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token: call add_lavcap_special_tokens(tokenizer)")
        # The placeholders a prompt (`text`) carries, once per clip, as the library's multimodal processors name them.
        self.audio_token, self.video_token = AUDIO_TOKEN, VIDEO_TOKEN
        self.audio_token_id, self.video_token_id = tokenizer.convert_tokens_to_ids([AUDIO_TOKEN, VIDEO_TOKEN])
        super().__init__(feature_extractor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)

    @classmethod
    def from_model_config(
        cls,
        config: Any,
        tokenizer: PreTrainedTokenizerBase,
        feature_extractor: LavCapFeatureExtractor | None = None,
        **feature_kwargs: Any,
    ) -> "LavCapProcessor":
        """A processor whose placeholder counts, fbank length and frame count match a `LavCapConfig`."""
        audio, video = config.placeholder_counts
        if feature_extractor is None:
            image_size = config.vision_config.image_size if config.vision_config is not None else 224
            feature_extractor = LavCapFeatureExtractor(
                max_length=config.audio_config.target_length,
                feature_size=config.audio_config.num_mel_bins,
                num_frames=config.num_frames,
                image_size=image_size,
                **feature_kwargs,
            )
        return cls(feature_extractor, tokenizer, num_audio_tokens=audio, num_video_tokens=video)

    # -- prompts -------------------------------------------------------------------------------------------

    def build_prompt(self, instruction: str = DEFAULT_INSTRUCTION) -> str:
        """The prompt text with each placeholder expanded to the model's token count."""
        return self._expand(self._render_prompt(instruction))

    def _render_prompt(self, instruction: str) -> str:
        """The chat template's prompt around `instruction`, one placeholder per modality the model reads."""
        content: list[dict[str, str]] = []
        if self.num_audio_tokens:
            content.append({"type": "audio"})
        if self.num_video_tokens:
            content.append({"type": "video"})
        content.append({"type": "text", "text": instruction})
        return self._render([{"role": "user", "content": content}])

    def _expand(self, prompt: str) -> str:
        """`prompt` with each placeholder repeated to the model's count."""
        return PLACEHOLDER.sub(lambda match: match.group() * self._placeholder_counts[match.group()], prompt)

    @property
    def _placeholder_counts(self) -> dict[str, int]:
        return {AUDIO_TOKEN: self.num_audio_tokens, VIDEO_TOKEN: self.num_video_tokens}

    def _render(self, messages: list[dict[str, Any]]) -> str:
        template = self.chat_template
        template = template["default"] if isinstance(template, dict) else template
        return _compiled_template(template).render(messages=messages)

    def _instructions(
        self,
        instruction: str | Sequence[str] | None,
        batch: int,
        random_instruction: bool,
        generator: np.random.Generator,
    ) -> list[str]:
        if random_instruction:
            return draw_training_instructions(generator, batch)
        if instruction is None or isinstance(instruction, str):
            return [instruction or DEFAULT_INSTRUCTION] * batch
        if len(instruction) != batch:
            raise ValueError(f"got {len(instruction)} instructions for {batch} clips")
        return list(instruction)

    # -- main call -----------------------------------------------------------------------------------------

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        audio: np.ndarray | Sequence[np.ndarray] | None = None,
        videos: np.ndarray | Sequence[np.ndarray] | None = None,
        video_embeds: np.ndarray | Sequence[np.ndarray] | None = None,
        captions: str | Sequence[str] | None = None,
        instruction: str | Sequence[str] | None = None,
        generator: np.random.Generator | int | None = None,
        **kwargs: Unpack[LavCapProcessorKwargs],
    ) -> BatchFeature:
        """Featurise a batch of clips and build their prompts (plus labels when reference captions are given).

        As with llava's and qwen2-audio's processors, `text` is the prompt: one per clip, holding one `<|audio|>`
        where its audio goes and one `<|video|>` where its frames go (as `apply_chat_template` renders them); the
        processor expands each to the model's placeholder count. Without `text`, the processor writes the paper's
        prompt around `instruction`. Reference captions, for training, go in `captions`.

        Each modality may come alone (e.g. audio without frames, or a text-only prompt): the processor prepares what
        it is given, and the model says what it lacks when it runs.

        Args:
            text: the prompt(s), e.g. `apply_chat_template(conversation, tokenize=False)`; None for the paper's
                prompt with `instruction`.
            audio: waveforms (samples,) or (samples, channels), one or a list, one per clip; ignored by a
                `visual_only` model's processor (no `<|audio|>` placeholders).
            videos: uint8 RGB frames, (num_frames, H, W, 3) or channels-first (num_frames, 3, H, W), one per clip
                (a list, a 5-D array, or one list per conversation as `apply_chat_template` passes them).
            video_embeds: precomputed CLIP embeddings (num_frames, 768) per clip, instead of `videos`.
            captions: reference captions (training): appended after each prompt with EOS, and `labels` returned.
            instruction: instruction(s) of the paper's prompt (default: "Please describe the audio."); not with
                `text`, which holds its own.
            generator: numpy Generator or seed for the SpecAugment masks and the random instructions (default:
                fresh entropy); the masks are drawn first.
            kwargs: `LavCapProcessorKwargs`, flat or per modality (`text_kwargs={...}`, `audio_kwargs={...}`):
                text: `padding` (True / "longest", the default; "max_length" with `max_length`; False),
                `max_length`, `pad_to_multiple_of`, `padding_side` ("left", the default, for generation; "right"
                is fine for training), `add_special_tokens` (BOS; default True), `return_offsets_mapping` (the
                span in `text` of each token, a placeholder's span for each of its tokens), `max_caption_length`
                (caption tokens kept before EOS; None keeps the released 300), `random_instruction` (draw one of
                the paper's 8 instructions per clip). audio: `sampling_rate` (Hz of `audio`; default: the
                feature extractor's), `spec_augment` (training only). `return_tensors`: "pt" (the default), "np"
                or None. The fbank length, frame count and frame size are the model's (the feature extractor's
                settings), not call options.
        Returns:
            `input_ids`, `attention_mask` (B, L); `input_features` (B, 1024, 64) with audio; `pixel_values_videos`
            (B, 20, 3, 224, 224) with videos or `video_embeds` (B, 20, 768); `labels` (B, L) with captions.
        """
        if kwargs.get("images") is not None:
            raise ValueError("LAVCap takes no images: pass the clip's frames as `videos`")
        # The prompt side is the processor's (left, for generation): a tokenizer saved with right padding for
        # training the language model alone must not flip it.
        tokenizer_settings = {k: v for k, v in self.tokenizer.init_kwargs.items() if k != "padding_side"}
        settings = self._merge_kwargs(
            LavCapProcessorKwargs, tokenizer_init_kwargs=tokenizer_settings, **kwargs
        )
        text_kwargs, audio_kwargs = settings["text_kwargs"], settings["audio_kwargs"]
        generator = np.random.default_rng(generator)
        data = self._featurise(audio, videos, video_embeds, audio_kwargs, generator)
        prompts = self._prompts(text, instruction, data, text_kwargs, generator)
        data.update(self._tokenize(prompts, self._captions(captions, len(prompts)), text_kwargs))
        return BatchFeature(data, tensor_type=text_kwargs.get("return_tensors"))

    def _featurise(
        self,
        audio: Any,
        videos: Any,
        video_embeds: Any,
        audio_kwargs: dict[str, Any],
        generator: np.random.Generator,
    ) -> dict[str, np.ndarray]:
        """`input_features`, `pixel_values_videos` and `video_embeds` of the media given, one row per clip."""
        data: dict[str, np.ndarray] = {}
        videos = None if videos is None else _one_video_per_clip(videos)
        if audio is not None and self.num_audio_tokens:
            features = self.feature_extractor(
                audio,
                sampling_rate=audio_kwargs.get("sampling_rate"),
                videos=videos,
                spec_augment=audio_kwargs.get("spec_augment", False),
                generator=generator,
            )
            data.update(features)
        elif videos is not None:
            data["pixel_values_videos"] = self.feature_extractor.preprocess_videos(videos)
        if video_embeds is not None:
            data["video_embeds"] = self._stack_video_embeds(video_embeds)
        batch = len(next(iter(data.values()))) if data else None
        for key in ("pixel_values_videos", "video_embeds"):
            if key in data and len(data[key]) != batch:
                raise ValueError(f"got {len(data[key])} entries in {key} for {batch} clips")
        return data

    def _prompts(
        self,
        text: str | Sequence[str] | None,
        instruction: str | Sequence[str] | None,
        media: dict[str, np.ndarray],
        text_kwargs: dict[str, Any],
        generator: np.random.Generator,
    ) -> list[str]:
        """One prompt per clip, each placeholder once (`_tokenize` expands them): `text`, checked against the
        media, or the paper's prompt around the instructions."""
        random_instruction = text_kwargs.get("random_instruction", False)
        if text is None:
            if not media:
                raise ValueError(
                    "nothing to process: pass `audio`, `videos` or `video_embeds` (the model's prompt is written "
                    "around `instruction`), or a prompt as `text`"
                )
            batch = len(next(iter(media.values())))
            instructions = self._instructions(instruction, batch, random_instruction, generator)
            return [self._render_prompt(i) for i in instructions]
        if instruction is not None or random_instruction:
            raise ValueError(
                "`text` is the whole prompt, instruction included: pass either `text` or `instruction` / "
                "`random_instruction`"
            )
        prompts = [text] if isinstance(text, str) else list(text)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"text must be a prompt or a list of prompts (strings), got {text!r}")
        _check_placeholders(prompts, media)
        return prompts

    def _stack_video_embeds(self, video_embeds: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        embeds = np.asarray(video_embeds, dtype=np.float32)
        if embeds.ndim == 2:
            embeds = embeds[None]
        if embeds.ndim != 3:
            raise ValueError(
                f"video_embeds must be (frames, dim) per clip, got an array of shape {embeds.shape}"
            )
        if embeds.shape[1] != self.feature_extractor.num_frames:
            raise ValueError(
                f"video_embeds must have num_frames={self.feature_extractor.num_frames} frames per clip, got an "
                f"array of shape {embeds.shape}"
            )
        if not np.isfinite(embeds).all():
            raise ValueError("video_embeds contain NaN or infinite values")
        return embeds

    @staticmethod
    def _captions(captions: str | Sequence[str] | None, batch: int) -> list[str] | None:
        if captions is None:
            return None
        captions = [captions] if isinstance(captions, str) else list(captions)
        if len(captions) != batch:
            raise ValueError(f"got {len(captions)} captions for {batch} clips")
        for caption in captions:
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"captions must be non-empty strings, got {caption!r}")
        return captions

    def _tokenize(
        self, prompts: list[str], captions: list[str] | None, text_kwargs: dict[str, Any]
    ) -> dict[str, np.ndarray | list[list[Any]]]:
        """Token-level concatenation `BOS + prompt (+ caption + EOS)`, padded to (B, L); labels on caption + EOS only.

        The released LAVCap tokenises `"USER: <Speech>"`, `"</Speech> {instruction}\nASSISTANT:"` and the caption
        each on its own, so with Llama-2's SentencePiece tokenizer each starts with the word-start marker `▁`
        (`▁</`, `▁A`), whatever its `legacy` setting; tokenising the prompt as one string would not reproduce that.
        With `return_offsets_mapping`, `offset_mapping` (B, L, 2) gives each token's span in its prompt: (0, 0) for
        BOS, the caption and the padding.
        """
        tok = self.tokenizer
        with_offsets = bool(text_kwargs.get("return_offsets_mapping"))
        add_bos = text_kwargs.get("add_special_tokens", True) and tok.bos_token_id is not None
        bos = [tok.bos_token_id] if add_bos else []
        rows, spans = [], []
        for ids, offsets in zip(*self._prompt_ids(prompts, with_offsets), strict=True):
            rows.append(bos + ids)
            spans.append([(0, 0)] * len(bos) + offsets)
        label_rows = [[IGNORE_INDEX] * len(row) for row in rows]
        if captions is not None:
            targets = self._caption_ids(captions, text_kwargs.get("max_caption_length"))
            rows = [row + target for row, target in zip(rows, targets, strict=True)]
            label_rows = [labels + target for labels, target in zip(label_rows, targets, strict=True)]
            spans = [row + [(0, 0)] * len(target) for row, target in zip(spans, targets, strict=True)]
        width = _padded_width([len(row) for row in rows], text_kwargs)
        side = text_kwargs.get("padding_side") or "left"
        out = {
            "input_ids": _pad(rows, tok.pad_token_id, side, width),
            "attention_mask": _pad([[1] * len(r) for r in rows], 0, side, width),
        }
        if captions is not None:
            out["labels"] = _pad(label_rows, IGNORE_INDEX, side, width)
        if with_offsets:
            out["offset_mapping"] = _pad(spans, (0, 0), side, width)
        return out

    def _prompt_ids(
        self, prompts: list[str], with_offsets: bool = False
    ) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
        """Ids of each prompt without BOS, and each id's (start, end) characters in the prompt: text between
        placeholders tokenised piece by piece, each placeholder expanded to the model's count of its id (every one
        spanning the placeholder). Spans are empty lists unless `with_offsets` (a fast tokenizer's offsets)."""
        segments = [_segments(prompt) for prompt in prompts]
        texts = sorted(
            {
                prompt[a:b]
                for prompt, parts in zip(prompts, segments, strict=True)
                for a, b, kind in parts
                if not kind
            }
        )
        encoded = (
            self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=with_offsets)
            if texts
            else {}
        )
        ids_of = dict(zip(texts, encoded.get("input_ids", []), strict=True))
        offsets_of = dict(zip(texts, encoded.get("offset_mapping", [[]] * len(texts)), strict=True))
        counts = self._placeholder_counts
        rows, spans = [], []
        for prompt, parts in zip(prompts, segments, strict=True):
            row: list[int] = []
            row_spans: list[tuple[int, int]] = []
            for start, end, placeholder in parts:
                if placeholder:
                    row += [self.tokenizer.convert_tokens_to_ids(placeholder)] * counts[placeholder]
                    row_spans += [(start, end)] * counts[placeholder] if with_offsets else []
                else:
                    row += ids_of[prompt[start:end]]
                    row_spans += [(start + a, start + b) for a, b in offsets_of[prompt[start:end]]]
            rows.append(row)
            spans.append(row_spans)
        return rows, spans

    def _caption_ids(self, captions: list[str], max_caption_length: int | None) -> list[list[int]]:
        """Ids of each caption, cut to `max_caption_length` (300 when None), then EOS."""
        limit = MAX_CAPTION_LENGTH if max_caption_length is None else max_caption_length
        if limit < 1:
            raise ValueError(f"max_caption_length must be at least 1, got {max_caption_length}")
        # A tokenizer that marks no word start on text tokenised alone (GPT-2's byte-level BPE) would glue the
        # caption to "ASSISTANT:"; there the space the caption follows has to be part of the caption's text.
        lead = "" if _starts_a_word_alone(self.tokenizer) else " "
        encoded = self.tokenizer([lead + c.strip() for c in captions], add_special_tokens=False)["input_ids"]
        return [ids[:limit] + [self.tokenizer.eos_token_id] for ids in encoded]

    # -- decoding ------------------------------------------------------------------------------------------

    def batch_decode(
        self, sequences: Any, prompt_length: int | None = None, caption_only: bool = False, **kwargs: Any
    ) -> list[str]:
        """The tokenizer's `batch_decode`, or the captions of `generate()` output.

        Args:
            sequences: token ids (B, T).
            prompt_length: drop this many leading tokens (the prompt) and read the rest as a caption.
            caption_only: read the text after the last "ASSISTANT:" as the caption (when the prompt length is not
                known, e.g. for rows padded to different lengths).
            kwargs: the tokenizer's `batch_decode` arguments; captions skip special tokens unless told otherwise.
        Returns:
            the decoded texts; captions without surrounding whitespace.
        """
        if prompt_length is None and not caption_only:
            return self.tokenizer.batch_decode(sequences, **kwargs)
        kwargs.setdefault("skip_special_tokens", True)
        if prompt_length is not None:
            sequences = [list(s)[prompt_length:] for s in sequences]
        texts = self.tokenizer.batch_decode(sequences, **kwargs)
        if caption_only:
            texts = [ASSISTANT_MARK.split(t)[-1] for t in texts]
        return [t.strip() for t in texts]

    def decode(
        self, sequence: Any, prompt_length: int | None = None, caption_only: bool = False, **kwargs: Any
    ) -> str:
        """`batch_decode` of one sequence."""
        return self.batch_decode(
            [sequence], prompt_length=prompt_length, caption_only=caption_only, **kwargs
        )[0]

    @property
    def model_input_names(self) -> list[str]:
        """What a call with all media returns (`video_embeds` replaces `pixel_values_videos` when the frames' CLIP
        embeddings are given instead of the frames; `labels` come with reference captions)."""
        audio = ["input_features"] if self.num_audio_tokens else []
        return ["input_ids", "attention_mask", *audio, "pixel_values_videos"]

    def _get_num_multimodal_tokens(
        self,
        audio_lengths: Sequence[int] | None = None,
        video_sizes: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> MultiModalData:
        """Placeholder tokens each clip takes in the prompt: `num_audio_tokens` per audio clip whatever its length
        (the fbank is padded or cut to the model's length) and `num_video_tokens` per video whatever its frame
        size (frames are resized to the model's)."""
        counts: dict[str, list[int]] = {}
        if audio_lengths is not None:
            counts["num_audio_tokens"] = [self.num_audio_tokens] * len(audio_lengths)
        if video_sizes is not None:
            counts["num_video_tokens"] = [self.num_video_tokens] * len(video_sizes)
        return MultiModalData(**counts)

    # -- saving / loading ----------------------------------------------------------------------------------

    def save_pretrained(
        self, save_directory: str | os.PathLike, save_jinja_files: bool = True, **kwargs: Any
    ) -> list[str]:
        """Write the tokenizer, `preprocessor_config.json`, `processor_config.json` and the chat template(s):
        `chat_template.jinja`, plus `additional_chat_templates/<name>.jinja` for named templates, or all in
        `chat_template.json` with `save_jinja_files=False` (the format of older releases)."""
        templates = _named_templates(self.chat_template)  # checked before anything is written
        if not save_jinja_files and len(templates) > 1:
            raise ValueError(
                "chat_template.json holds one chat template: save named templates as jinja files"
            )
        os.makedirs(save_directory, exist_ok=True)
        if self._auto_class is not None:
            from transformers.dynamic_module_utils import custom_object_save

            custom_object_save(self, save_directory, config=None)
        files = list(self.tokenizer.save_pretrained(save_directory, save_jinja_files=save_jinja_files))
        name_portable_tokenizer_class(save_directory)
        files += self.feature_extractor.save_pretrained(save_directory)
        config = {
            "processor_class": type(self).__name__,
            "num_audio_tokens": self.num_audio_tokens,
            "num_video_tokens": self.num_video_tokens,
        }
        if self._auto_class is not None:
            module = type(self).__module__.split(".")[-1]
            config["auto_map"] = {self._auto_class: f"{module}.{type(self).__name__}"}
        path = os.path.join(save_directory, PROCESSOR_CONFIG)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        if save_jinja_files:
            return [*files, path, *_write_chat_templates(save_directory, templates)]
        legacy = os.path.join(save_directory, LEGACY_CHAT_TEMPLATE_FILE)
        with open(legacy, "w", encoding="utf-8") as f:
            json.dump({"chat_template": templates["default"]}, f, indent=2)
        return [*files, path, legacy]

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> "LavCapProcessor":
        """Load the tokenizer, the feature extractor, `processor_config.json` and the chat templates from a folder or
        Hub repo, all from its `subfolder` when one is given. `processor_config.json` must be there (the placeholder
        counts are the model's, with no default); the chat templates are optional (the built-in one otherwise)."""
        # AutoTokenizer reads the folder's config.json, whose auto_map needs the caller's trust_remote_code (without
        # it, Transformers asks on stdin where this package is not installed).
        trust_remote_code = kwargs.pop("trust_remote_code", None)
        kwargs.pop("_from_auto", None)
        tokenizer = kwargs.pop("tokenizer", None) or AutoTokenizer.from_pretrained(
            pretrained_model_name_or_path, trust_remote_code=trust_remote_code, **kwargs
        )
        feature_extractor = kwargs.pop("feature_extractor", None) or LavCapFeatureExtractor.from_pretrained(
            pretrained_model_name_or_path, **kwargs
        )
        files = _SavedFiles(str(pretrained_model_name_or_path), kwargs)
        with open(files.resolve(PROCESSOR_CONFIG, required=True), encoding="utf-8") as f:
            settings = json.load(f)
        missing = sorted({"num_audio_tokens", "num_video_tokens"} - settings.keys())
        if missing:
            raise ValueError(f"{files.describe(PROCESSOR_CONFIG)} lacks {missing}: save the processor again")
        return cls(
            feature_extractor,
            tokenizer,
            num_audio_tokens=settings["num_audio_tokens"],
            num_video_tokens=settings["num_video_tokens"],
            chat_template=_read_chat_templates(files),
        )


@lru_cache(maxsize=8)
def _compiled_template(template: str) -> Template:
    """Jinja compilation takes ~50 ms; prompts are rendered for every batch."""
    return ImmutableSandboxedEnvironment().from_string(template)


def _starts_a_word_alone(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether text tokenised on its own begins a new word, i.e. `ids("USER") + ids("ASSISTANT")` equals
    `ids("USER ASSISTANT")`: true of SentencePiece's `▁` prefix, of whitespace-split vocabularies and of byte-level BPE
    with a prefix space; false of GPT-2's byte-level BPE."""
    probes = ["USER", "ASSISTANT", "USER ASSISTANT"]
    first, second, joined = tokenizer(probes, add_special_tokens=False)["input_ids"]
    return first + second == joined


def _padded_width(lengths: list[int], text_kwargs: dict[str, Any]) -> int | None:
    """Row width after padding: the longest row (`padding` True / "longest"), `max_length` ("max_length"), None
    (False / "do_not_pad"), rounded up to `pad_to_multiple_of`. A row longer than `max_length` is an error: cutting
    it would drop placeholders or the caption's EOS."""
    padding = text_kwargs.get("padding", "longest")
    padding = getattr(padding, "value", padding)  # PaddingStrategy
    max_length = text_kwargs.get("max_length")
    if (
        max_length is not None
        and max(lengths) > max_length
        and (padding == "max_length" or text_kwargs.get("truncation"))
    ):
        raise ValueError(
            f"the prompt with its caption takes {max(lengths)} tokens, more than max_length={max_length}; shorten the "
            "caption with max_caption_length instead (the prompt cannot be cut)"
        )
    if padding in (False, "do_not_pad"):
        return None
    if padding in (True, "longest"):
        width = max(lengths)
    elif padding == "max_length":
        if max_length is None:
            raise ValueError('padding="max_length" needs max_length')
        width = max_length
    else:
        raise ValueError(
            f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}"
        )
    multiple = text_kwargs.get("pad_to_multiple_of")
    return -(-width // multiple) * multiple if multiple else width


def _pad(
    rows: list[list[Any]], value: int | tuple[int, int], side: str, width: int | None
) -> np.ndarray | list[list[Any]]:
    """(B, width) int64 (B, width, 2 for pairs such as offsets) with `rows` padded with `value` on `side`; the rows
    themselves when `width` is None (no padding). (`tokenizer.pad` pads the tokenizer's own keys only: the labels and
    the offsets would still be padded here, and one padder keeps all four aligned.)"""
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    if width is None:
        return [list(row) for row in rows]
    out = np.full((len(rows), width, *np.shape(value)), value, dtype=np.int64)
    for i, row in enumerate(rows):
        if not row:
            continue
        if side == "left":
            out[i, width - len(row) :] = row
        else:
            out[i, : len(row)] = row
    return out


def _segments(prompt: str) -> list[tuple[int, int, str | None]]:
    """(start, end, placeholder) spans covering `prompt`: each placeholder token, and the text between them (None)."""
    parts: list[tuple[int, int, str | None]] = []
    end = 0
    for match in PLACEHOLDER.finditer(prompt):
        if match.start() > end:
            parts.append((end, match.start(), None))
        parts.append((match.start(), match.end(), match.group()))
        end = match.end()
    if end < len(prompt):
        parts.append((end, len(prompt), None))
    return parts


def _check_placeholders(prompts: list[str], media: dict[str, np.ndarray]) -> None:
    """Each prompt holds at most one placeholder of each kind, `<|audio|>` first, and one for every medium given
    (one clip per prompt); ValueError naming the problem."""
    for token, keys in (
        (AUDIO_TOKEN, ("input_features",)),
        (VIDEO_TOKEN, ("pixel_values_videos", "video_embeds")),
    ):
        counts = [prompt.count(token) for prompt in prompts]
        if max(counts) > 1:
            raise ValueError(
                f"a prompt holds {max(counts)} {token}: each prompt takes one clip, so one {token} (the processor "
                "expands it to the model's count)"
            )
        given = [key for key in keys if key in media]
        if not given:
            continue
        clips = len(media[given[0]])
        if clips != len(prompts):
            raise ValueError(
                f"got {len(prompts)} prompts for {clips} clips in {given[0]}: give one prompt per clip"
            )
        if not all(counts):
            raise ValueError(
                f"`text` is the prompt, and each needs one {token} where its clip's {given[0]} go (as "
                "apply_chat_template writes it); reference captions go in `captions`"
            )
    for prompt in prompts:
        if (
            AUDIO_TOKEN in prompt
            and VIDEO_TOKEN in prompt
            and prompt.index(VIDEO_TOKEN) < prompt.index(AUDIO_TOKEN)
        ):
            raise ValueError(
                f"{VIDEO_TOKEN} comes before {AUDIO_TOKEN} in the prompt {prompt!r}: the model fills the audio "
                "placeholders first"
            )


def _one_video_per_clip(videos: Any) -> Any:
    """`videos` as the feature extractor takes them: one video per clip. `apply_chat_template` passes one list per
    conversation (`[[video], [video]]`); each must hold exactly one video."""
    if isinstance(videos, (list, tuple)) and videos and all(isinstance(v, (list, tuple)) for v in videos):
        counts = [len(v) for v in videos]
        if any(count != 1 for count in counts):
            raise ValueError(
                f"got {counts} videos per conversation: each clip (conversation) takes exactly one video"
            )
        return [v[0] for v in videos]
    return videos


HUB_KWARGS = ("subfolder", "revision", "cache_dir", "token", "local_files_only", "force_download", "proxies")
"""`from_pretrained` arguments that say where the processor's files are."""


class _SavedFiles:
    """The files of a saved processor in a folder or Hub repo, at its `subfolder`: found with the library's
    `cached_file` (which downloads them from the Hub), named templates listed in the folder or repo."""

    def __init__(self, path_or_id: str, kwargs: dict[str, Any]) -> None:
        self.path_or_id = path_or_id
        self.hub_kwargs = {key: kwargs[key] for key in HUB_KWARGS if kwargs.get(key) is not None}
        self.subfolder = self.hub_kwargs.get("subfolder", "")

    def describe(self, filename: str) -> str:
        """Where `filename` is looked for, for messages."""
        path = "/".join(part for part in (self.subfolder, filename) if part)
        return f"{path} of {self.path_or_id}"

    def resolve(self, filename: str, required: bool = False) -> str | None:
        """Local path of `filename`, downloaded if need be; None when there is none and it is not `required`."""
        from transformers.utils import cached_file

        resolved = cached_file(
            self.path_or_id, filename, **self.hub_kwargs, _raise_exceptions_for_missing_entries=False
        )
        if resolved is None and required:
            raise OSError(f"{self.describe(filename)} not found: LavCapProcessor.from_pretrained needs it")
        return resolved

    def list(self, folder: str, suffix: str) -> list[str]:
        """Names of the `suffix` files in `folder` (under the subfolder), sorted; [] when there is no such folder.
        From the Hub, the repo's listing, else (offline) the cached snapshot's."""
        if os.path.isdir(self.path_or_id):
            return sorted(p.name for p in Path(self.path_or_id, self.subfolder, folder).glob(f"*{suffix}"))
        from huggingface_hub import HfApi, constants, snapshot_download
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

        in_repo = "/".join(part for part in (self.subfolder, folder) if part)
        revision, token = self.hub_kwargs.get("revision"), self.hub_kwargs.get("token")
        if not (self.hub_kwargs.get("local_files_only") or constants.HF_HUB_OFFLINE):
            try:
                entries = HfApi().list_repo_tree(
                    self.path_or_id, path_in_repo=in_repo, revision=revision, token=token
                )
                return sorted(Path(e.path).name for e in entries if e.path.endswith(suffix))
            except EntryNotFoundError:
                return []
            except (HfHubHTTPError, OSError):  # offline or unreachable: what the cache holds
                pass
        try:
            snapshot = snapshot_download(
                self.path_or_id,
                revision=revision,
                cache_dir=self.hub_kwargs.get("cache_dir"),
                local_files_only=True,
            )
        except LocalEntryNotFoundError:
            return []
        return sorted(p.name for p in Path(snapshot, in_repo).glob(f"*{suffix}"))


def _named_templates(chat_template: str | dict[str, str]) -> dict[str, str]:
    """`{"default": template, name: template, ...}`; ValueError for a name that is not a plain file name."""
    templates = {"default": chat_template} if isinstance(chat_template, str) else dict(chat_template)
    if "default" not in templates:
        raise ValueError(f"a dict of chat templates needs a 'default' one, got {sorted(templates)}")
    for name in templates:
        if not re.fullmatch(r"[\w.-]+", name) or name.strip(".") == "":
            raise ValueError(
                f"chat template names must be plain file names (letters, digits, _ . -), got {name!r}"
            )
    return templates


def _write_chat_templates(save_directory: str | os.PathLike, templates: dict[str, str]) -> list[str]:
    """`chat_template.jinja` (the default) and `additional_chat_templates/<name>.jinja`; returns the paths."""
    paths = {"default": Path(save_directory, CHAT_TEMPLATE_FILE)}
    for name in templates.keys() - {"default"}:
        paths[name] = Path(save_directory, ADDITIONAL_CHAT_TEMPLATES_DIR, f"{name}.jinja")
        paths[name].parent.mkdir(exist_ok=True)
    for name, path in paths.items():
        path.write_text(templates[name], encoding="utf-8")
    return [str(path) for path in paths.values()]


def _read_chat_templates(files: _SavedFiles) -> str | dict[str, str] | None:
    """The saved chat template: `chat_template.jinja` (with the named ones of `additional_chat_templates/`, a
    dict), else the older `chat_template.json`, else None (the built-in template)."""
    jinja = files.resolve(CHAT_TEMPLATE_FILE)
    if jinja is not None:
        default = Path(jinja).read_text(encoding="utf-8")
        named = {
            Path(name).stem: Path(
                files.resolve(f"{ADDITIONAL_CHAT_TEMPLATES_DIR}/{name}", required=True)
            ).read_text(encoding="utf-8")
            for name in files.list(ADDITIONAL_CHAT_TEMPLATES_DIR, ".jinja")
        }
        return {"default": default, **named} if named else default
    legacy = files.resolve(LEGACY_CHAT_TEMPLATE_FILE)
    if legacy is None:
        return None
    with open(legacy, encoding="utf-8") as f:
        return json.load(f)["chat_template"]
