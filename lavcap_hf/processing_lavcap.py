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
PLACEHOLDER_RUN = re.compile(f"((?:{PLACEHOLDER.pattern})+)")
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


class LavCapProcessor(ProcessorMixin):
    r"""Builds LAVCap model inputs from audio, frames (or precomputed frame embeddings) and captions.

    Prompt (docs/architecture.md, section 1):
    `BOS USER: <Speech>{64 x <|audio|>}{20 x <|video|>}</Speech> {instruction}\nASSISTANT:`
    then, for training, the caption and EOS. The placeholder counts follow the model's fusion type
    (`LavCapConfig.placeholder_counts`); the model swaps the placeholders for the fused audio-visual vectors.
    As in the released code, the text on each side of the placeholders and the caption are tokenised separately
    (see `_tokenize`).

    Args:
        feature_extractor: [`LavCapFeatureExtractor`] (fbank and frame preprocessing).
        tokenizer: the language model's tokenizer with the placeholder tokens added (`add_lavcap_special_tokens`).
        num_audio_tokens: `<|audio|>` tokens per prompt (64 in the paper, 0 for `visual_only`).
        num_video_tokens: `<|video|>` tokens per prompt (20 in the paper, 0 when the fusion keeps only audio tokens).
        chat_template: Jinja template of the prompt.
    """

    attributes = ["feature_extractor", "tokenizer"]
    valid_processor_kwargs = LavCapProcessorKwargs
    # The library checks attributes against classes it can name; a remote-code copy of LavCapFeatureExtractor is
    # not one of them, so the check uses its base class and `from_pretrained` below builds the real one.
    feature_extractor_class = "SequenceFeatureExtractor"
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
                "lavcap_hf.processing_lavcap.add_lavcap_special_tokens(tokenizer) and resize the model's embeddings"
            )
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token: call add_lavcap_special_tokens(tokenizer)")
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
        content: list[dict[str, str]] = []
        if self.num_audio_tokens:
            content.append({"type": "audio"})
        if self.num_video_tokens:
            content.append({"type": "video"})
        content.append({"type": "text", "text": instruction})
        text = self._render([{"role": "user", "content": content}])
        text = text.replace(AUDIO_TOKEN, AUDIO_TOKEN * self.num_audio_tokens, 1)
        return text.replace(VIDEO_TOKEN, VIDEO_TOKEN * self.num_video_tokens, 1)

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
            return [
                TRAINING_INSTRUCTIONS[i] for i in generator.integers(len(TRAINING_INSTRUCTIONS), size=batch)
            ]
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
        instruction: str | Sequence[str] | None = None,
        generator: np.random.Generator | int | None = None,
        **kwargs: Unpack[LavCapProcessorKwargs],
    ) -> BatchFeature:
        """Featurise a batch of clips and build the prompts (plus labels when captions are given).

        Args:
            text: reference captions (training): appended after the prompt with EOS, and `labels` returned.
            audio: waveforms (samples,) or (samples, channels), one or a list; needed unless the model is
                `visual_only`.
            videos: uint8 RGB frames (num_frames, H, W, 3), one per clip.
            video_embeds: precomputed CLIP embeddings (num_frames, 768) per clip, instead of `videos`.
            instruction: instruction(s) in the prompt (default: "Please describe the audio.").
            generator: numpy Generator or seed for the SpecAugment masks and the random instructions (default:
                fresh entropy); the masks are drawn first.
            kwargs: `LavCapProcessorKwargs`, flat or per modality (`text_kwargs={...}`, `audio_kwargs={...}`):
                text: `padding` (True / "longest", the default; "max_length" with `max_length`; False),
                `max_length`, `pad_to_multiple_of`, `padding_side` ("left", the default, for generation; "right"
                is fine for training), `max_caption_length` (caption tokens kept before EOS; None keeps the
                released 300), `random_instruction` (draw one of the paper's 8 instructions per clip).
                audio: `sampling_rate` (Hz of `audio`; default: the feature extractor's), `spec_augment`
                (training only). `return_tensors`: "pt" (the default), "np" or None. The fbank length and the
                frame size are the model's (the feature extractor's settings), not call options.
        Returns:
            `input_ids`, `attention_mask` (B, L), `input_features` (B, 1024, 64), `pixel_values_videos`
            (B, 20, 3, 224, 224) or `video_embeds` (B, 20, 768), and `labels` (B, L) when `text` is given.
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
        data: dict[str, Any] = {}
        batch = None
        generator = np.random.default_rng(generator)
        if self.num_audio_tokens:
            if audio is None:
                raise ValueError("this model captions audio: pass `audio` (and its `sampling_rate`)")
            features = self.feature_extractor(
                audio,
                sampling_rate=audio_kwargs.get("sampling_rate"),
                videos=videos,
                spec_augment=audio_kwargs.get("spec_augment", False),
                generator=generator,
            )
            data["input_features"] = features["input_features"]
            batch = len(data["input_features"])
            if "pixel_values_videos" in features:
                data["pixel_values_videos"] = features["pixel_values_videos"]
        elif videos is not None:
            frames = self.feature_extractor.preprocess_videos(videos)
            data["pixel_values_videos"] = frames
            batch = len(frames)
        if video_embeds is not None:
            data["video_embeds"] = self._stack_video_embeds(video_embeds)
            batch = batch if batch is not None else len(data["video_embeds"])
        self._check_visual_inputs(data, batch)
        if batch is None:
            raise ValueError("no media given: pass `audio`, `videos` or `video_embeds`")
        captions = self._captions(text, batch)
        random_instruction = text_kwargs.get("random_instruction", False)
        prompts = [
            self.build_prompt(i)
            for i in self._instructions(instruction, batch, random_instruction, generator)
        ]
        data.update(self._tokenize(prompts, captions, text_kwargs))
        return BatchFeature(data, tensor_type=text_kwargs.get("return_tensors"))

    def _check_visual_inputs(self, data: dict[str, Any], batch: int | None) -> None:
        has_visual = "pixel_values_videos" in data or "video_embeds" in data
        if self.num_video_tokens and not has_visual:
            raise ValueError("this model uses the frames: pass `videos` (uint8 frames) or `video_embeds`")
        for key in ("pixel_values_videos", "video_embeds"):
            if key in data and batch is not None and len(data[key]) != batch:
                raise ValueError(f"got {len(data[key])} entries in {key} for {batch} clips")

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
    def _captions(text: str | Sequence[str] | None, batch: int) -> list[str] | None:
        if text is None:
            return None
        captions = [text] if isinstance(text, str) else list(text)
        if len(captions) != batch:
            raise ValueError(f"got {len(captions)} captions for {batch} clips")
        for caption in captions:
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"captions must be non-empty strings, got {caption!r}")
        return captions

    def _tokenize(
        self, prompts: list[str], captions: list[str] | None, text_kwargs: dict[str, Any]
    ) -> dict[str, np.ndarray | list[list[int]]]:
        """Token-level concatenation `BOS + prompt (+ caption + EOS)`, padded to (B, L); labels on caption + EOS only.

        The released LAVCap tokenises `"USER: <Speech>"`, `"</Speech> {instruction}\nASSISTANT:"` and the caption
        each on its own, so with Llama-2's SentencePiece tokenizer each starts with the word-start marker `▁`
        (`▁</`, `▁A`), whatever its `legacy` setting; tokenising the prompt as one string would not reproduce that.
        """
        tok = self.tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        rows = [bos + ids for ids in self._prompt_ids(prompts)]
        label_rows = [[IGNORE_INDEX] * len(row) for row in rows]
        if captions is not None:
            targets = self._caption_ids(captions, text_kwargs.get("max_caption_length"))
            rows = [row + target for row, target in zip(rows, targets, strict=True)]
            label_rows = [labels + target for labels, target in zip(label_rows, targets, strict=True)]
        width = _padded_width([len(row) for row in rows], text_kwargs)
        side = text_kwargs.get("padding_side") or "left"
        out = {
            "input_ids": _pad(rows, tok.pad_token_id, side, width),
            "attention_mask": _pad([[1] * len(r) for r in rows], 0, side, width),
        }
        if captions is not None:
            out["labels"] = _pad(label_rows, IGNORE_INDEX, side, width)
        return out

    def _prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        """Ids of each prompt without BOS: text between placeholder runs tokenised piece by piece, one id per
        placeholder."""
        pieces = [PLACEHOLDER_RUN.split(prompt) for prompt in prompts]  # text, run, text, ...
        texts = sorted({text for parts in pieces for text in parts[::2] if text})
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        ids_of = dict(zip(texts, encoded, strict=True))
        rows = []
        for parts in pieces:
            row: list[int] = []
            for index, part in enumerate(parts):
                if index % 2:
                    row += self.tokenizer.convert_tokens_to_ids(PLACEHOLDER.findall(part))
                elif part:
                    row += ids_of[part]
            rows.append(row)
        return rows

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
        """What a call with captions and all media returns (`video_embeds` replaces `pixel_values_videos` when the
        frames' CLIP embeddings are given instead of the frames; `labels` come with captions only)."""
        audio = ["input_features"] if self.num_audio_tokens else []
        return ["input_ids", "attention_mask", *audio, "pixel_values_videos", "labels"]

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
        """Load the tokenizer, the feature extractor and the processor settings from a folder or Hub repo."""
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
        settings_path = _resolve_file(pretrained_model_name_or_path, PROCESSOR_CONFIG, kwargs)
        settings = {}
        if settings_path is not None:
            with open(settings_path, encoding="utf-8") as f:
                settings = json.load(f)
        return cls(
            feature_extractor,
            tokenizer,
            num_audio_tokens=settings.get("num_audio_tokens", 64),
            num_video_tokens=settings.get("num_video_tokens", 20),
            chat_template=_read_chat_templates(pretrained_model_name_or_path, kwargs),
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


def _pad(rows: list[list[int]], value: int, side: str, width: int | None) -> np.ndarray | list[list[int]]:
    """(B, width) int64 with `rows` padded on `side`; the rows themselves when `width` is None (no padding)."""
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    if width is None:
        return [list(row) for row in rows]
    out = np.full((len(rows), width), value, dtype=np.int64)
    for i, row in enumerate(rows):
        if side == "left":
            out[i, width - len(row) :] = row
        else:
            out[i, : len(row)] = row
    return out


def _resolve_file(path_or_id: str | os.PathLike, filename: str, hub_kwargs: dict[str, Any]) -> str | None:
    """Local path of `filename` in a folder or Hub repo, or None when it has none."""
    if os.path.isdir(path_or_id):
        local = os.path.join(path_or_id, filename)
        return local if os.path.exists(local) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    names = ("revision", "cache_dir", "token", "local_files_only")
    try:
        return hf_hub_download(
            str(path_or_id), filename, **{k: hub_kwargs[k] for k in names if k in hub_kwargs}
        )
    except EntryNotFoundError:
        return None


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


def _read_chat_templates(
    path_or_id: str | os.PathLike, hub_kwargs: dict[str, Any]
) -> str | dict[str, str] | None:
    """The saved chat template: `chat_template.jinja` (with the named ones of `additional_chat_templates/`, a
    dict), else the older `chat_template.json`, else None (the built-in template)."""
    jinja = _resolve_file(path_or_id, CHAT_TEMPLATE_FILE, hub_kwargs)
    if jinja is not None:
        default = Path(jinja).read_text(encoding="utf-8")
        additional = Path(jinja).parent / ADDITIONAL_CHAT_TEMPLATES_DIR
        if not additional.is_dir():
            return default
        named = {path.stem: path.read_text(encoding="utf-8") for path in sorted(additional.glob("*.jinja"))}
        return {"default": default, **named}
    legacy = _resolve_file(path_or_id, LEGACY_CHAT_TEMPLATE_FILE, hub_kwargs)
    if legacy is None:
        return None
    with open(legacy, encoding="utf-8") as f:
        return json.load(f)["chat_template"]
