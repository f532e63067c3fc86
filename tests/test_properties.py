"""Property-based tests (hypothesis) of the processor and pipeline inputs, and of long clips.

Each property draws the parameters of a case (length, rate, channels, dtype, signal, fault) and synthesises the
arrays with numpy from a drawn seed. An oracle written here from the documented input contract says whether the
case is valid or which problem its ValueError must name; the test checks that every case does exactly that and
that no valid case gives NaN features or breaks the model. `event()` labels each example's outcome
(`pytest --hypothesis-show-statistics` prints the counts).
"""

from __future__ import annotations

import logging
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from transformers import pipeline

from lavcap_hf import LavCapFeatureExtractor, LavCapForConditionalGeneration, LavCapProcessor
from lavcap_hf.data.media_encoding import write_media
from lavcap_hf.model.media_decoding import load_media
from lavcap_hf.model.pipeline_lavcap import TASK
from lavcap_hf.testing.configs import tiny_lavcap_config
from lavcap_hf.testing.tokenizers import word_level_tokenizer

RATE = 16000  # the model's rate
HOP, WINDOW = 160, 400  # fbank hop and frame length in samples at 16 kHz (10 ms, 25 ms)
MEAN, STD = -4.346, 4.332  # the extractor's default normalisation
LOG_FLOOR = math.log(np.finfo(np.float32).eps)
NUM_FRAMES, IMAGE_SIZE = 4, 32
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
MAX_CHANNELS = 8
MAX_AMPLITUDE = 2.0**31
CAPTIONS = ["a dog barks", "rain falls on a roof"]

# No deadline: an example's cost grows with its clip (up to a minute of 48 kHz 5.1 audio). Health checks stay on:
# the strategies draw parameters only, the arrays are synthesised inside the tests.
PROPERTY = {"deadline": None}


# -- audio cases ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AudioCase:
    """Parameters of one audio input; `array()` synthesises it."""

    seconds: float
    rate: int
    channels: int
    dtype: str
    signal: str
    channels_first: bool
    seed: int

    def array(self) -> np.ndarray:
        samples = int(self.seconds * self.rate)
        rng = np.random.default_rng(self.seed)
        # One second of noise tiled: as good as fresh noise for featurising, and fast for minute-long clips.
        block = rng.standard_normal((min(samples, self.rate), self.channels)).astype(np.float32)
        noise = np.resize(block, (samples, self.channels)) if samples else block[:0]
        signals = {
            "noise": lambda: 0.3 * noise,
            "silence": lambda: np.zeros_like(noise),
            "dc": lambda: np.full_like(noise, rng.uniform(-0.9, 0.9)),
            "dc_noise": lambda: rng.uniform(-0.8, 0.8) + 0.1 * noise,
            "clipped": lambda: np.clip(4.0 * noise, -1.0, 1.0),
            "nan": lambda: self._poke(0.3 * noise, np.nan, rng),
            "inf": lambda: self._poke(0.3 * noise, rng.choice([np.inf, -np.inf]), rng),
            "huge": lambda: (1e200 if self.dtype == "float64" else 1e30) * noise.astype(self.dtype),
        }
        wave = signals[self.signal]()
        if self.dtype in ("int16", "int32"):
            full_scale = np.iinfo(self.dtype).max
            wave = np.clip(np.round(wave.astype(np.float64) * full_scale), -full_scale - 1, full_scale)
        wave = wave.astype(self.dtype)
        if self.channels == 1:
            return wave[:, 0]
        return np.ascontiguousarray(wave.T) if self.channels_first else wave

    @staticmethod
    def _poke(wave: np.ndarray, value: float, rng: np.random.Generator) -> np.ndarray:
        if wave.size:
            wave.flat[rng.integers(wave.size)] = value
        return wave


CLEAN_SIGNALS = ("noise", "silence", "dc", "dc_noise", "clipped")
FLOAT_SIGNALS = (*CLEAN_SIGNALS, "nan", "inf", "huge")  # only floats can hold these


