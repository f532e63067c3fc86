"""Decoding real media files written with PyAV: shapes, rates, frame sampling, and every MediaError case."""

from __future__ import annotations

import wave

import numpy as np
import pytest
from PIL import Image

from lavcap_hf.data.media_encoding import write_media
from lavcap_hf.model.media_decoding import (
    MEDIA_EXTENSIONS,
    DecodedMedia,
    MediaError,
    load_image_frames,
    load_media,
)

TONE_HZ = 440.0
NUM_VIDEO_FRAMES = 30
FPS = 30.0


def dominant_frequency(audio: np.ndarray, sampling_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(audio.shape[0])))
    return float(np.argmax(spectrum) * sampling_rate / audio.shape[0])


def centre_indices(total: int, count: int) -> np.ndarray:
    """Index of the frame on screen at the centre of each of `count` equal segments of `total` frames."""
    return np.array([int((i + 0.5) * total / count) for i in range(count)])


@pytest.mark.parametrize(
    ("extension", "video_codec", "audio_codec", "duration_tolerance"),
    [
        ("mp4", None, None, 0.05),  # H.264 + AAC; AAC pads the last frame
        ("mp4", "mpeg4", "aac", 0.05),
        ("mkv", None, None, 0.05),
        ("webm", None, None, 0.05),  # VP9 + Opus
        ("avi", None, None, 0.001),  # H.264 + PCM
    ],
)
def test_video_file_round_trip(
    tmp_path,
    make_sine,
    indexed_frames,
    read_frame_indices,
    extension,
    video_codec,
    audio_codec,
    duration_tolerance,
):
    path = tmp_path / f"clip.{extension}"
    audio = make_sine(TONE_HZ, NUM_VIDEO_FRAMES / FPS, 44100, channels=2)
    write_media(path, indexed_frames(NUM_VIDEO_FRAMES), FPS, audio, 44100, video_codec, audio_codec)

    media = load_media(path, sampling_rate=16000, num_frames=20)

    assert isinstance(media, DecodedMedia)
    assert media.path == str(path)
    assert media.sampling_rate == 16000
    assert media.audio.dtype == np.float32 and media.audio.ndim == 1
    assert abs(media.audio.shape[0] / 16000 - 1.0) <= duration_tolerance
    assert abs(media.duration - 1.0) <= duration_tolerance
    assert abs(dominant_frequency(media.audio, 16000) - TONE_HZ) < 2.0
    # Both channels carry the same 0.5-amplitude tone, so the mono mix keeps that amplitude.
    assert abs(np.abs(media.audio[1000:-1000]).max() - 0.5) < 0.05
    assert media.frames.shape == (20, 48, 64, 3) and media.frames.dtype == np.uint8
    np.testing.assert_array_equal(read_frame_indices(media.frames), centre_indices(NUM_VIDEO_FRAMES, 20))


def test_short_video_repeats_frames(tmp_path, indexed_frames, read_frame_indices):
    path = tmp_path / "short.mp4"
    write_media(path, indexed_frames(5), 5.0, None, 16000)
    frames = load_media(path, num_frames=20, need_audio=False).frames
    np.testing.assert_array_equal(read_frame_indices(frames), centre_indices(5, 20))


def test_odd_frame_size_is_padded_to_even(tmp_path, indexed_frames):
    path = tmp_path / "odd.mp4"
    write_media(path, indexed_frames(4, height=33, width=47), 4.0, None, 16000)
    assert load_media(path, num_frames=2, need_audio=False).frames.shape == (2, 34, 48, 3)


@pytest.mark.parametrize(
    ("extension", "duration_tolerance"), [("wav", 1e-4), ("flac", 1e-4), ("mp3", 0.08), ("ogg", 0.02)]
)
def test_audio_file(tmp_path, make_sine, extension, duration_tolerance):
    path = tmp_path / f"tone.{extension}"
    write_media(path, None, 0.0, make_sine(TONE_HZ, 1.0, 22050), 22050)
    media = load_media(path, need_frames=False)
    assert media.frames is None
    assert abs(media.duration - 1.0) <= duration_tolerance
    assert abs(media.audio.shape[0] - 16000) <= duration_tolerance * 16000
    assert abs(dominant_frequency(media.audio, 16000) - TONE_HZ) < 2.0


def test_audio_can_be_skipped(tmp_path, indexed_frames):
    path = tmp_path / "silent.mp4"
    write_media(path, indexed_frames(6), 6.0, None, 16000)
    media = load_media(path, num_frames=3, need_audio=False)
    assert media.audio is None and media.frames.shape[0] == 3
    assert abs(media.duration - 1.0) < 1e-6


