"""Decoding audio and frames from media files with PyAV.

Decoded audio is resampled by the feature extractor's `resample`, the one resampler, so a clip gets the same features
as a file and as an array."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import av
import numpy as np
from PIL import Image, UnidentifiedImageError

from .feature_extraction_lavcap import resample

VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv"}
)
AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".wma"})
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
# Files that carry sound and so can be captioned; a CLI expands folders to these.
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS | AUDIO_EXTENSIONS


class MediaError(ValueError):
    """A media file cannot be used; the message starts with the file's path and names the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass
class DecodedMedia:
    """Decoded content of one media file.

    Attributes:
        path: the file.
        audio: float32 mono waveform (samples,) at `sampling_rate`, None when audio was not asked for.
        sampling_rate: rate of `audio` in Hz.
        frames: uint8 RGB frames (num_frames, H, W, 3) sampled uniformly over the clip, None when frames were
            not asked for.
        duration: length of the clip in seconds (longest of the decoded streams; 0.0 for a still image).
    """

    path: str
    audio: np.ndarray | None
    sampling_rate: int
    frames: np.ndarray | None
    duration: float


def load_image_frames(path: str | os.PathLike, num_frames: int) -> np.ndarray:
    """Load a still image with Pillow and repeat it as a clip: uint8 RGB (num_frames, H, W, 3)."""
    path = os.fspath(path)
    _check_file(path)
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as error:
        raise MediaError(path, f"not a readable image ({error})") from error
    return np.repeat(pixels[None], num_frames, axis=0)


def load_media(
    path: str | os.PathLike,
    sampling_rate: int = 16000,
    num_frames: int = 20,
    need_audio: bool = True,
    need_frames: bool = True,
    frame_spans: Sequence[tuple[float, float]] | None = None,
) -> DecodedMedia:
    """Decode a media file: mono audio at `sampling_rate` and `num_frames` frames spread over the clip.

    Audio: the first audio stream, channels averaged to mono, resampled as the feature extractor resamples arrays
    (`resample`), float32 (samples,).
    Frames: the first video stream; the clip is cut into `num_frames` equal segments and the frame shown at
    the centre of each is taken (a short video repeats frames), uint8 RGB (num_frames, H, W, 3).
    With `frame_spans`, (start, end) times in seconds, each span is sampled that way instead of the whole clip
    (times past the end give the last frame) and `frames` holds the spans one after the other,
    (len(frame_spans) * num_frames, H, W, 3); the pipeline uses this to caption consecutive windows.
    Image files (`IMAGE_EXTENSIONS`) give a still clip through `load_image_frames` and have no audio.

    Raises:
        MediaError: missing or unreadable file, corrupt data, a needed stream that is absent, empty audio,
            non-finite samples.
    """
    path = os.fspath(path)
    if sampling_rate <= 0 or num_frames <= 0:
        raise ValueError(f"sampling_rate and num_frames must be positive, got {sampling_rate}, {num_frames}")
    if frame_spans is not None and (not frame_spans or any(end < start for start, end in frame_spans)):
        raise ValueError(f"frame_spans must be (start, end) pairs with start <= end, got {frame_spans}")
    _check_file(path)
    if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS:
        if need_audio:
            raise MediaError(path, "no audio stream (it is an image)")
        count = num_frames * (len(frame_spans) if frame_spans is not None else 1)
        frames = load_image_frames(path, count) if need_frames else None
        return DecodedMedia(path, None, sampling_rate, frames, 0.0)
    try:
        return _decode(path, sampling_rate, num_frames, need_audio, need_frames, frame_spans)
    except av.error.FFmpegError as error:
        # FFmpeg's own words only: str(error) adds "[Errno 1094995529]" and the path, which the message starts with.
        raise MediaError(
            path, f"not a readable media file or corrupt data ({error.strerror or error})"
        ) from error


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise MediaError(path, "file not found")
    if not os.path.isfile(path):
        raise MediaError(path, "not a regular file")


