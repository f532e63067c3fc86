"""Random LAVCap configurations at three sizes: tiny (what the demo trains in minutes on a CPU and most tests build),
small (the paper's input shapes at small widths, for CPU benchmarks) and paper-sized (for meta-device counts and GPU
benchmarks)."""

from __future__ import annotations

from typing import Any

from transformers import CLIPVisionConfig, LlamaConfig, PretrainedConfig

from ..model.configuration_lavcap import (
    PAPER_AUDIO_TOKEN_ID,
    PAPER_PAD_TOKEN_ID,
    PAPER_VIDEO_TOKEN_ID,
    CedConfig,
    LavCapConfig,
    paper_text_config,
)


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


def small_lavcap_config(
    audio_token_id: int = 32001,
    video_token_id: int = 32002,
    vocab_size: int = 32003,
    with_vision: bool = True,
) -> LavCapConfig:
    """The paper's input shapes at small widths, for CPU benchmarks: CED on the 1024 x 64 fbank (256 patches, 64
    audio tokens), a CLIP tower on 20 frames of 224 px cut in 32 px patches (50 tokens each) and 128-d projections,
    a 4-layer LLaMA (256-d) with LLaMA's vocabulary by default; 128 x 4 encoders.

    Measured on CPU, one encoder pass over a clip (~80 ms) costs 1 to 4 prompt prefills and 15 to 50 decoding steps
    of one beam; in the paper's model (CLIP ViT-L/14 on 20 frames, LLaMA-2-7B) it is ~2.5 prefills and ~250 steps
    in FLOPs, so this config understates the encoders' weight in decoding rather than inflating it.
    `with_vision=False` for the precomputed-feature set-up (128-d visual embeddings).
    """
    vision = None
    if with_vision:
        vision = CLIPVisionConfig(
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=224,
            patch_size=32,
            projection_dim=128,
        )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LavCapConfig(
        audio_config=CedConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4),
        vision_config=vision,
        text_config=text,
        visual_embed_dim=128,
        audio_token_id=audio_token_id,
        video_token_id=video_token_id,
    )


def paper_sized_config(
    audio_token_id: int = PAPER_AUDIO_TOKEN_ID,
    video_token_id: int = PAPER_VIDEO_TOKEN_ID,
    vocab_size: int = PAPER_VIDEO_TOKEN_ID + 1,
    with_vision: bool = True,
    pad_token_id: int = PAPER_PAD_TOKEN_ID,
) -> LavCapConfig:
    """The paper's dimensions with random weights: CED-base, CLIP ViT-L/14 (224 px, 768-d projection) and
    LLaMA-2-7B (32000 tokens + `[PAD]` + the two placeholders by default: `LavCapConfig()`'s decoder). For
    meta-device counts and GPU benchmarks; `with_vision=False` for the precomputed-feature set-up; another
    tokenizer's `vocab_size` comes with its `pad_token_id`."""
    vision = None
    if with_vision:
        vision = CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
            projection_dim=768,
            hidden_act="quick_gelu",
        )
    return LavCapConfig(
        audio_config=CedConfig(),
        vision_config=vision,
        text_config=paper_text_config(vocab_size=vocab_size, pad_token_id=pad_token_id),
        visual_embed_dim=768,
        audio_token_id=audio_token_id,
        video_token_id=video_token_id,
    )