def test_image_as_still_clip(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = tmp_path / "still.png"
    Image.fromarray(pixels).save(path)
    frames = load_image_frames(path, 4)
    assert frames.shape == (4, 5, 7, 3)
    np.testing.assert_array_equal(frames, np.broadcast_to(pixels, (4, 5, 7, 3)))
    np.testing.assert_array_equal(load_media(path, num_frames=4, need_audio=False).frames, frames)


def test_media_extensions_cover_sound_files():
    assert {".mp4", ".mkv", ".webm", ".avi", ".wav", ".flac", ".mp3", ".ogg"} <= MEDIA_EXTENSIONS
    assert ".png" not in MEDIA_EXTENSIONS


def _write_empty_wav(path):
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(16000)


def _write_wav_with(value):
    def write(path):
        audio = np.zeros(1600, dtype=np.float32)
        audio[100] = value
        write_media(path, None, 0.0, audio, 16000, audio_codec="pcm_f32le")

    return write


def _write_truncated_mp4(path):
    full = path.with_name("full.mp4")
    write_media(full, np.zeros((10, 16, 16, 3), np.uint8), 10.0, np.zeros(16000, np.float32), 16000)
    data = full.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("name", "write", "kwargs", "problem"),
    [
        ("missing.mp4", None, {}, "file not found"),
        ("text.mp4", lambda path: path.write_text("not a video"), {}, "not a readable media file"),
        ("truncated.mp4", _write_truncated_mp4, {}, "corrupt"),
        (
            "silent.mp4",
            lambda path: write_media(path, np.zeros((4, 16, 16, 3), np.uint8), 4.0, None, 0),
            {},
            "no audio stream",
        ),
        (
            "tone.wav",
            lambda path: write_media(path, None, 0.0, np.zeros(1600, np.float32), 16000),
            {},
            "no video stream",
        ),
        ("empty.wav", _write_empty_wav, {"need_frames": False}, "empty"),
        ("nan.wav", _write_wav_with(np.nan), {"need_frames": False}, "NaN or infinite"),
        ("inf.wav", _write_wav_with(np.inf), {"need_frames": False}, "NaN or infinite"),
        ("still.png", lambda path: Image.new("RGB", (4, 4)).save(path), {}, "no audio stream"),
        (
            "broken.png",
            lambda path: path.write_text("not an image"),
            {"need_audio": False},
            "not a readable image",
        ),
    ],
)
def test_media_errors_name_file_and_problem(tmp_path, name, write, kwargs, problem):
    path = tmp_path / name
    if write is not None:
        write(path)
    with pytest.raises(MediaError, match=problem) as error:
        load_media(path, **kwargs)
    assert str(error.value).startswith(str(path))
    assert isinstance(error.value, ValueError)


def test_directory_is_not_media(tmp_path):
    with pytest.raises(MediaError, match="not a regular file"):
        load_media(tmp_path)


def test_write_media_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="nothing to write"):
        write_media(tmp_path / "x.mp4", None, 10.0, None, 16000)
    with pytest.raises(ValueError, match=r"uint8 \(F, H, W, 3\)"):
        write_media(tmp_path / "x.mp4", np.zeros((2, 8, 8), np.uint8), 10.0, None, 16000)


def test_a_clip_gets_the_same_features_as_a_file_and_as_an_array(tmp_path, make_sine):
    """One resampler: a 44.1 kHz stereo file decoded to 16 kHz, and the same samples given to the feature extractor
    as an array at 44.1 kHz, give the same fbank (up to float32 rounding)."""
    from lavcap_hf import LavCapFeatureExtractor

    rate = 44100
    rng = np.random.default_rng(0)
    audio = make_sine(1003.0, 1.3, rate, channels=2) + 0.05 * rng.standard_normal((int(1.3 * rate), 2))
    samples = np.round(np.clip(audio, -1, 1) * 32767).astype(np.int16)  # what the .wav stores, exactly
    path = tmp_path / "clip.wav"
    with wave.open(str(path), "wb") as file:
        file.setnchannels(2)
        file.setsampwidth(2)
        file.setframerate(rate)
        file.writeframes(samples.tobytes())
    extractor = LavCapFeatureExtractor()
    decoded = load_media(path, sampling_rate=extractor.sampling_rate, need_frames=False)

    from_file = extractor(decoded.audio, sampling_rate=decoded.sampling_rate)["input_features"]
    from_array = extractor(samples, sampling_rate=rate)["input_features"]
    np.testing.assert_allclose(from_file, from_array, atol=1e-4, rtol=0)


def test_decoding_keeps_the_top_of_the_band(tmp_path, make_sine):
    """A 7.5 kHz tone in a 44.1 kHz file is still at full amplitude at 16 kHz: the 7-8 kHz band that the top mel
    bins cover is kept (FFmpeg's default resampler filter halves it, which is why files use the FFT resampler)."""
    path = tmp_path / "tone.wav"
    write_media(path, None, 0.0, make_sine(7500.0, 1.0, 44100), 44100)
    audio = load_media(path, sampling_rate=16000, need_frames=False).audio
    interior = audio[800:-800]  # away from the ends, where the periodic treatment rings
    assert np.sqrt(2) * interior.std() == pytest.approx(0.5, rel=0.01)
    assert dominant_frequency(audio, 16000) == pytest.approx(7500.0, abs=5.0)
