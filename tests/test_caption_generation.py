"""The one decode path of `lavcap evaluate` and the Trainer's evaluation (`lavcap_hf/captioning/generation.py`): only
the generated tokens are read, padding and the Trainer's gather filler are not text."""

from __future__ import annotations

import numpy as np
import torch

from lavcap_hf import LavCapForConditionalGeneration, LavCapProcessor
from lavcap_hf.captioning.generation import decode_captions, generate_caption_ids
from lavcap_hf.testing.configs import tiny_lavcap_config
from lavcap_hf.testing.tokenizers import word_level_tokenizer

WORDS = "a dog barks in a park"


def tiny_processor_and_model() -> tuple[LavCapProcessor, LavCapForConditionalGeneration]:
    tokenizer = word_level_tokenizer([WORDS])
    config = tiny_lavcap_config(
        vocab_size=len(tokenizer),
        audio_token_id=tokenizer.convert_tokens_to_ids("<|audio|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video|>"),
    )
    torch.manual_seed(0)
    return LavCapProcessor.from_model_config(config, tokenizer), LavCapForConditionalGeneration(config).eval()


def test_decode_skips_padding_eos_and_gather_filler() -> None:
    processor, _ = tiny_processor_and_model()
    tokenizer = processor.tokenizer
    words = tokenizer(WORDS, add_special_tokens=False)["input_ids"]
    short = tokenizer("a dog", add_special_tokens=False)["input_ids"]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = np.full((2, len(words) + 3), -100)  # the Trainer's filler after shorter rows
    rows[0, : len(words) + 1] = [*words, eos]
    rows[1, : len(short) + 2] = [*short, eos, pad]
    assert decode_captions(processor, rows) == [WORDS, "a dog"]
    assert decode_captions(processor, torch.as_tensor(rows)) == [WORDS, "a dog"]


def test_generated_ids_are_what_generate_adds_after_the_prompts() -> None:
    processor, model = tiny_processor_and_model()
    rng = np.random.default_rng(0)
    inputs = processor(
        audio=[0.1 * rng.standard_normal(20480) for _ in range(2)],
        videos=[rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8) for _ in range(2)],
        sampling_rate=16000,
        return_tensors="pt",
    )
    generation = {"max_new_tokens": 4, "do_sample": False}
    with torch.no_grad():
        full = model.generate(**inputs, **generation)
    new = generate_caption_ids(model, dict(inputs), **generation)
    prompt_length = inputs["input_ids"].shape[1]
    assert torch.equal(new, full[:, prompt_length:])
    assert decode_captions(processor, new) == processor.batch_decode(full, prompt_length=prompt_length)
