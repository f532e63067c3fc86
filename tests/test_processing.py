"""LavCapProcessor: prompt and placeholders per fusion type, labels, padding, decoding, saving, errors."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys

import jinja2
import numpy as np
import pytest
import torch
from fake_hub import FakeHub
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoProcessor, PreTrainedTokenizerFast

from lavcap_hf import FUSION_TYPES, LavCapConfig, LavCapForConditionalGeneration, LavCapProcessor
from lavcap_hf.model.processing_lavcap import AUDIO_TOKEN, TRAINING_INSTRUCTIONS, VIDEO_TOKEN
from lavcap_hf.testing.configs import tiny_lavcap_config
from lavcap_hf.testing.tokenizers import word_level_tokenizer

CAPTIONS = ["a dog barks loudly while rain falls on a tin roof", "birds sing", "an engine idles"]
SAMPLING_RATE = 16000


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return word_level_tokenizer(CAPTIONS)


def make_config(fusion_type: str, tokenizer: PreTrainedTokenizerFast) -> LavCapConfig:
    config = tiny_lavcap_config(fusion_type, vocab_size=len(tokenizer))
    assert config.audio_token_id == tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    assert config.video_token_id == tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
    return config


def make_processor(fusion_type: str, tokenizer: PreTrainedTokenizerFast) -> LavCapProcessor:
    return LavCapProcessor.from_model_config(make_config(fusion_type, tokenizer), tokenizer)


def make_media(count: int, num_frames: int = 4, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`count` clips of 0.3 to 0.5 s of noise at 16 kHz and `count` uint8 videos (num_frames, 40, 56, 3)."""
    rng = np.random.default_rng(seed)
    audio = [
        (0.1 * rng.standard_normal(int(SAMPLING_RATE * (0.3 + 0.1 * (i % 3))))).astype(np.float32)
        for i in range(count)
    ]
    videos = [rng.integers(0, 256, (num_frames, 40, 56, 3), dtype=np.uint8) for _ in range(count)]
    return audio, videos


def media_kwargs(fusion_type: str, count: int) -> dict:
    """The media arguments a processor of `fusion_type` takes: no audio for visual_only, no frames for audio_only."""
    audio, videos = make_media(count)
    kwargs = {}
    if fusion_type != "visual_only":
        kwargs.update(audio=audio, sampling_rate=SAMPLING_RATE)
    if fusion_type != "audio_only":
        kwargs["videos"] = videos
    return kwargs


def expected_prompt(num_audio: int, num_video: int, instruction: str = "Please describe the audio.") -> str:
    """The prompt of docs/architecture.md (section 1), written out apart from the processor's chat template."""
    placeholders = AUDIO_TOKEN * num_audio + VIDEO_TOKEN * num_video
    return f"USER: <Speech>{placeholders}</Speech> {instruction}\nASSISTANT:"


def prompt_ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]


def word_ids(tokenizer: PreTrainedTokenizerFast, caption: str) -> list[int]:
    """Caption token ids of the word-level tokenizer: one id per space-separated word."""
    return tokenizer.convert_tokens_to_ids(caption.split())


def processor_counts(processor: LavCapProcessor) -> tuple[int, int]:
    return processor.num_audio_tokens, processor.num_video_tokens


def unpadded(row: torch.Tensor, mask: torch.Tensor) -> list[int]:
    return row[mask.bool()].tolist()


@pytest.mark.parametrize("fusion_type", FUSION_TYPES)
def test_prompt_has_the_placeholders_of_every_fusion_type(fusion_type: str, tokenizer) -> None:
    config = make_config(fusion_type, tokenizer)
    processor = LavCapProcessor.from_model_config(config, tokenizer)
    num_audio, num_video = config.placeholder_counts
    assert processor.build_prompt() == expected_prompt(num_audio, num_video)
    batch = processor(**media_kwargs(fusion_type, 2))
    reference = prompt_ids(tokenizer, expected_prompt(num_audio, num_video))
    for row in batch["input_ids"]:
        assert row.tolist() == reference
        assert (row == config.audio_token_id).sum() == num_audio
        assert (row == config.video_token_id).sum() == num_video
    assert batch["attention_mask"].bool().all()
    assert ("input_features" in batch) == config.uses_audio
    assert ("pixel_values_videos" in batch) == (fusion_type != "audio_only")
    if config.uses_audio:
        assert batch["input_features"].shape == (2, config.audio_config.target_length, 64)