def _decode(
    path: str,
    sampling_rate: int,
    num_frames: int,
    need_audio: bool,
    need_frames: bool,
    frame_spans: Sequence[tuple[float, float]] | None,
) -> DecodedMedia:
    audio = frames = None
    durations = []
    with av.open(path) as container:
        has_audio, has_video = bool(container.streams.audio), bool(container.streams.video)
        container_duration = container.duration / av.time_base if container.duration is not None else 0.0
    if need_audio:
        if not has_audio:
            raise MediaError(path, "no audio stream")
        audio = _decode_audio(path, sampling_rate)
        durations.append(audio.shape[0] / sampling_rate)
    if need_frames:
        if not has_video:
            raise MediaError(path, "no video stream")
        frames, video_duration = _decode_frames(path, num_frames, frame_spans)
        durations.append(video_duration)
    duration = max(durations) if durations else container_duration
    return DecodedMedia(path, audio, sampling_rate, frames, duration)


def _decode_audio(path: str, sampling_rate: int) -> np.ndarray:
    """First audio stream -> float32 mono (samples,) at `sampling_rate`: decoded at the stream's own rate, channels
    averaged, then resampled by `resample`, the resampler the feature extractor applies to arrays."""
    chunks, rate = [], None
    with av.open(path) as container:
        for frame in container.decode(container.streams.audio[0]):
            if rate is None:
                # Float samples at the stream's rate; FFmpeg filters only a frame whose rate changes mid-stream.
                rate = frame.sample_rate
                converter = av.AudioResampler(format="fltp", rate=rate)
            chunks.extend(out.to_ndarray() for out in converter.resample(frame))
    if rate is not None:
        chunks.extend(out.to_ndarray() for out in converter.resample(None))
    # Planar chunks are (channels, n); the channel count may change mid-stream, so average each on its own.
    audio = np.concatenate([chunk.mean(axis=0, dtype=np.float64) for chunk in chunks] or [np.zeros(0)])
    if audio.size == 0:
        raise MediaError(path, "audio stream is empty (zero samples)")
    if not np.isfinite(audio).all():
        raise MediaError(path, "audio contains NaN or infinite samples")
    return resample(audio, rate, sampling_rate).astype(np.float32)


def _frame_times(path: str) -> tuple[np.ndarray, float]:
    """Presentation times (seconds, sorted, first at 0) of the first video stream's frames, and its duration.

    Only packets are read (no decoding), so this is cheap even for long clips.
    """
    stamps, last_duration = [], 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            if packet.size == 0:  # flush packet
                continue
            stamps.append(packet.pts if packet.pts is not None else packet.dts)
            last_duration = packet.duration or last_duration
        frame_period = 1.0 / float(stream.average_rate or stream.guessed_rate or 25)
        time_base = float(stream.time_base) if stream.time_base else None
    if not stamps:
        raise MediaError(path, "video stream has no frames")
    if time_base is None or any(stamp is None for stamp in stamps):
        times = np.arange(len(stamps)) * frame_period
    else:
        times = np.sort(np.asarray(stamps, dtype=np.float64)) * time_base
        frame_period = last_duration * time_base if last_duration else frame_period
    times -= times[0]
    return times, float(times[-1] + frame_period)


def _decode_frames(
    path: str, num_frames: int, frame_spans: Sequence[tuple[float, float]] | None = None
) -> tuple[np.ndarray, float]:
    """`num_frames` uint8 RGB frames (num_frames, H, W, 3): the frame on screen at the centre of each of
    `num_frames` equal segments of the clip, or of each span in `frame_spans` (then (spans * num_frames, H, W, 3)).
    Returns the frames and the video duration in seconds."""
    times, duration = _frame_times(path)
    spans = frame_spans if frame_spans is not None else [(0.0, duration)]
    centres = np.arange(num_frames) + 0.5
    targets = np.concatenate([start + centres * (end - start) / num_frames for start, end in spans])
    indices = np.clip(np.searchsorted(times, targets, side="right") - 1, 0, len(times) - 1)
    wanted, last, decoded = set(indices.tolist()), indices.max(), {}
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                decoded[index] = frame.to_ndarray(format="rgb24")
            if index >= last:
                break
    if not decoded:
        raise MediaError(path, "no decodable video frames")
    # A frame that failed to decode is replaced by the nearest one that did.
    available = np.asarray(sorted(decoded))
    nearest = available[np.abs(available[None, :] - indices[:, None]).argmin(axis=1)]
    return np.stack([decoded[index] for index in nearest.tolist()]), duration
