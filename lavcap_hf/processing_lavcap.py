"""LavCapProcessor: prompt with placeholder tokens, tokenization, labels, audio features and frames in one call."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from jinja2 import Template
from jinja2.sandbox import ImmutableSandboxedEnvironment
from transformers import AutoTokenizer, BatchFeature, PreTrainedTokenizerBase
from transformers.processing_utils import ProcessorMixin

from ._compat import name_portable_tokenizer_class
from .feature_extraction_lavcap import LavCapFeatureExtractor

AUDIO_TOKEN = "<|audio|>"
VIDEO_TOKEN = "<|video|>"
PAD_TOKEN = "[PAD]"
IGNORE_INDEX = -100
PROCESSOR_CONFIG = "processor_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
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
    ) -> LavCapProcessor:
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
        return _compiled_template(self.chat_template).render(messages=messages)

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
        audio: np.ndarray | Sequence[np.ndarray] | None = None,
        videos: np.ndarray | Sequence[np.ndarray] | None = None,
        text: str | Sequence[str] | None = None,
        sampling_rate: int | None = None,
        video_embeds: np.ndarray | Sequence[np.ndarray] | None = None,
        instruction: str | Sequence[str] | None = None,
        random_instruction: bool = False,
        spec_augment: bool = False,
        generator: np.random.Generator | int | None = None,
        padding_side: str = "left",
        max_caption_length: int | None = None,
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """Featurise a batch of clips and build the prompts (plus labels when captions are given).

        Args:
            audio: waveforms (samples,) or (samples, channels), one or a list; needed unless the model is
                `visual_only`.
            videos: uint8 RGB frames (num_frames, H, W, 3), one per clip.
            text: reference captions (training): appended after the prompt with EOS, and `labels` returned.
            sampling_rate: rate of `audio` in Hz.
            video_embeds: precomputed CLIP embeddings (num_frames, 768) per clip, instead of `videos`.
            instruction: instruction(s) in the prompt; `random_instruction` draws one of the paper's 8 per clip.
            spec_augment: SpecAugment the fbank (training only).
            generator: numpy Generator or seed for the SpecAugment masks and the random instructions (default:
                fresh entropy); the masks are drawn first.
            padding_side: "left" for generation (the default), "right" is fine for training.
            max_caption_length: caption tokens kept (before EOS); None keeps the released `max_txt_len`, 300.
        Returns:
            `input_ids`, `attention_mask` (B, L), `input_features` (B, 1024, 64), `pixel_values_videos`
            (B, 20, 3, 224, 224) or `video_embeds` (B, 20, 768), and `labels` (B, L) when `text` is given.
        """
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        data: dict[str, Any] = {}
        batch = None
        generator = np.random.default_rng(generator)
        if self.num_audio_tokens:
            if audio is None:
                raise ValueError("this model captions audio: pass `audio` (and `sampling_rate`)")
            features = self.feature_extractor(
                audio,
                sampling_rate=sampling_rate,
                videos=videos,
                spec_augment=spec_augment,
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
        prompts = [
            self.build_prompt(i)
            for i in self._instructions(instruction, batch, random_instruction, generator)
        ]
        data.update(self._tokenize(prompts, captions, padding_side, max_caption_length))
        return BatchFeature(data, tensor_type=return_tensors)

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
        self,
        prompts: list[str],
        captions: list[str] | None,
        padding_side: str,
        max_caption_length: int | None,
    ) -> dict[str, np.ndarray]:
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
            targets = self._caption_ids(captions, max_caption_length)
            rows = [row + target for row, target in zip(rows, targets, strict=True)]
            label_rows = [labels + target for labels, target in zip(label_rows, targets, strict=True)]
        out = {
            "input_ids": _pad(rows, tok.pad_token_id, padding_side),
            "attention_mask": _pad([[1] * len(r) for r in rows], 0, padding_side),
        }
        if captions is not None:
            out["labels"] = _pad(label_rows, IGNORE_INDEX, padding_side)
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

    def batch_decode(self, sequences: Any, prompt_length: int | None = None, **kwargs: Any) -> list[str]:
        """Captions from `generate()` output: drop the first `prompt_length` tokens (the prompt), then decode.

        Without `prompt_length` the text after the last `ASSISTANT:` is returned.
        """
        kwargs.setdefault("skip_special_tokens", True)
        if prompt_length is not None:
            sequences = [list(s)[prompt_length:] for s in sequences]
        texts = self.tokenizer.batch_decode(sequences, **kwargs)
        return [ASSISTANT_MARK.split(t)[-1].strip() for t in texts]

    def decode(self, sequence: Any, prompt_length: int | None = None, **kwargs: Any) -> str:
        return self.batch_decode([sequence], prompt_length=prompt_length, **kwargs)[0]

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "input_features", "pixel_values_videos", "video_embeds"]

    # -- saving / loading ----------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> list[str]:
        """Write the tokenizer, `preprocessor_config.json`, `chat_template.jinja` and `processor_config.json`."""
        os.makedirs(save_directory, exist_ok=True)
        if self._auto_class is not None:
            from transformers.dynamic_module_utils import custom_object_save

            custom_object_save(self, save_directory, config=None)
        files = list(self.tokenizer.save_pretrained(save_directory))
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
        template_path = os.path.join(save_directory, CHAT_TEMPLATE_FILE)
        with open(template_path, "w", encoding="utf-8") as f:
            f.write(self.chat_template)
        return [*files, path, template_path]

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> LavCapProcessor:
        """Load the tokenizer, the feature extractor and the processor settings from a folder or Hub repo."""
        # AutoTokenizer reads the folder's config.json, whose auto_map needs the caller's trust_remote_code (without
        # it, Transformers asks on stdin where this package is not installed).
        trust_remote_code = kwargs.pop("trust_remote_code", None)
        kwargs.pop("_from_auto", None)
        tokenizer = AutoTokenizer.from_pretrained(
            pretrained_model_name_or_path, trust_remote_code=trust_remote_code, **kwargs
        )
        feature_extractor = LavCapFeatureExtractor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        settings_path = _resolve_file(pretrained_model_name_or_path, PROCESSOR_CONFIG, kwargs)
        settings = {}
        if settings_path is not None:
            with open(settings_path, encoding="utf-8") as f:
                settings = json.load(f)
        template_path = _resolve_file(pretrained_model_name_or_path, CHAT_TEMPLATE_FILE, kwargs)
        chat_template = None
        if template_path is not None:
            with open(template_path, encoding="utf-8") as f:
                chat_template = f.read()
        return cls(
            feature_extractor,
            tokenizer,
            num_audio_tokens=settings.get("num_audio_tokens", 64),
            num_video_tokens=settings.get("num_video_tokens", 20),
            chat_template=chat_template,
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


def _pad(rows: list[list[int]], value: int, side: str) -> np.ndarray:
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    width = max(len(r) for r in rows)
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