@pytest.mark.parametrize("fusion_type", FUSION_TYPES)
def test_processor_outputs_train_and_generate_with_the_model(fusion_type: str, tokenizer) -> None:
    config = make_config(fusion_type, tokenizer)
    processor = LavCapProcessor.from_model_config(config, tokenizer)
    torch.manual_seed(0)
    model = LavCapForConditionalGeneration(config).eval()
    media = media_kwargs(fusion_type, 2)
    with torch.no_grad():
        out = model(**processor(**media, captions=CAPTIONS[1:]))
    assert torch.isfinite(out.loss) and out.loss > 0
    prompts = processor(**media)
    generated = model.generate(**prompts, max_new_tokens=3, do_sample=False)
    length = prompts["input_ids"].shape[1]
    assert length < generated.shape[1] <= length + 3
    assert torch.equal(generated[:, :length], prompts["input_ids"])
    assert len(processor.batch_decode(generated, prompt_length=length)) == 2


@pytest.mark.parametrize("padding_side", [None, "left", "right"])
def test_labels_are_the_caption_and_eos_only(padding_side: str | None, tokenizer) -> None:
    processor = make_processor("ot_att", tokenizer)
    side = {} if padding_side is None else {"padding_side": padding_side}
    batch = processor(**media_kwargs("ot_att", 3), captions=CAPTIONS, **side)
    prompt = prompt_ids(tokenizer, expected_prompt(*processor_counts(processor)))
    width = batch["input_ids"].shape[1]
    assert width == len(prompt) + max(len(word_ids(tokenizer, c)) for c in CAPTIONS) + 1
    for ids, mask, labels, caption in zip(
        batch["input_ids"], batch["attention_mask"], batch["labels"], CAPTIONS, strict=True
    ):
        target = [*word_ids(tokenizer, caption), tokenizer.eos_token_id]
        length = len(prompt) + len(target)
        # Padding sits on the requested side (left by default) and carries the pad id and no label.
        real = torch.zeros(width, dtype=torch.bool)
        if padding_side == "right":
            real[:length] = True
        else:
            real[width - length :] = True
        assert torch.equal(mask.bool(), real)
        assert (ids[~real] == tokenizer.pad_token_id).all()
        assert unpadded(ids, mask) == prompt + target
        # Labels: exactly the caption tokens and EOS, i.e. the last len(target) real positions.
        labelled = torch.nonzero(labels != -100).flatten()
        expected_positions = torch.nonzero(real).flatten()[len(prompt) :]
        assert torch.equal(labelled, expected_positions)
        assert labels[labelled].tolist() == target


def test_max_caption_length_truncates_the_caption_and_keeps_eos(tokenizer) -> None:
    processor = make_processor("audio_only", tokenizer)
    batch = processor(**media_kwargs("audio_only", 1), captions=CAPTIONS[0], max_caption_length=3)
    labels = batch["labels"][0]
    assert labels[labels != -100].tolist() == [*word_ids(tokenizer, CAPTIONS[0])[:3], tokenizer.eos_token_id]


def test_random_instruction_draws_from_the_training_instructions(tokenizer) -> None:
    processor = make_processor("audio_only", tokenizer)
    candidates = {
        tuple(prompt_ids(tokenizer, expected_prompt(*processor_counts(processor), i))): i
        for i in TRAINING_INSTRUCTIONS
    }
    assert len(candidates) == len(TRAINING_INSTRUCTIONS)
    rng = np.random.default_rng(0)
    audio = [rng.standard_normal(800).astype(np.float32) for _ in range(64)]

    def draw(seed: int) -> list[str]:
        batch = processor(audio=audio, sampling_rate=SAMPLING_RATE, random_instruction=True, generator=seed)
        return [
            candidates[tuple(unpadded(r, m))]
            for r, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)
        ]

    drawn = draw(0)
    # 64 draws from 8 instructions miss one with probability < 0.002; the seed makes the test deterministic.
    assert set(drawn) == set(TRAINING_INSTRUCTIONS)
    # The draws come from the caller's generator, not from the global RNG.
    random.seed(1)
    assert draw(0) == drawn and draw(1) != drawn
    default = processor(audio=audio[:2], sampling_rate=SAMPLING_RATE)
    expected = prompt_ids(tokenizer, expected_prompt(*processor_counts(processor)))
    assert all(row.tolist() == expected for row in default["input_ids"])
    chosen = processor(
        audio=audio[:2], sampling_rate=SAMPLING_RATE, instruction=list(TRAINING_INSTRUCTIONS[:2])
    )
    for row, mask, instruction in zip(
        chosen["input_ids"], chosen["attention_mask"], TRAINING_INSTRUCTIONS[:2], strict=True
    ):
        assert candidates[tuple(unpadded(row, mask))] == instruction


