"""Decode (and, for tests and demos, encode) audio and video files with PyAV.

Decoded audio is resampled by the feature extractor's `resample`, the one resampler, so a clip gets the same features
as a file and as an array."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

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


# Default audio encoder per container (file extension); the first one this PyAV build has is used.
_AUDIO_CODECS = {
    ".mp4": ("aac",),
    ".m4a": ("aac",),
    ".mov": ("aac",),
    ".mkv": ("aac", "libopus", "pcm_s16le"),
    ".webm": ("libopus", "libvorbis"),
    ".ogg": ("libopus", "libvorbis"),
    ".opus": ("libopus",),
    ".wav": ("pcm_s16le",),
    ".avi": ("pcm_s16le",),
    ".flac": ("flac",),
    ".mp3": ("libmp3lame", "mp3"),
}
# Default video encoder per container; "libx264" falls back to "mpeg4" where x264 is not built in.
_VIDEO_CODECS = {".webm": ("libvpx-vp9", "libvpx")}
_DEFAULT_VIDEO_CODECS = ("libx264", "mpeg4")
# Opus only runs at these rates; other inputs are resampled to 48 kHz by the encoder.
_OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


def _has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except Exception:  # PyAV raises different errors for unknown and decode-only codecs
        return False
    return True


def _pick_encoder(candidates: tuple[str, ...], kind: str, path: str) -> str:
    for name in candidates:
        if _has_encoder(name):
            return name
    raise ValueError(f"{path}: this PyAV build has no {kind} encoder among {candidates}")


def _pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Repeat the last row / column so that H and W are even, as yuv420p requires."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


def _add_video_stream(container, frames: np.ndarray, fps: float, codec: str):
    stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
    stream.height, stream.width = frames.shape[1], frames.shape[2]
    stream.pix_fmt = "yuv420p"
    if codec == "libx264":
        # x264's C code, not its SIMD: on AVX-512 machines the same frames gave different streams depending on
        # what the process had done before (an AVX-512 routine reads memory it never wrote), so synthesised
        # clips were not reproducible. x264's SIMD is bit-exact with its C code elsewhere, so these bytes are
        # what any machine writes.
        stream.options = {"x264-params": "asm=0"}
    return stream


def _add_audio_stream(container, audio: np.ndarray, sampling_rate: int, codec: str):
    rate = sampling_rate if codec != "libopus" or sampling_rate in _OPUS_RATES else 48000
    layout = av.AudioLayout(f"{audio.shape[1]}c").name  # FFmpeg's default layout for that many channels
    return container.add_stream(codec, rate=rate, layout=layout)


def _encode_audio(container, stream, audio: np.ndarray, sampling_rate: int) -> None:
    layout = stream.codec_context.layout.name
    block = 1024
    for start in range(0, audio.shape[0], block):
        chunk = np.ascontiguousarray(audio[start : start + block].T, dtype=np.float32)  # planar (C, n)
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
        frame.sample_rate = sampling_rate
        frame.pts = start
        frame.time_base = Fraction(1, sampling_rate)
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def _encode_video(container, stream, frames: np.ndarray) -> None:
    for index, image in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame.pts = index
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def write_media(
    path: str | os.PathLike,
    frames: np.ndarray | None,
    fps: float,
    audio: np.ndarray | None,
    sampling_rate: int,
    video_codec: str | None = None,
    audio_codec: str | None = None,
) -> None:
    """Write a real media file (video and/or audio stream) with PyAV, mainly to synthesise test clips.

    Args:
        path: output file; the extension picks the container (`.mp4`, `.mkv`, `.webm`, `.avi`, `.wav`,
            `.flac`, `.mp3`, `.ogg`, ...).
        frames: uint8 RGB frames (F, H, W, 3) or None for an audio-only file. Odd H or W is padded by one
            repeated edge row / column, because yuv420p needs even sizes.
        fps: frame rate of `frames`.
        audio: float waveform in [-1, 1], (samples,) mono or (samples, channels); None for a silent video.
        sampling_rate: rate of `audio` in Hz. Opus streams are resampled to 48 kHz by the encoder when the
            rate is not one Opus supports.
        video_codec: encoder name; None picks libx264 (mpeg4 where x264 is missing), VP9/VP8 for `.webm`.
        audio_codec: encoder name; None picks by container: aac (mp4/mkv), libopus (webm/ogg),
            pcm_s16le (wav/avi), flac, libmp3lame (mp3).
    """
    path = os.fspath(path)
    if frames is None and audio is None:
        raise ValueError(f"{path}: nothing to write, both frames and audio are None")
    if frames is not None:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"{path}: frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
        if fps <= 0:
            raise ValueError(f"{path}: fps must be positive, got {fps}")
        frames = _pad_to_even(frames)
    if audio is not None:
        audio = np.asarray(audio, dtype=np.float32)
        audio = audio[:, None] if audio.ndim == 1 else audio
        if audio.ndim != 2 or audio.shape[0] == 0:
            raise ValueError(f"{path}: audio must be (samples,) or (samples, channels), got {audio.shape}")
    extension = os.path.splitext(path)[1].lower()
    with av.open(path, mode="w") as container:
        video_stream = audio_stream = None
        if frames is not None:
            if video_codec is None:
                codecs = _VIDEO_CODECS.get(extension, _DEFAULT_VIDEO_CODECS)
            elif video_codec == _DEFAULT_VIDEO_CODECS[0]:
                codecs = _DEFAULT_VIDEO_CODECS
            else:
                codecs = (video_codec,)
            video_stream = _add_video_stream(container, frames, fps, _pick_encoder(codecs, "video", path))
        if audio is not None:
            codecs = (audio_codec,) if audio_codec else _AUDIO_CODECS.get(extension, ("aac",))
            codec = _pick_encoder(codecs, "audio", path)
            audio_stream = _add_audio_stream(container, audio, sampling_rate, codec)
        if video_stream is not None:
            _encode_video(container, video_stream, frames)
        if audio_stream is not None:
            _encode_audio(container, audio_stream, audio, sampling_rate)


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
