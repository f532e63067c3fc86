"""A tiny random LAVCap configuration and an offline word-level tokenizer: what the demo trains in minutes on a CPU,
and what tests and benchmarks build their small models from (`lavcap_hf.testing_utils` re-exports both)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CLIPVisionConfig, LlamaConfig, PretrainedConfig, PreTrainedTokenizerFast

from .configuration_lavcap import CedConfig, LavCapConfig
from .processing_lavcap import TRAINING_INSTRUCTIONS, add_lavcap_special_tokens


def tiny_lavcap_config(
    fusion_type: str = "ot_att",
    vocab_size: int = 96,
    width: int = 32,
    target_length: int = 128,
    num_frames: int = 4,
    image_size: int = 32,
    with_vision: bool = True,
    text_config: PretrainedConfig | None = None,
    **overrides: Any,
) -> LavCapConfig:
    """A LAVCap config with a 2-layer CED, a 2-layer CLIP vision tower and a 2-layer LLaMA.

    The two last ids of the vocabulary are the audio and video placeholders unless `overrides` set them.
    `target_length / 16` audio tokens and `num_frames` visual tokens of width `width` meet in the fusion.
    `text_config`: another decoder (any causal LM's config, of `vocab_size` tokens) in place of the LLaMA.
    """
    audio = CedConfig(
        num_mel_bins=64,
        target_length=target_length,
        hidden_size=width,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    vision = None
    if with_vision:
        vision = CLIPVisionConfig(
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=image_size // 4,
            projection_dim=width,
        )
    text = text_config or LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=2 * width,
        intermediate_size=4 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    settings: dict[str, Any] = {
        "audio_token_id": vocab_size - 2,
        "video_token_id": vocab_size - 1,
        "visual_embed_dim": width,
    }
    settings.update(overrides)
    return LavCapConfig(
        audio_config=audio,
        vision_config=vision,
        text_config=text,
        fusion_type=fusion_type,
        num_frames=num_frames,
        **settings,
    )


def word_level_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words of `texts` and of the LAVCap prompts, with the placeholder tokens.

    Ids: 0 `[PAD]`, 1 `<s>`, 2 `</s>`, 3 `[UNK]`, then the words, then `<|audio|>` and `<|video|>`. Like LLaMA's
    tokenizer, it puts `<s>` before the text it encodes with special tokens.
    Built offline in milliseconds: the demo and tests use it in place of LLaMA's tokenizer.
    """
    pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [*texts, *TRAINING_INSTRUCTIONS, "USER: <Speech> </Speech> ASSISTANT:"]
    words = sorted({w for text in corpus for w, _ in pre_tokenizer.pre_tokenize_str(text)})
    specials = ["[PAD]", "<s>", "</s>", "[UNK]"]
    vocab = {token: i for i, token in enumerate(specials + [w for w in words if w not in specials])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    # BOS before the text, as LLaMA's tokenizer puts it.
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", bos_token="<s>", eos_token="</s>", unk_token="[UNK]"
    )
    add_lavcap_special_tokens(tokenizer)
    return tokenizer