def test_batch_decode_strips_the_prompt(tokenizer) -> None:
    processor = make_processor("ot_att", tokenizer)
    captions = ["birds sing", "a dog barks loudly"]
    # Prompts of different lengths, so that the batch is left-padded as in generation.
    prompts = processor(**media_kwargs("ot_att", 2), instruction=list(TRAINING_INSTRUCTIONS[:2]))
    assert not prompts["attention_mask"].bool().all()
    width = max(len(word_ids(tokenizer, c)) for c in captions) + 1
    generated = torch.full((2, width), tokenizer.pad_token_id)
    for i, caption in enumerate(captions):
        new = [*word_ids(tokenizer, caption), tokenizer.eos_token_id]
        generated[i, : len(new)] = torch.tensor(new)
    sequences = torch.cat([prompts["input_ids"], generated], dim=1)
    length = prompts["input_ids"].shape[1]
    assert processor.batch_decode(sequences, prompt_length=length) == captions
    assert processor.batch_decode(sequences, caption_only=True) == captions
    assert processor.decode(sequences[1], caption_only=True) == captions[1]
    assert processor.decode(sequences[0], prompt_length=length) == captions[0]
    # Without either option, decoding is the tokenizer's: prompt and special tokens included.
    assert processor.batch_decode(sequences) == tokenizer.batch_decode(sequences)
    assert processor.decode(sequences[0], skip_special_tokens=True) == tokenizer.decode(
        sequences[0], skip_special_tokens=True
    )


def test_chat_template_renders_the_prompt(tokenizer) -> None:
    processor = make_processor("ot_att", tokenizer)
    template = jinja2.Environment().from_string(processor.chat_template)
    user = {
        "role": "user",
        "content": [
            {"type": "audio"},
            {"type": "video"},
            {"type": "text", "text": "Please describe the audio."},
        ],
    }
    assert template.render(messages=[user]) == expected_prompt(1, 1)
    answer = {"role": "assistant", "content": "birds sing"}
    assert template.render(messages=[user, answer]) == expected_prompt(1, 1) + " birds sing"
    assert processor.apply_chat_template([user], tokenize=False) == expected_prompt(1, 1)


@pytest.mark.parametrize("fusion_type", ["ot_att", "visual_only"])
def test_save_and_load_give_the_same_outputs(fusion_type: str, tokenizer, tmp_path) -> None:
    processor = make_processor(fusion_type, tokenizer)
    processor.save_pretrained(tmp_path)
    media = media_kwargs(fusion_type, 2)
    expected = processor(**media, captions=CAPTIONS[1:])
    for loaded in (LavCapProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert isinstance(loaded, LavCapProcessor)
        assert processor_counts(loaded) == processor_counts(processor)
        assert loaded.chat_template == processor.chat_template
        assert loaded.feature_extractor.to_dict() == processor.feature_extractor.to_dict()
        got = loaded(**media, captions=CAPTIONS[1:])
        assert sorted(got) == sorted(expected)
        for key in expected:
            assert torch.equal(got[key], expected[key]), key


def test_visual_only_processor_takes_videos_only(tokenizer) -> None:
    processor = make_processor("visual_only", tokenizer)
    _, videos = make_media(2)
    batch = processor(videos=videos)
    assert sorted(batch) == ["attention_mask", "input_ids", "pixel_values_videos"]
    assert batch["pixel_values_videos"].shape == (2, 4, 3, 32, 32)
    assert not (batch["input_ids"] == tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)).any()


def test_audio_only_processor_needs_no_frames(tokenizer) -> None:
    processor = make_processor("audio_only", tokenizer)
    audio, _ = make_media(2)
    batch = processor(audio=audio, sampling_rate=SAMPLING_RATE)
    assert sorted(batch) == ["attention_mask", "input_features", "input_ids"]
    assert not (batch["input_ids"] == tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)).any()


def test_video_embeds_pass_through_to_the_model(tokenizer) -> None:
    config = make_config("ot_att", tokenizer)
    processor = LavCapProcessor.from_model_config(config, tokenizer)
    audio, _ = make_media(2)
    embeds = np.random.default_rng(1).standard_normal((2, config.num_frames, config.visual_embed_dim))
    batch = processor(
        audio=audio, sampling_rate=SAMPLING_RATE, video_embeds=list(embeds), captions=CAPTIONS[1:]
    )
    assert "pixel_values_videos" not in batch
    assert batch["video_embeds"].dtype == torch.float32
    torch.testing.assert_close(batch["video_embeds"], torch.from_numpy(embeds).float())
    torch.manual_seed(0)
    assert torch.isfinite(LavCapForConditionalGeneration(config)(**batch).loss)
    single = processor(audio=audio[0], sampling_rate=SAMPLING_RATE, video_embeds=embeds[0])
    assert single["video_embeds"].shape == (1, config.num_frames, config.visual_embed_dim)