@st.composite
def audio_cases(draw, max_seconds: float = 60.0, faults: bool = True) -> AudioCase:
    """Any audio input, or with `faults=False` only valid ones (clean signals, channels last, >= 30 ms)."""
    # Length ranges drawn evenly (hypothesis favours small numbers within one range): around the one-fbank-frame
    # minimum, within the 10.24 s window, then every 10 s up to a minute.
    ranges = [(0.0, 0.1), (0.1, 10.24), (10.24, 20.0), (20.0, 30.0), (30.0, 40.0), (40.0, 50.0), (50.0, 60.0)]
    low, high = draw(st.sampled_from([(lo, min(hi, max_seconds)) for lo, hi in ranges if lo < max_seconds]))
    seconds = draw(st.floats(low if faults else max(low, 0.03), high))
    dtype = draw(st.sampled_from(["int16", "int32", "float32", "float64"]))
    channels = draw(st.sampled_from([1, 2, 6]))
    signals = FLOAT_SIGNALS if faults and dtype.startswith("float") else CLEAN_SIGNALS
    return AudioCase(
        seconds=seconds,
        rate=draw(st.integers(8000, 48000)),
        channels=channels,
        dtype=dtype,
        signal=draw(st.sampled_from(signals)),
        channels_first=faults and channels > 1 and draw(st.sampled_from([False] * 4 + [True])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def resampled_length(samples: int, rate: int) -> int:
    return -(-samples * RATE // rate)


def fbank_frames(samples_16k: int) -> int:
    """Kaldi fbank frames (snip_edges) of a 16 kHz waveform."""
    return 0 if samples_16k < WINDOW else 1 + (samples_16k - WINDOW) // HOP


def audio_problem(audio: np.ndarray, rate: int) -> str | None:
    """The problem a ValueError must name for this audio, from the documented contract; None when it is valid."""
    if audio.ndim == 2 and not 1 <= audio.shape[1] <= MAX_CHANNELS:
        return "at most 8 channels"
    if audio.ndim not in (1, 2):
        return "must be (samples,) or (samples, channels)"
    if audio.shape[0] == 0:
        return "empty"
    if not np.isfinite(audio).all():
        return "NaN or infinite"
    mono = audio.astype(np.float64)
    mono = mono.mean(axis=1) if mono.ndim == 2 else mono
    if audio.dtype.kind == "f" and np.abs(mono).max() > MAX_AMPLITUDE:
        return "out of range"
    if resampled_length(audio.shape[0], rate) < WINDOW:
        return "shorter than one 400-sample fbank frame"
    return None


@contextmanager
def captured_warnings():
    """Warnings logged by the feature extractor, as a list of messages."""
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger(LavCapFeatureExtractor.__module__)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


# -- frame cases ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameCase:
    shape: tuple[int, ...]
    dtype: str
    pattern: str
    seed: int

    def array(self) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        if self.pattern == "constant":
            return np.full(self.shape, rng.integers(0, 256), dtype=self.dtype)
        if self.pattern == "extremes":
            return (rng.integers(0, 2, self.shape) * 255).astype(self.dtype)
        return rng.integers(0, 256, self.shape).astype(self.dtype)


@st.composite
def frame_cases(draw, faults: bool = True) -> FrameCase:
    """Mostly one video (F, H, W, C); also channels-first, grayscale, batched, empty and non-uint8 arrays.
    With `faults=False`, valid videos only."""
    if not faults:
        shape = (NUM_FRAMES, draw(st.integers(1, 40)), draw(st.integers(1, 40)), 3)
        pattern = draw(st.sampled_from(["random", "constant", "extremes"]))
        return FrameCase(shape, "uint8", pattern, draw(st.integers(0, 2**32 - 1)))
    frames = draw(st.sampled_from([NUM_FRAMES] * 6 + [0, 1, 3, 5]))
    height, width = draw(st.integers(0, 40)), draw(st.integers(0, 40))
    layout = draw(st.sampled_from(["last"] * 4 + ["first", "gray", "rgba", "batch", "empty_batch"]))
    shape = {
        "last": (frames, height, width, 3),
        "first": (frames, 3, height, width),
        "gray": (frames, height, width),
        "rgba": (frames, height, width, 4),
        "batch": (draw(st.integers(1, 2)), frames, height, width, 3),
        "empty_batch": (0, frames, height, width, 3),
    }[layout]
    dtype = draw(st.sampled_from(["uint8"] * 6 + ["float32", "int16", "bool"]))
    pattern = draw(st.sampled_from(["random", "constant", "extremes"]))
    return FrameCase(shape, dtype, pattern, draw(st.integers(0, 2**32 - 1)))


def frames_problem(frames: np.ndarray) -> str | None:
    """The problem a ValueError must name for the frames of one clip; None when they are valid."""
    if frames.ndim not in (4, 5):
        return "videos must be one uint8 RGB video"
    videos = [frames] if frames.ndim == 4 else list(frames)
    if not videos:
        return "no videos given"
    if len(videos) != 1:
        return f"got {len(videos)} videos for 1 audio clips"
    video = videos[0]
    if video.shape[-1] != 3 and video.shape[1] == 3:  # channels-first
        video = video.transpose(0, 2, 3, 1)
    if video.shape[-1] != 3 or video.dtype != np.uint8:
        return "uint8 RGB"
    if video.shape[0] != NUM_FRAMES:
        return f"num_frames={NUM_FRAMES}"
    if 0 in video.shape[1:3]:
        return "must not be empty"
    return None


def check_pixels(pixels: torch.Tensor, frames: np.ndarray, pattern: str) -> None:
    """CLIP-normalised pixels of valid frames: shape, finite, within the range of normalised [0, 1] values."""
    assert pixels.shape == (1, NUM_FRAMES, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert pixels.dtype == torch.float32 and torch.isfinite(pixels).all()
    low = torch.from_numpy((0 - CLIP_MEAN) / CLIP_STD).view(3, 1, 1)
    high = torch.from_numpy((1 - CLIP_MEAN) / CLIP_STD).view(3, 1, 1)
    assert (pixels[0] >= low - 1e-5).all() and (pixels[0] <= high + 1e-5).all()
    if pattern == "constant":
        # Resizing and cropping a flat image keeps it flat.
        expected = torch.from_numpy((frames.reshape(-1)[0] / 255.0 - CLIP_MEAN) / CLIP_STD).view(3, 1, 1)
        torch.testing.assert_close(pixels[0], expected.float().expand_as(pixels[0]), atol=1e-5, rtol=0)


# -- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return word_level_tokenizer(CAPTIONS)


@pytest.fixture(scope="module")
def processor(tokenizer) -> LavCapProcessor:
    """The paper's audio window (1024 fbank frames, 10.24 s) with 4 small frames per clip."""
    extractor = LavCapFeatureExtractor(num_frames=NUM_FRAMES, image_size=IMAGE_SIZE)
    return LavCapProcessor(extractor, tokenizer, num_audio_tokens=64, num_video_tokens=NUM_FRAMES)


@pytest.fixture(scope="module")
def tiny(tokenizer) -> tuple[LavCapForConditionalGeneration, LavCapProcessor]:
    """A tiny random ot_att model (audio window 128 fbank frames, 1.28 s) and its processor."""
    config = tiny_lavcap_config(
        "ot_att", vocab_size=len(tokenizer), num_frames=NUM_FRAMES, image_size=IMAGE_SIZE
    )
    torch.manual_seed(0)
    model = LavCapForConditionalGeneration(config).eval()
    return model, LavCapProcessor.from_model_config(config, tokenizer)


@pytest.fixture(scope="module")
def captioner(tiny):
    model, processor = tiny
    return pipeline(TASK, model=model, processor=processor)


def valid_video(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (NUM_FRAMES, 24, 30, 3), dtype=np.uint8)


# -- processor properties --------------------------------------------------------------------------------------


@settings(max_examples=45, **PROPERTY)
@given(case=audio_cases())
@example(case=AudioCase(60.0, 48000, 6, "int32", "noise", False, 1))
@example(case=AudioCase(60.0, 44100, 2, "float32", "clipped", False, 2))
@example(case=AudioCase(10.24, 8000, 1, "int16", "silence", False, 3))
@example(case=AudioCase(0.0, 22050, 2, "float64", "noise", False, 4))
@example(case=AudioCase(0.024, 16000, 1, "float32", "dc", False, 5))
@example(case=AudioCase(0.025, 16000, 1, "float32", "dc", False, 5))
@example(case=AudioCase(2.0, 32000, 6, "float64", "nan", False, 6))
@example(case=AudioCase(2.0, 11025, 1, "float32", "inf", False, 7))
@example(case=AudioCase(1.0, 48000, 2, "float64", "huge", False, 8))
@example(case=AudioCase(1.0, 48000, 2, "float32", "noise", True, 9))
def test_processor_audio_gives_valid_inputs_or_a_named_error(processor, case: AudioCase) -> None:
    audio = case.array()
    problem = audio_problem(audio, case.rate)
    event(f"{case.seconds // 10 * 10:.0f}-{case.seconds // 10 * 10 + 10:.0f} s")
    with captured_warnings() as warnings:
        try:
            batch = processor(audio=audio, sampling_rate=case.rate, videos=valid_video())
        except ValueError as error:
            event(f"ValueError: {problem}")
            assert problem is not None, f"valid audio rejected: {error}"
            assert re.search(re.escape(problem), str(error)), (problem, str(error))
            return
    event("valid" if problem is None else "accepted although invalid")
    assert problem is None, f"expected a ValueError naming {problem!r}"
    features = batch["input_features"]
    assert features.shape == (1, 1024, 64) and features.dtype == torch.float32
    assert torch.isfinite(features).all()
    full_length = fbank_frames(resampled_length(audio.shape[0], case.rate))
    frames = min(full_length, 1024)
    # The clip's fbank frames, then padding that holds the normalised zero.
    padding = features[0] == float(np.float32((0.0 - MEAN) / STD))
    assert padding.all(dim=1).tolist() == [False] * frames + [True] * (1024 - frames)
    # Longer clips are truncated to the window, with a warning that names the way to caption all of it.
    truncation = [w for w in warnings if "truncated" in w]
    assert len(truncation) == (full_length > 1024)
    if truncation:
        assert "split_windows" in truncation[0] and 'long_audio="windows"' in truncation[0]
    if case.signal == "silence" or (case.signal == "dc" and case.rate == RATE and not case.channels_first):
        # No signal but DC: every real frame is the log floor, the DC offset is removed.
        torch.testing.assert_close(
            features[0, :frames], torch.full((frames, 64), (LOG_FLOOR - MEAN) / STD), atol=1e-5, rtol=0
        )


@settings(max_examples=40, **PROPERTY)
@given(
    rate=st.one_of(
        st.integers(-100, 48000),
        st.integers(8000, 48000).map(float),
        st.floats(-1e5, 1e5),
        st.sampled_from([math.nan, math.inf, 44100.5]),
        st.integers(8000, 48000).map(np.int64),
        st.sampled_from([True, "16000", b"16000", [16000]]),
    )
)
def test_sampling_rate_must_be_positive_whole_hz(processor, rate) -> None:
    whole = (
        isinstance(rate, (int, np.integer, float)) and not isinstance(rate, bool) and float(rate).is_integer()
    )
    valid = whole and rate > 0
    samples = max(1, int(0.05 * rate)) if valid else 1600  # 50 ms: at least one fbank frame at any rate
    audio = 0.3 * np.random.default_rng(0).standard_normal(samples).astype(np.float32)
    if not valid:
        event(f"ValueError: {type(rate).__name__}")
        with pytest.raises(ValueError, match="sampling_rate must be positive whole Hz"):
            processor.feature_extractor(audio, sampling_rate=rate)
        return
    event(f"valid {type(rate).__name__}")
    features = processor.feature_extractor(audio, sampling_rate=rate)["input_features"]
    reference = processor.feature_extractor(audio, sampling_rate=int(rate))["input_features"]
    np.testing.assert_array_equal(features, reference)


@settings(max_examples=15, **PROPERTY)
@given(
    seconds=st.floats(0.05, 3.0),
    rate=st.integers(8000, 48000),
    offset=st.floats(-100.0, 100.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_a_dc_offset_does_not_change_the_features(processor, seconds, rate, offset, seed) -> None:
    audio = 0.3 * np.random.default_rng(seed).standard_normal(int(seconds * rate))
    extractor = processor.feature_extractor
    plain = extractor(audio, sampling_rate=rate)["input_features"]
    shifted = extractor(audio + offset, sampling_rate=rate)["input_features"]
    np.testing.assert_allclose(shifted, plain, atol=1e-3, rtol=0)


@settings(max_examples=60, **PROPERTY)
@given(case=frame_cases())
@example(case=FrameCase((NUM_FRAMES, 3, 24, 30), "uint8", "random", 0))  # channels first
@example(case=FrameCase((NUM_FRAMES, 24, 30), "uint8", "random", 0))  # grayscale
@example(case=FrameCase((NUM_FRAMES, 0, 30, 3), "uint8", "random", 0))  # no pixels
@example(case=FrameCase((NUM_FRAMES, 24, 30, 3), "float32", "random", 0))  # floats
@example(case=FrameCase((NUM_FRAMES, 1, 1, 3), "uint8", "constant", 0))  # one pixel
@example(case=FrameCase((NUM_FRAMES, 40, 7, 3), "uint8", "extremes", 0))  # tall and narrow
def test_processor_frames_give_valid_pixels_or_a_named_error(processor, case: FrameCase) -> None:
    frames = case.array()
    problem = frames_problem(frames)
    audio = np.zeros(1600, np.float32)
    try:
        batch = processor(audio=audio, sampling_rate=RATE, videos=frames)
    except ValueError as error:
        event(f"ValueError: {problem}")
        assert problem is not None, f"valid frames rejected: {error}"
        assert problem in str(error), (problem, str(error))
        return
    event("valid" if problem is None else "accepted although invalid")
    assert problem is None, f"expected a ValueError naming {problem!r}"
    check_pixels(batch["pixel_values_videos"], frames, case.pattern)


@settings(max_examples=40, **PROPERTY)
@given(caption=st.one_of(st.just(""), st.text(" \t\n\r", max_size=4), st.text(max_size=40)))
@example(caption="a dog barks")
@example(caption="\u3000")  # ideographic space: blank
@example(caption="\u200b")  # zero-width space: not blank
def test_captions_give_labels_or_a_named_error(processor, tokenizer, caption: str) -> None:
    audio = np.zeros(1600, np.float32)
    media = {"audio": audio, "sampling_rate": RATE, "videos": valid_video()}
    if not caption.strip():
        event("blank caption")
        with pytest.raises(ValueError, match="non-empty"):
            processor(**media, captions=caption)
        return
    event("caption")
    batch = processor(**media, captions=caption)
    prompt = processor(**media)["input_ids"][0].tolist()
    target = tokenizer(" " + caption.strip(), add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    assert batch["input_ids"][0].tolist() == prompt + target
    assert batch["labels"][0].tolist() == [-100] * len(prompt) + target


# -- long clips ------------------------------------------------------------------------------------------------


@settings(max_examples=8, **PROPERTY)
@given(seconds=st.floats(0.03, 60.0), rate=st.sampled_from([8000, 16000, 22050, 44100, 48000]))
@example(seconds=20.48, rate=16000)  # exactly two windows
@example(seconds=20.50495, rate=16000)  # a tail 399 samples long: too short for a third window's frame
def test_split_windows_tile_the_whole_clip(processor, seconds: float, rate: int) -> None:
    """Consecutive windows carry every fbank frame of the clip once, each exactly as the whole clip's fbank has it."""
    extractor = processor.feature_extractor
    audio = 0.3 * np.random.default_rng(0).standard_normal(int(seconds * rate)).astype(np.float32)
    windows = extractor.split_windows(audio, rate)
    out = extractor(windows, sampling_rate=RATE)
    padding = (extractor.padding_value - extractor.mean) / extractor.std
    counts = (np.abs(out["input_features"] - padding) > 1e-6).any(axis=2).sum(axis=1)  # frames not padding
    total = fbank_frames(resampled_length(len(audio), rate))
    event(f"{len(windows)} windows")
    assert len(windows) == -(-total // 1024)
    assert counts.tolist() == [1024] * (len(windows) - 1) + [total - 1024 * (len(windows) - 1)]
    whole_extractor = LavCapFeatureExtractor(max_length=max(total, 1))
    whole = whole_extractor(audio, sampling_rate=rate)["input_features"][0]
    for index, count in enumerate(counts):
        np.testing.assert_allclose(
            out["input_features"][index, :count],
            whole[1024 * index : 1024 * index + count],
            atol=2e-3,
            rtol=0,
        )


def test_media_samples_frames_per_span(tmp_path, indexed_frames, read_frame_indices) -> None:
    """`load_media(frame_spans=...)`: for each (start, end) the frames at the centres of equal parts of the span."""
    fps, count = 10, 40
    path = tmp_path / "indexed.mp4"
    write_media(path, indexed_frames(count), fps, None, RATE)
    # Frame centres fall mid-frame (never on a frame boundary); the last span runs past the end of the video.
    spans = [(0.0, 1.2), (1.2, 2.4), (2.4, 3.6), (3.6, 4.0), (3.5, 9.0)]
    frames = load_media(path, num_frames=NUM_FRAMES, need_audio=False, frame_spans=spans).frames
    assert frames.shape[0] == len(spans) * NUM_FRAMES
    expected = [
        min(int((start + (i + 0.5) * (end - start) / NUM_FRAMES) * fps), count - 1)
        for start, end in spans
        for i in range(NUM_FRAMES)
    ]
    assert read_frame_indices(frames).tolist() == expected
    with pytest.raises(ValueError, match="frame_spans"):
        load_media(path, need_audio=False, frame_spans=[(2.0, 1.0)])


def reference_caption(model, processor, audio, rate, frames=None, video_embeds=None) -> str:
    """Greedy 3-token caption of one clip with `model.generate`, decoded after the prompt."""
    inputs = processor(audio=audio, sampling_rate=rate, videos=frames, video_embeds=video_embeds)
    with torch.no_grad():
        sequences = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    return processor.batch_decode(sequences, prompt_length=inputs["input_ids"].shape[1])[0]


def reference_plan(model, processor, audio, rate, frames) -> np.ndarray:
    """OT plan (V, A) of one clip: it depends on every frame, where a 3-token caption of a tiny model may not."""
    inputs = processor(audio=audio, sampling_rate=rate, videos=frames)
    with torch.no_grad():
        return model.get_multimodal_features(
            inputs["input_features"], inputs["pixel_values_videos"], output_ot_plan=True
        ).ot_plan[0]


def test_pipeline_truncates_long_audio_with_a_warning_by_default(tiny, captioner) -> None:
    model, processor = tiny
    audio = 0.3 * np.random.default_rng(1).standard_normal(int(3.0 * RATE)).astype(np.float32)
    inputs = {"audio": audio, "sampling_rate": RATE, "frames": valid_video(1)}
    with captured_warnings() as warnings:
        result = captioner(inputs, max_new_tokens=3)
    assert any("truncated" in w for w in warnings)
    # The first 1.28 s window is what the model hears.
    window = audio[: processor.feature_extractor.window_stride + WINDOW - HOP]
    assert result == [{"caption": reference_caption(model, processor, window, RATE, valid_video(1))}]
    assert captioner(inputs, max_new_tokens=3, long_audio="truncate") == result


def test_pipeline_captions_consecutive_windows_of_a_dict_input(tiny, captioner) -> None:
    model, processor = tiny
    rate = 44100
    audio = 0.3 * np.random.default_rng(2).standard_normal((int(3.0 * rate), 2)).astype(np.float32)
    embeds = np.random.default_rng(3).standard_normal((NUM_FRAMES, 32)).astype(np.float32)
    inputs = {"audio": audio, "sampling_rate": rate, "video_embeds": embeds}
    results = captioner(inputs, max_new_tokens=3, long_audio="windows")
    # 1.28 s windows: [0, 1.28), [1.28, 2.56), [2.56, 3.0).
    np.testing.assert_allclose([r["timestamp"] for r in results], [(0.0, 1.28), (1.28, 2.56), (2.56, 3.0)])
    windows = processor.feature_extractor.split_windows(audio, rate)
    for result, window in zip(results, windows, strict=True):
        assert result["caption"] == reference_caption(model, processor, window, RATE, video_embeds=embeds)


def test_pipeline_captions_consecutive_windows_of_a_file_with_their_frames(
    tiny, captioner, tmp_path, indexed_frames
) -> None:
    model, processor = tiny
    fps, rate = 10, 22050
    audio = 0.3 * np.random.default_rng(4).standard_normal(int(3.0 * rate)).astype(np.float32)
    path = tmp_path / "long.mp4"
    write_media(path, indexed_frames(30), fps, audio, rate)
    results = captioner(str(path), max_new_tokens=3, long_audio="windows", return_ot_plan=True)
    decoded = load_media(path, need_frames=False).audio
    windows = processor.feature_extractor.split_windows(decoded, RATE)
    assert len(results) == len(windows) == 3
    spans = [r["timestamp"] for r in results]
    np.testing.assert_allclose(spans, [(0.0, 1.28), (1.28, 2.56), (2.56, len(decoded) / RATE)])
    frames = load_media(path, num_frames=NUM_FRAMES, need_audio=False, frame_spans=spans).frames
    for index, (result, window) in enumerate(zip(results, windows, strict=True)):
        window_frames = frames[index * NUM_FRAMES : (index + 1) * NUM_FRAMES]
        assert result["caption"] == reference_caption(model, processor, window, RATE, window_frames)
        expected_plan = reference_plan(model, processor, window, RATE, window_frames).numpy()
        np.testing.assert_allclose(result["ot_plan"], expected_plan, atol=1e-6, rtol=1e-4)
    # Batched calls give the same windows.
    assert (
        captioner([str(path)] * 2, batch_size=2, max_new_tokens=3, long_audio="windows")
        == [[{k: v for k, v in r.items() if k != "ot_plan"} for r in results]] * 2
    )


def test_pipeline_rejects_an_unknown_long_audio_mode(captioner) -> None:
    with pytest.raises(ValueError, match="long_audio must be one of"):
        captioner({"audio": np.zeros(RATE), "sampling_rate": RATE}, long_audio="split")


# -- pipeline inputs -------------------------------------------------------------------------------------------


@st.composite
def pipeline_inputs(draw) -> tuple[object, str | None, str]:
    """(input, problem the ValueError must name or None, label): a valid dict, or one fault of one kind."""
    fault = draw(
        st.sampled_from(
            ["audio", "visual", "none", "audio", "visual", "none", "none"]
            + ["not a dict", "unknown key", "no audio", "no rate", "no visual"]
        )
    )
    if fault == "not a dict":
        value = draw(st.sampled_from([3, None, 1.5, [0.0] * 10]))
        return value, "inputs must be a file path or a dict", fault
    case = draw(audio_cases(max_seconds=4.0, faults=fault == "audio"))
    audio = case.array()
    inputs: dict[str, object] = {"audio": audio, "sampling_rate": case.rate}
    visual = draw(st.sampled_from(["frames", "embeds"]))
    if visual == "frames":
        frame_case = draw(frame_cases(faults=fault == "visual"))
        inputs["frames"] = frame_case.array()
        visual_problem = frames_problem(inputs["frames"])
    else:
        good_shape, good_values = [(NUM_FRAMES, 32)], ["normal", "zeros", "huge"]
        bad_shapes, bad_values = (
            ([(NUM_FRAMES + 1, 32), (NUM_FRAMES, 16)], ["nan", "inf"]) if fault == "visual" else ([], [])
        )
        shape = draw(st.sampled_from(good_shape + bad_shapes))
        values = draw(st.sampled_from(good_values + bad_values))
        embeds = {
            "normal": np.random.default_rng(case.seed).standard_normal(shape),
            "zeros": np.zeros(shape),
            "huge": np.full(shape, 1e30),
            "nan": np.full(shape, np.nan),
            "inf": np.full(shape, -np.inf),
        }[values]
        inputs["video_embeds"] = embeds.astype(np.float32)
        visual_problem = (
            f"num_frames={NUM_FRAMES}"
            if shape[0] != NUM_FRAMES
            else "NaN or infinite"
            if values in ("nan", "inf")
            else "video_embeds must have shape (batch, frames, 32)"
            if shape[1] != 32
            else None
        )
    if fault == "unknown key":
        inputs["video"] = inputs.pop("frames" if visual == "frames" else "video_embeds")
        return inputs, "unknown input keys ['video']", fault
    if fault == "no audio":
        del inputs["audio"]
        return inputs, "give the input's `audio`", fault
    if fault == "no rate":
        del inputs["sampling_rate"]
        return inputs, "sampling_rate is required", fault
    if fault == "no visual":
        inputs.pop("frames", None)
        inputs.pop("video_embeds", None)
        return inputs, "give the input's `frames`", fault
    return inputs, audio_problem(audio, case.rate) or visual_problem, f"{fault} fault, {visual}"


def example_input(audio: AudioCase, visual: str, problem: str | None, label: str) -> tuple:
    """A fixed `pipeline_inputs` value: `visual` is "frames", "float frames" or "zero embeds"."""
    inputs: dict[str, object] = {"audio": audio.array(), "sampling_rate": audio.rate}
    if visual == "zero embeds":
        inputs["video_embeds"] = np.zeros((NUM_FRAMES, 32), np.float32)
    else:
        inputs["frames"] = valid_video().astype(np.float32 if visual == "float frames" else np.uint8)
    return inputs, problem, label


@settings(max_examples=50, **PROPERTY)
@given(drawn=pipeline_inputs())
@example(drawn=example_input(AudioCase(2.0, 48000, 6, "int32", "clipped", False, 0), "frames", None, "5.1"))
@example(
    drawn=example_input(AudioCase(1.0, 8000, 1, "int16", "silence", False, 0), "zero embeds", None, "zeros")
)
@example(drawn=example_input(AudioCase(1.0, 16000, 2, "float32", "nan", False, 0), "frames", "NaN", "NaN"))
@example(
    drawn=example_input(
        AudioCase(1.0, 16000, 1, "float32", "noise", False, 0), "float frames", "uint8", "float"
    )
)
@example(drawn=(None, "inputs must be a file path or a dict", "None"))
def test_pipeline_inputs_give_a_caption_or_a_named_error(tiny, captioner, drawn) -> None:
    inputs, problem, label = drawn
    try:
        results = captioner(inputs, max_new_tokens=2, return_ot_plan=True)
    except ValueError as error:
        event(f"{label}: ValueError")
        assert problem is not None, f"valid input rejected: {error}"
        assert problem in str(error), (problem, str(error))
        return
    event(f"{label}: caption")
    assert problem is None, f"expected a ValueError naming {problem!r}"
    assert len(results) == 1 and isinstance(results[0]["caption"], str)
    # Any valid input, silent, clipped or with all-zero frame embeddings, gives a finite plan with its marginals.
    plan = results[0]["ot_plan"]
    audio_tokens = tiny[0].config.num_audio_tokens
    assert plan.shape == (NUM_FRAMES, audio_tokens) and np.isfinite(plan).all()
    np.testing.assert_allclose(plan.sum(axis=0), 1 / audio_tokens, atol=1e-5, rtol=0)
    np.testing.assert_allclose(plan.sum(axis=1), 1 / NUM_FRAMES, atol=1e-5, rtol=0)
