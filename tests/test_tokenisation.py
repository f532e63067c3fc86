"""Prompt and caption tokenisation against the released LAVCap code (models/lavcaps.py: `prompt_wrap`, `forward`).

The release tokenises each piece on its own: BOS, `"USER: <Speech>"`, the fused audio-visual vectors,
`"</Speech> {instruction}\nASSISTANT:"`, then `caption + "</s>"` truncated to `max_txt_len` 300. With Llama-2's
SentencePiece tokenizer every piece therefore starts with the word-start marker `▁`. The SentencePiece model here is
trained in the test on a few sentences with Llama-2's settings (BPE, byte fallback, identity normalisation, dummy
prefix), and loaded through transformers' Llama tokenizer classes with `legacy=True` and `legacy=False`.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lavcap_hf import LavCapProcessor
from lavcap_hf.model.processing_lavcap import (
    AUDIO_TOKEN,
    IGNORE_INDEX,
    TRAINING_INSTRUCTIONS,
    VIDEO_TOKEN,
    add_lavcap_special_tokens,
)
from lavcap_hf.testing.configs import tiny_lavcap_config
from lavcap_hf.testing.tokenizers import word_level_tokenizer

SAMPLING_RATE = 16000
CAPTION = "A dog barks"
CORPUS = [
    *TRAINING_INSTRUCTIONS,
    "USER: <Speech> </Speech> Please describe the audio.\nASSISTANT: A dog barks.",
    "A dog barks while rain falls on a tin roof.",
    "A man speaks and a car passes by.",
    "A bird sings, then a dog barks twice.",
    "a dog barks loudly",
    "An engine idles and a horn honks.",
    "Birds sing in the morning while water runs.",
    "<p> </p> <b> </b> <i> </i> </s>",  # for a `▁</` piece
    "def caption():\n    return  'a dog barks'\n        pass",  # for `▁▁`, as code gave Llama-2 one
]
# Released: `prompt_template: "USER: {}\nASSISTANT:"` around `"<Speech><SpeechHere></Speech> {instruction}"`.
RELEASED_TEMPLATE = "USER: {}\nASSISTANT:"
RELEASED_MAX_TXT_LEN = 300
# transformers 5.x has one Llama tokenizer class (LlamaTokenizerFast is an alias), 4.55 a slow and a fast one.
LLAMA_CLASSES = list(dict.fromkeys([transformers.LlamaTokenizer, transformers.LlamaTokenizerFast]))


@pytest.fixture(scope="module")
def sentencepiece_folder(tmp_path_factory) -> str:
    """A folder holding `tokenizer.model`, a 400-piece SentencePiece BPE model with Llama-2's trainer settings.

    Like Llama-2's, its vocabulary has `▁</`, `▁A` and the whitespace piece `▁▁`, so a missing or doubled word-start
    marker shows as a different id.
    """
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 8),
        model_writer=model,
        model_type="bpe",
        vocab_size=400,
        hard_vocab_limit=False,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        num_threads=1,
        minloglevel=2,
    )
    folder = tmp_path_factory.mktemp("sentencepiece")
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return str(folder)


def llama_tokenizer(folder: str, cls: type, legacy: bool) -> PreTrainedTokenizerBase:
    """`cls.from_pretrained(folder, legacy=legacy)` with `[PAD]` and the placeholders added.

    transformers 5.x converts the SentencePiece model into a tokenizers backend, 4.55 builds the fast class that way
    and the slow class with `legacy=False` edits the model: each needs protobuf.
    """
    slow_legacy_on_4x = (
        legacy and cls.__name__ == "LlamaTokenizer" and transformers.__version__.startswith("4.")
    )
    if not slow_legacy_on_4x:
        pytest.importorskip("google.protobuf", reason="transformers reads SentencePiece models with protobuf")
    tokenizer = cls.from_pretrained(folder, legacy=legacy)
    assert {"▁</", "▁A", "▁▁"} <= tokenizer.get_vocab().keys()
    add_lavcap_special_tokens(tokenizer)
    return tokenizer


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE (no prefix space) trained on CORPUS, with `[PAD]` and the placeholders."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    add_lavcap_special_tokens(tokenizer)
    return tokenizer


def make_processor(tokenizer: PreTrainedTokenizerBase) -> LavCapProcessor:
    """An `ot_att` processor with 8 audio and 4 video placeholders (128-frame fbank, 4 frames)."""
    config = tiny_lavcap_config(
        "ot_att",
        vocab_size=len(tokenizer),
        audio_token_id=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN),
        video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
    )
    return LavCapProcessor.from_model_config(config, tokenizer)


def run(processor: LavCapProcessor, captions: list[str] | None, instructions: list[str], **kwargs) -> dict:
    """Processor outputs for len(instructions) clips of noise with precomputed frame embeddings, as numpy."""
    rng = np.random.default_rng(0)
    count = len(instructions)
    embeds = rng.standard_normal((count, processor.feature_extractor.num_frames, 32)).astype(np.float32)
    batch = processor(
        audio=[0.1 * rng.standard_normal(4000).astype(np.float32) for _ in range(count)],
        sampling_rate=SAMPLING_RATE,
        video_embeds=embeds,
        captions=captions,
        instruction=instructions,
        return_tensors="np",
        **kwargs,
    )
    return dict(batch)


def encode(tokenizer: PreTrainedTokenizerBase, text: str, **kwargs) -> list[int]:
    return tokenizer(text, add_special_tokens=False, **kwargs)["input_ids"]


def released_inputs(
    tokenizer: PreTrainedTokenizerBase, processor: LavCapProcessor, instruction: str, caption: str
) -> tuple[list[int], list[int]]:
    """(input ids, labels) as the release builds them, the fused vectors standing as placeholder ids."""
    prompt = RELEASED_TEMPLATE.format(f"<Speech><SpeechHere></Speech> {instruction}")
    before, after = prompt.split("<SpeechHere>")
    fused = tokenizer.convert_tokens_to_ids(
        [AUDIO_TOKEN] * processor.num_audio_tokens + [VIDEO_TOKEN] * processor.num_video_tokens
    )
    prompt_ids = [tokenizer.bos_token_id, *encode(tokenizer, before), *fused, *encode(tokenizer, after)]
    target = encode(tokenizer, caption + "</s>", truncation=True, max_length=RELEASED_MAX_TXT_LEN)
    return prompt_ids + target, [IGNORE_INDEX] * len(prompt_ids) + target


def real_rows(batch: dict, key: str) -> list[list[int]]:
    return [
        row[mask.astype(bool)].tolist() for row, mask in zip(batch[key], batch["attention_mask"], strict=True)
    ]


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "non_legacy"])
@pytest.mark.parametrize("cls", LLAMA_CLASSES, ids=lambda c: c.__name__)
def test_sentencepiece_prompt_and_labels_match_the_release(
    sentencepiece_folder, cls: type, legacy: bool
) -> None:
    tokenizer = llama_tokenizer(sentencepiece_folder, cls, legacy)
    processor = make_processor(tokenizer)
    instructions = [TRAINING_INSTRUCTIONS[6], TRAINING_INSTRUCTIONS[0]]
    captions = [CAPTION, "A man speaks and a car passes by."]
    batch = run(processor, captions, instructions, padding_side="right")
    vectors = processor.num_audio_tokens + processor.num_video_tokens
    after_vectors = 1 + len(encode(tokenizer, "USER: <Speech>")) + vectors
    for ids, labels, instruction, caption in zip(
        real_rows(batch, "input_ids"), real_rows(batch, "labels"), instructions, captions, strict=True
    ):
        expected_ids, expected_labels = released_inputs(tokenizer, processor, instruction, caption)
        assert ids == expected_ids
        assert labels == expected_labels
        tokens = tokenizer.convert_ids_to_tokens(ids)
        assert tokens[after_vectors] == "▁</"
        caption_start = len(ids) - len(encode(tokenizer, caption)) - 1
        assert tokens[caption_start].startswith("▁") and tokens[caption_start] != "▁"
        assert not any(t.startswith("▁▁") for t in tokens)
        assert processor.decode(ids, caption_only=True) == caption
    first_row = tokenizer.convert_ids_to_tokens(real_rows(batch, "input_ids")[0])
    assert first_row[-4:] == ["▁A", "▁dog", "▁barks", "</s>"]


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "non_legacy"])
@pytest.mark.parametrize("cls", LLAMA_CLASSES, ids=lambda c: c.__name__)
def test_sentencepiece_generation_prompt_matches_the_release(
    sentencepiece_folder, cls: type, legacy: bool
) -> None:
    tokenizer = llama_tokenizer(sentencepiece_folder, cls, legacy)
    processor = make_processor(tokenizer)
    batch = run(processor, None, [TRAINING_INSTRUCTIONS[6]])
    expected_ids, _ = released_inputs(tokenizer, processor, TRAINING_INSTRUCTIONS[6], CAPTION)
    assert batch["input_ids"][0].tolist() == expected_ids[: -len(encode(tokenizer, CAPTION)) - 1]


def test_caption_length_defaults_to_the_released_300_tokens(sentencepiece_folder) -> None:
    tokenizer = llama_tokenizer(sentencepiece_folder, LLAMA_CLASSES[-1], legacy=False)
    processor = make_processor(tokenizer)
    caption = " ".join(["dog"] * 400)
    assert len(encode(tokenizer, caption)) == 400
    released = encode(tokenizer, caption + "</s>", truncation=True, max_length=RELEASED_MAX_TXT_LEN)
    for kwargs in ({}, {"max_caption_length": None}):
        labels = run(processor, [caption], [TRAINING_INSTRUCTIONS[6]], **kwargs)["labels"][0]
        # The release cuts caption + EOS at 300 and so loses EOS on such a caption; the processor keeps it.
        assert labels[labels != IGNORE_INDEX].tolist() == [*released, tokenizer.eos_token_id]
    labels = run(processor, [caption], [TRAINING_INSTRUCTIONS[6]], max_caption_length=5)["labels"][0]
    assert labels[labels != IGNORE_INDEX].tolist() == [*released[:5], tokenizer.eos_token_id]


def test_byte_level_bpe_keeps_the_space_before_the_caption() -> None:
    tokenizer = byte_level_tokenizer()
    processor = make_processor(tokenizer)
    caption = "a dog barks"
    batch = run(processor, [caption], [TRAINING_INSTRUCTIONS[6]])
    ids = batch["input_ids"][0].tolist()
    prompt = processor.build_prompt(TRAINING_INSTRUCTIONS[6])
    # Without word-start markers, one string tokenised at once is the natural reading of the prompt.
    assert ids == [tokenizer.bos_token_id, *encode(tokenizer, f"{prompt} {caption}"), tokenizer.eos_token_id]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert text == f"USER: <Speech></Speech> {TRAINING_INSTRUCTIONS[6]}\nASSISTANT: {caption}"
    labels = batch["labels"][0]
    assert tokenizer.decode(labels[labels != IGNORE_INDEX]) == f" {caption}<|endoftext|>"
    assert processor.decode(ids, caption_only=True) == caption


def test_word_level_tokenizer_round_trips_the_caption() -> None:
    caption = "a dog barks"
    tokenizer = word_level_tokenizer([caption])
    processor = make_processor(tokenizer)
    batch = run(processor, [caption], [TRAINING_INSTRUCTIONS[6]])
    ids = batch["input_ids"][0].tolist()
    prompt = processor.build_prompt(TRAINING_INSTRUCTIONS[6])
    assert ids == [tokenizer.bos_token_id, *encode(tokenizer, f"{prompt} {caption}"), tokenizer.eos_token_id]
    assert tokenizer.unk_token_id not in ids
    labels = batch["labels"][0]
    assert tokenizer.decode(labels[labels != IGNORE_INDEX], skip_special_tokens=True) == caption
    assert tokenizer.decode(ids, skip_special_tokens=True).endswith("ASSISTANT : a dog barks")
    assert processor.decode(ids, caption_only=True) == caption