def bare_tokenizer(tokenizer: PreTrainedTokenizerFast, keep: tuple[str, ...]) -> PreTrainedTokenizerFast:
    """The word-level tokenizer without the placeholder tokens and, unless kept, without a pad token."""
    vocab = {t: i for t, i in tokenizer.get_vocab().items() if t not in (AUDIO_TOKEN, VIDEO_TOKEN)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"pad_token": "[PAD]"} if "pad" in keep else {}
    bare = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", **special)
    if "placeholders" in keep:
        bare.add_tokens([AUDIO_TOKEN, VIDEO_TOKEN], special_tokens=True)
    return bare


@pytest.mark.parametrize(
    ("keep", "message"), [(("pad",), "lacks the placeholder tokens"), (("placeholders",), "no pad token")]
)
def test_tokenizer_without_placeholders_or_pad_is_rejected(
    keep: tuple[str, ...], message: str, tokenizer
) -> None:
    feature_extractor = make_processor("ot_att", tokenizer).feature_extractor
    with pytest.raises(ValueError, match=message):
        LavCapProcessor(feature_extractor, bare_tokenizer(tokenizer, keep))


@pytest.mark.parametrize(
    ("fusion_type", "kwargs", "message"),
    [
        ("ot_att", {"captions": CAPTIONS}, "got 3 captions for 2 clips"),
        ("ot_att", {"captions": ["birds sing", ""]}, "non-empty"),
        ("ot_att", {"captions": ["birds sing", "   "]}, "non-empty"),
        ("visual_only", {"videos": None}, "nothing to process"),
        # `text` is the prompt: a caption given there (the former meaning of `text`) is named as such.
        ("ot_att", {"text": CAPTIONS[1:]}, "reference captions go in `captions`"),
        (
            "ot_att",
            {"text": [f"{AUDIO_TOKEN} a", f"{AUDIO_TOKEN} b"]},
            f"each needs one {re.escape(VIDEO_TOKEN)}",
        ),
        ("ot_att", {"text": f"{AUDIO_TOKEN}{VIDEO_TOKEN}"}, "got 1 prompts for 2 clips"),
        ("ot_att", {"text": [f"{AUDIO_TOKEN * 2}{VIDEO_TOKEN}"] * 2}, "holds 2"),
        ("ot_att", {"text": [f"{VIDEO_TOKEN}{AUDIO_TOKEN}"] * 2}, "before"),
        ("ot_att", {"text": [f"{AUDIO_TOKEN}{VIDEO_TOKEN}"] * 2, "instruction": "x"}, "either `text` or"),
        ("ot_att", {"videos": [[np.zeros((4, 8, 8, 3), np.uint8)] * 2, []]}, r"got \[2, 0\] videos per"),
        ("ot_att", {"videos": None, "video_embeds": np.zeros((2, 4, 32, 1))}, "video_embeds must be"),
        ("ot_att", {"videos": None, "video_embeds": np.zeros(32)}, "video_embeds must be"),
        ("ot_att", {"videos": None, "video_embeds": np.zeros((2, 3, 32))}, "num_frames=4"),
        ("ot_att", {"videos": None, "video_embeds": np.zeros((3, 4, 32))}, "3 entries in video_embeds for 2"),
        ("ot_att", {"videos": None, "video_embeds": np.full((2, 4, 32), np.nan)}, "NaN"),
    ],
)
def test_bad_inputs_raise_clear_errors(fusion_type: str, kwargs: dict, message: str, tokenizer) -> None:
    processor = make_processor(fusion_type, tokenizer)
    arguments = {**media_kwargs(fusion_type, 2), **kwargs}
    with pytest.raises(ValueError, match=message):
        processor(**arguments)


def test_processing_kwargs_flat_and_per_modality_give_the_same_batch(tokenizer) -> None:
    processor = make_processor("ot_att", tokenizer)
    media = media_kwargs("ot_att", 2)
    rate = media.pop("sampling_rate")
    flat = processor(**media, captions=CAPTIONS[1:], sampling_rate=rate, padding="max_length", max_length=64)
    nested = processor(
        **media,
        captions=CAPTIONS[1:],
        text_kwargs={"padding": "max_length", "max_length": 64},
        audio_kwargs={"sampling_rate": rate},
    )
    assert flat["input_ids"].shape == (2, 64)
    for key in flat:
        assert torch.equal(flat[key], nested[key]), key
    longest = processor(**media, captions=CAPTIONS[1:], sampling_rate=rate)
    assert longest["input_ids"].shape[1] < 64
    assert torch.equal(
        flat["input_ids"][:, -longest["input_ids"].shape[1] :], longest["input_ids"]
    )  # left pads
    with pytest.raises(ValueError, match="passed two times"):
        processor(**media, sampling_rate=rate, padding="longest", text_kwargs={"padding": "max_length"})


