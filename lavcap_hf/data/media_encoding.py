"""Writing audio and video files with PyAV, for synthetic clips, the web demo's examples and tests: the first codec
this machine's FFmpeg can encode of each kind, per container."""

from __future__ import annotations

import os
from fractions import Fraction

import av
import numpy as np

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