def test_a_prompt_longer_than_max_length_is_an_error_not_a_cut(tokenizer) -> None:
    processor = make_processor("ot_att", tokenizer)
    with pytest.raises(ValueError, match="more than max_length=10"):
        processor(**media_kwargs("ot_att", 1), padding="max_length", max_length=10)


def test_sampling_rate_defaults_to_the_feature_extractors(tokenizer) -> None:
    processor = make_processor("audio_only", tokenizer)
    audio, _ = make_media(1)
    assert processor.feature_extractor.sampling_rate == SAMPLING_RATE
    given = processor(audio=audio, sampling_rate=SAMPLING_RATE)
    default = processor(audio=audio)
    assert torch.equal(given["input_features"], default["input_features"])
    with pytest.raises(ValueError, match="sampling_rate must be positive whole Hz, got 0"):
        processor(audio=audio, sampling_rate=0)


@pytest.mark.parametrize("fusion_type", FUSION_TYPES)
def test_num_multimodal_tokens_match_the_placeholders_of_the_prompt(fusion_type: str, tokenizer) -> None:
    processor = make_processor(fusion_type, tokenizer)
    batch = processor(**media_kwargs(fusion_type, 3))
    counts = processor._get_num_multimodal_tokens(
        audio_lengths=[8000, 16000, 6000], video_sizes=[(40, 56)] * 3
    )
    audio_id, video_id = tokenizer.convert_tokens_to_ids([AUDIO_TOKEN, VIDEO_TOKEN])
    assert counts["num_audio_tokens"] == (batch["input_ids"] == audio_id).sum(-1).tolist()
    assert counts["num_video_tokens"] == (batch["input_ids"] == video_id).sum(-1).tolist()
    assert sum(counts["num_audio_tokens"] + counts["num_video_tokens"]) == 3 * sum(
        make_config(fusion_type, tokenizer).placeholder_counts
    )


def test_chat_template_json_of_older_folders_is_read(tokenizer, tmp_path) -> None:
    processor = make_processor("ot_att", tokenizer)
    processor.save_pretrained(tmp_path)
    template = processor.chat_template.replace("ASSISTANT:", "ANSWER:")
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    loaded = LavCapProcessor.from_pretrained(tmp_path)
    assert loaded.chat_template == template
    assert loaded.build_prompt().endswith("ANSWER:")


def test_named_chat_templates_are_saved_and_loaded(tokenizer, tmp_path) -> None:
    processor = make_processor("ot_att", tokenizer)
    default = processor.chat_template
    processor.chat_template = {"default": default, "short": "{{ messages[0]['role'] }}"}
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "additional_chat_templates" / "short.jinja").read_text() == "{{ messages[0]['role'] }}"
    loaded = LavCapProcessor.from_pretrained(tmp_path)
    assert loaded.chat_template == processor.chat_template
    assert loaded.build_prompt() == make_processor("ot_att", tokenizer).build_prompt()  # the default one


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".."])
def test_chat_template_names_that_are_not_file_names_are_refused(name: str, tokenizer, tmp_path) -> None:
    processor = make_processor("ot_att", tokenizer)
    processor.chat_template = {"default": processor.chat_template, name: "x"}
    with pytest.raises(ValueError, match="plain file names"):
        processor.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists() and not list(tmp_path.rglob("*.jinja"))


def test_images_are_refused(tokenizer) -> None:
    processor = make_processor("ot_att", tokenizer)
    with pytest.raises(ValueError, match="pass the clip's frames as `videos`"):
        processor(**media_kwargs("ot_att", 1), images=[np.zeros((8, 8, 3), np.uint8)])


# -- the prompt as `text`, chat templates, one modality at a time ---------------------------------------------


def conversation(audio: np.ndarray, video: np.ndarray, instruction: str) -> list[dict]:
    """One user turn with the clip's audio, its frames and an instruction, as a chat-template user writes it."""
    content = [{"type": "audio", "audio": audio}, {"type": "video", "video": video}]
    return [{"role": "user", "content": [*content, {"type": "text", "text": instruction}]}]


def chat_templates_take_audio_arrays() -> bool:
    """Whether `apply_chat_template` can take an audio entry holding an array here: transformers 4.55's
    `load_audio` requires librosa even for arrays, 5.x returns arrays as they are."""
    from transformers.audio_utils import load_audio

    try:
        load_audio(np.zeros(160, np.float32), sampling_rate=SAMPLING_RATE)
    except ImportError:
        return False
    return True


def assert_same_batch(got, expected) -> None:
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(expected[key])), key


def test_text_is_the_prompt_with_one_placeholder_per_clip(tokenizer) -> None:
    """The chat template's prompt as `text` gives what the processor's own prompt gives, captions and labels too."""
    processor = make_processor("ot_att", tokenizer)
    media = media_kwargs("ot_att", 2)
    instructions = list(TRAINING_INSTRUCTIONS[:2])
    prompts = [expected_prompt(1, 1, instruction) for instruction in instructions]
    assert_same_batch(processor(text=prompts, **media), processor(**media, instruction=instructions))
    assert_same_batch(
        processor(text=prompts, captions=CAPTIONS[1:], **media),
        processor(**media, instruction=instructions, captions=CAPTIONS[1:]),
    )
    expanded = processor(text=prompts, **media)["input_ids"]
    assert ((expanded == processor.audio_token_id).sum(-1) == processor.num_audio_tokens).all()
    assert ((expanded == processor.video_token_id).sum(-1) == processor.num_video_tokens).all()


@pytest.mark.parametrize("batch_size", [1, 2])
def test_apply_chat_template_builds_inputs_that_generate_takes(batch_size: int, tokenizer) -> None:
    """`apply_chat_template(tokenize=True, return_dict=True)` on conversations with an audio and a video entry: the
    library renders each prompt and hands the media to the processor (the videos one list per conversation); the
    result is the processor's own batch, and `generate()` captions from it."""
    if not chat_templates_take_audio_arrays():
        pytest.skip(
            "this transformers loads every audio entry of a conversation with librosa, which is not installed"
        )
    config = make_config("ot_att", tokenizer)
    processor = LavCapProcessor.from_model_config(config, tokenizer)
    audio, videos = make_media(batch_size)
    instructions = list(TRAINING_INSTRUCTIONS[:batch_size])
    conversations = [conversation(*clip) for clip in zip(audio, videos, instructions, strict=True)]
    inputs = processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    expected = processor(audio=audio, sampling_rate=SAMPLING_RATE, videos=videos, instruction=instructions)
    assert_same_batch(inputs, expected)
    torch.manual_seed(0)
    model = LavCapForConditionalGeneration(config).eval()
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        reference = model.generate(**expected, max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, reference)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


def test_apply_chat_template_builds_a_visual_only_models_inputs(tokenizer) -> None:
    """The chat-template path with video entries only (no audio to load, so on every transformers): a
    `visual_only` model's batch, which `generate()` takes."""
    config = make_config("visual_only", tokenizer)
    processor = LavCapProcessor.from_model_config(config, tokenizer)
    _, videos = make_media(2)
    instructions = list(TRAINING_INSTRUCTIONS[:2])
    conversations = [
        [{"role": "user", "content": [{"type": "video", "video": v}, {"type": "text", "text": i}]}]
        for v, i in zip(videos, instructions, strict=True)
    ]
    inputs = processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    expected = processor(videos=videos, instruction=instructions)
    assert_same_batch(inputs, expected)
    torch.manual_seed(0)
    model = LavCapForConditionalGeneration(config).eval()
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, model.generate(**expected, max_new_tokens=3, do_sample=False))


def test_each_modality_alone_is_prepared_and_the_model_names_what_it_lacks(tokenizer) -> None:
    """An audio-visual model's processor takes audio alone, frames alone or a text-only prompt; the model, not the
    processor, refuses a forward without the frames it needs."""
    config = make_config("ot_att", tokenizer)
    processor = LavCapProcessor.from_model_config(config, tokenizer)
    audio, videos = make_media(2)
    both = processor(audio=audio, sampling_rate=SAMPLING_RATE, videos=videos)
    audio_alone = processor(audio=audio, sampling_rate=SAMPLING_RATE)
    assert sorted(audio_alone) == ["attention_mask", "input_features", "input_ids"]
    assert torch.equal(audio_alone["input_features"], both["input_features"])
    assert torch.equal(audio_alone["input_ids"], both["input_ids"])  # the model's prompt, all placeholders
    frames_alone = processor(videos=videos)
    assert sorted(frames_alone) == ["attention_mask", "input_ids", "pixel_values_videos"]
    assert torch.equal(frames_alone["pixel_values_videos"], both["pixel_values_videos"])
    text_alone = processor(text="USER: birds sing\nASSISTANT:")
    assert sorted(text_alone) == ["attention_mask", "input_ids"]
    assert text_alone["input_ids"][0].tolist() == prompt_ids(tokenizer, "USER: birds sing\nASSISTANT:")
    torch.manual_seed(0)
    model = LavCapForConditionalGeneration(config).eval()
    with pytest.raises(ValueError, match="pixel_values_videos"):
        model(**audio_alone)
    with pytest.raises(ValueError, match="input_features"):
        model(**frames_alone)


def test_channels_first_frames_give_the_same_pixels(tokenizer) -> None:
    processor = make_processor("ot_att", tokenizer)
    audio, videos = make_media(2)
    last = processor(audio=audio, sampling_rate=SAMPLING_RATE, videos=videos)
    first = processor(
        audio=audio, sampling_rate=SAMPLING_RATE, videos=[v.transpose(0, 3, 1, 2) for v in videos]
    )
    assert torch.equal(first["pixel_values_videos"], last["pixel_values_videos"])
    batched = processor(
        audio=audio, sampling_rate=SAMPLING_RATE, videos=np.stack(videos).transpose(0, 1, 4, 2, 3)
    )
    assert torch.equal(batched["pixel_values_videos"], last["pixel_values_videos"])


def test_offsets_map_every_token_to_its_prompt_characters(tokenizer) -> None:
    """`return_offsets_mapping`: the span in the prompt of each token; all tokens of a placeholder span it."""
    processor = make_processor("ot_att", tokenizer)
    media = media_kwargs("ot_att", 2)
    prompts = [expected_prompt(1, 1, instruction) for instruction in TRAINING_INSTRUCTIONS[:2]]
    batch = processor(text=prompts, **media, return_offsets_mapping=True, padding_side="right")
    for prompt, ids, mask, offsets in zip(
        prompts, batch["input_ids"], batch["attention_mask"], batch["offset_mapping"], strict=True
    ):
        real = mask.bool()
        assert offsets[~real].eq(0).all() and offsets[0].tolist() == [0, 0]  # padding and BOS
        for token_id, (start, end) in zip(ids[real][1:].tolist(), offsets[real][1:].tolist(), strict=True):
            text = prompt[start:end]
            if token_id in (processor.audio_token_id, processor.video_token_id):
                assert text == tokenizer.convert_ids_to_tokens(token_id)
            else:
                assert tokenizer.convert_tokens_to_ids(text) == token_id


# -- loading from folders, subfolders and the Hub -------------------------------------------------------------


def save_with_named_template(folder, tokenizer, fusion_type: str = "concat") -> LavCapProcessor:
    """A processor with a named chat template beside its default one, saved in `folder`."""
    processor = make_processor(fusion_type, tokenizer)
    processor.chat_template = {"default": processor.chat_template, "short": "{{ messages[0]['role'] }}"}
    processor.save_pretrained(folder)
    return processor


def save_two_processors(root, tokenizer) -> LavCapProcessor:
    """A `concat` processor with a named chat template saved in `root/captioner`, and an `audio_only` processor with
    another default template and no named one at `root`: reading the root instead of the subfolder gives other
    counts and templates. (The root holds no named template: transformers' own `AutoProcessor` lists those of the
    root whatever the subfolder, and fails on one the subfolder lacks.)"""
    captioner = save_with_named_template(root / "captioner", tokenizer)
    other = make_processor("audio_only", tokenizer)
    other.chat_template = other.chat_template.replace("ASSISTANT:", "A:")
    other.save_pretrained(root)
    assert processor_counts(other) != processor_counts(captioner)
    return captioner


def loaded_summary(processor: LavCapProcessor) -> dict:
    """What a loaded processor read from its files."""
    return {
        "counts": list(processor_counts(processor)),
        "chat_template": processor.chat_template,
        "feature_extractor": processor.feature_extractor.to_dict(),
        "vocab": len(processor.tokenizer),
    }


def test_subfolder_is_honoured_for_every_processor_file(tokenizer, tmp_path) -> None:
    captioner = save_two_processors(tmp_path, tokenizer)
    expected = loaded_summary(captioner)
    for loader in (LavCapProcessor, AutoProcessor):
        loaded = loader.from_pretrained(tmp_path, subfolder="captioner")
        assert loaded_summary(loaded) == expected, loader.__name__


def test_a_missing_processor_config_is_an_error_not_a_default(tokenizer, tmp_path) -> None:
    """Without `processor_config.json` the placeholder counts are unknown: loading names the missing file instead of
    falling back to the paper's 64 / 20 (which a tiny or `audio_only` model cannot take)."""
    save_two_processors(tmp_path, tokenizer)
    (tmp_path / "captioner" / "processor_config.json").unlink()
    with pytest.raises(OSError, match=r"captioner/processor_config\.json of .* not found"):
        LavCapProcessor.from_pretrained(tmp_path, subfolder="captioner")
    (tmp_path / "processor_config.json").unlink()
    with pytest.raises(OSError, match=r"processor_config\.json of .* not found"):
        LavCapProcessor.from_pretrained(tmp_path)


HUB_LOAD = """
import json, sys
import lavcap_hf
from transformers import AutoProcessor, AutoTokenizer

results = {}
# The repo with named templates is read with a tokenizer of another repo: loading the repo's own tokenizer also
# fetches the templates (as the tokenizer's), which would hide whether the processor reads them. (And transformers
# 4.55's AutoProcessor cannot read named templates from the Hub: its listing keeps the ".jinja" it appends again.)
tokenizer = AutoTokenizer.from_pretrained("someone/tokenizer")
for name, loader, repo, kwargs in (
    ("subfolder", AutoProcessor, "someone/two-models", {"subfolder": "captioner"}),
    ("named", lavcap_hf.LavCapProcessor, "someone/named-templates", {"tokenizer": tokenizer}),
):
    processor = loader.from_pretrained(repo, **kwargs)
    results[name] = {
        "counts": [processor.num_audio_tokens, processor.num_video_tokens],
        "chat_template": processor.chat_template,
        "feature_extractor": processor.feature_extractor.to_dict(),
        "vocab": len(processor.tokenizer),
    }
try:  # (AutoProcessor returns the tokenizer of a folder without processor_config.json, as for any model)
    lavcap_hf.LavCapProcessor.from_pretrained("someone/two-models", subfolder="incomplete")
    results["missing"] = None
except OSError as error:
    results["missing"] = str(error)
print(json.dumps(results))
"""


HUB_LOAD_OFFLINE = """
import json
from transformers import AutoTokenizer
from lavcap_hf import LavCapProcessor

tokenizer = AutoTokenizer.from_pretrained("someone/tokenizer")
processor = LavCapProcessor.from_pretrained("someone/named-templates", tokenizer=tokenizer)
print(json.dumps(processor.chat_template))
"""


@pytest.fixture(scope="module")
def from_the_hub(tokenizer, tmp_path_factory) -> dict:
    """Processors loaded from Hub repos, with what was saved there and the requests the Hub got.

    The Hub's servers cannot run here: `fake_hub.FakeHub` serves the repos over HTTP in their place, and the loading
    runs in a process whose `huggingface_hub` is pointed at it, downloads and cache as from the Hub.
    """
    root = tmp_path_factory.mktemp("hub")
    hub_root = root / "hub" / "someone"
    captioner = save_two_processors(hub_root / "two-models", tokenizer)
    named = save_with_named_template(hub_root / "named-templates", tokenizer, "ot_att")
    tokenizer.save_pretrained(hub_root / "tokenizer")
    save_with_named_template(hub_root / "two-models" / "incomplete", tokenizer)
    (hub_root / "two-models" / "incomplete" / "processor_config.json").unlink()
    with FakeHub(root / "hub") as hub:
        result = subprocess.run(
            [sys.executable, "-c", HUB_LOAD],
            capture_output=True,
            text=True,
            env=hub.environment(root / "cache"),
            timeout=300,
        )
    assert result.returncode == 0, result.stderr[-3000:]
    # Once downloaded, the same repos load offline, named templates listed in the cache.
    offline = subprocess.run(
        [sys.executable, "-c", HUB_LOAD_OFFLINE],
        capture_output=True,
        text=True,
        env={**hub.environment(root / "cache"), "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert offline.returncode == 0, offline.stderr[-3000:]
    return {
        "loaded": json.loads(result.stdout.splitlines()[-1]),
        "offline": json.loads(offline.stdout.splitlines()[-1]),
        "saved": {
            name: json.loads(json.dumps(loaded_summary(p)))
            for name, p in (("subfolder", captioner), ("named", named))
        },
        "requests": hub.requests,
    }


@pytest.mark.integration
def test_every_file_of_a_subfolder_loads_from_the_hub(from_the_hub) -> None:
    assert from_the_hub["loaded"]["subfolder"] == from_the_hub["saved"]["subfolder"]
    assert any(
        path.endswith("/captioner/additional_chat_templates/short.jinja")
        for _, path in from_the_hub["requests"]
    )


@pytest.mark.integration
def test_named_chat_templates_load_from_the_hub(from_the_hub) -> None:
    """The templates of `additional_chat_templates/` are listed in the repo and downloaded, not looked for beside the
    one downloaded `chat_template.jinja` (where they never are)."""
    loaded = from_the_hub["loaded"]["named"]
    assert sorted(loaded["chat_template"]) == ["default", "short"]
    assert loaded == from_the_hub["saved"]["named"]


@pytest.mark.integration
def test_named_chat_templates_load_offline_from_the_cache(from_the_hub) -> None:
    assert from_the_hub["offline"] == from_the_hub["saved"]["named"]["chat_template"]


@pytest.mark.integration
def test_a_processor_config_missing_on_the_hub_is_an_error(from_the_hub) -> None:
    assert (
        "incomplete/processor_config.json of someone/two-models not found"
        in from_the_hub["loaded"]["missing"]
    )
