"""Feature extractor for LAVCap: kaldi log-mel fbank of the audio and CLIP preprocessing of the frames."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image
from transformers.audio_utils import mel_filter_bank
from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor
from transformers.feature_extraction_utils import BatchFeature
from transformers.utils import TensorType, logging

logger = logging.get_logger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Kaldi's log floor: float32 machine epsilon.
LOG_FLOOR = float(np.finfo(np.float32).eps)
PREEMPHASIS = 0.97
# Above this many channels a 2-D array is taken for a mistake (a batch or channels-first audio), not channels.
MAX_CHANNELS = 8
# Float audio should lie in [-1, 1]; louder samples are accepted (e.g. int16-scaled floats) up to int32 full scale.
# Far above it the float64 power spectrum overflows and the features turn to inf / NaN.
MAX_AMPLITUDE = 2.0**31


@lru_cache(maxsize=8)
def _kaldi_mel_filters(sampling_rate: int, num_mel_bins: int, fft_length: int) -> np.ndarray:
    """Kaldi mel filter bank (fft_length // 2 + 1, num_mel_bins): triangles in mel space, 20 Hz to Nyquist."""
    return mel_filter_bank(
        num_frequency_bins=fft_length // 2 + 1,
        num_mel_filters=num_mel_bins,
        min_frequency=20.0,
        max_frequency=sampling_rate / 2,
        sampling_rate=sampling_rate,
        norm=None,
        mel_scale="kaldi",
        triangularize_in_mel_space=True,
    )


def resample(waveform: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Band-limited FFT resampling of a 1-D waveform (ideal low-pass at the lower Nyquist frequency).

    The mean is taken out first and put back after, so a DC offset stays a constant instead of ringing at the ends.
    The rest is zero-padded to a whole number of resampling periods so that the rate ratio is exact, and the output
    is cut back. Returns float64 (ceil(samples * target_rate / orig_rate),). The signal is treated as periodic, so
    the first and last few milliseconds can ring slightly; log-mel features do not mind.

    The one resampler of the package: `lavcap_hf.model.media_decoding` resamples decoded files with it too. An ideal low-pass keeps
    the whole band below the new Nyquist frequency: at 16 kHz, the 7-8 kHz that the top mel bins cover, which
    FFmpeg's default resampler filter attenuates (by about 6 dB at 7.8 kHz).
    """
    if orig_rate == target_rate:
        return waveform
    mean = waveform.mean() if waveform.size else 0.0
    period = orig_rate // math.gcd(orig_rate, target_rate)
    length = -(-waveform.shape[0] // period) * period
    new_length = length * target_rate // orig_rate
    kept = min(length, new_length)
    spectrum = np.fft.rfft(waveform - mean, n=length)[: kept // 2 + 1]
    if kept % 2 == 0:
        # The shorter signal's Nyquist bin stands for both +f and -f: fold it when shrinking, split it when growing.
        spectrum[kept // 2] *= 2.0 if new_length < length else 0.5
    resampled = np.fft.irfft(spectrum, n=new_length) * (new_length / length)
    return resampled[: -(-waveform.shape[0] * target_rate // orig_rate)] + mean


class LavCapFeatureExtractor(SequenceFeatureExtractor):
    r"""
    Turns waveforms into the normalised log-mel fbank the LAVCap audio encoder (CED) takes, and RGB frames into
    CLIP pixel values.

    Audio (per clip): to mono float at `sampling_rate` (see `__call__`), minus its mean, then a kaldi fbank
    identical to `torchaudio.compliance.kaldi.fbank(htk_compat=True, window_type="hanning", use_energy=False,
    dither=0.0, num_mel_bins=feature_size)`: 25 ms frames every 10 ms (`snip_edges`), DC offset removed per frame,
    pre-emphasis 0.97, symmetric Hann window, power spectrum of a 512-point FFT, kaldi mel bank 20 Hz to
    Nyquist, natural log floored at float32 eps. The waveform is not scaled to the int16 range (as in the
    official LAVCap code). The fbank is zero-padded or cut to `max_length` frames (a longer clip is truncated with
    a warning; `split_windows` cuts it into windows to caption each), optionally SpecAugment-ed, then normalised
    with `(x - mean) / std`; padded frames therefore hold `-mean / std`.

    Frames (per clip): `num_frames` uint8 RGB frames, shortest side resized to `image_size` (Pillow bicubic),
    centre-cropped, scaled to [0, 1], normalised with `image_mean` / `image_std`, channels first.

    Args:
        feature_size: number of mel bins.
        sampling_rate: rate the fbank is computed at, in Hz.
        max_length: number of fbank frames per clip (1024 frames = 10.24 s).
        padding_value: value of padded fbank frames before normalisation (log-mel domain).
        mean, std: normalisation statistics of the log-mel fbank.
        num_frames: frames per video clip.
        image_size: side of the square CLIP input.
        image_mean, image_std: per-channel CLIP normalisation.
        freq_mask_param, time_mask_param: SpecAugment maximum mask widths (mel bins, fbank frames).
    """

    model_input_names = ["input_features", "pixel_values_videos"]

    def __init__(
        self,
        feature_size: int = 64,
        sampling_rate: int = 16000,
        max_length: int = 1024,
        padding_value: float = 0.0,
        mean: float = -4.346,
        std: float = 4.332,
        num_frames: int = 20,
        image_size: int = 224,
        image_mean: tuple[float, float, float] | list[float] = CLIP_MEAN,
        image_std: tuple[float, float, float] | list[float] = CLIP_STD,
        freq_mask_param: int = 48,
        time_mask_param: int = 192,
        **kwargs,
    ):
        super().__init__(
            feature_size=feature_size, sampling_rate=sampling_rate, padding_value=padding_value, **kwargs
        )
        self.max_length = max_length
        self.mean = mean
        self.std = std
        self.num_frames = num_frames
        self.image_size = image_size
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.freq_mask_param = freq_mask_param
        self.time_mask_param = time_mask_param

    @property
    def window_length(self) -> int:
        """Samples per fbank frame (25 ms)."""
        return int(self.sampling_rate * 0.025)

    @property
    def hop_length(self) -> int:
        """Samples between fbank frames (10 ms)."""
        return int(self.sampling_rate * 0.010)

    def __call__(
        self,
        raw_audio: np.ndarray | list,
        sampling_rate: int | None = None,
        videos: np.ndarray | list[np.ndarray] | None = None,
        spec_augment: bool = False,
        generator: np.random.Generator | int | None = None,
        return_tensors: str | TensorType | None = None,
    ) -> BatchFeature:
        """Featurise one clip or a batch.

        Args:
            raw_audio: one clip or a list of clips. A clip is an array (or list of numbers) of shape (samples,)
                mono or (samples, channels) with at most 8 channels, which are averaged. Channels-first arrays
                and 2-D batches are rejected (a batch is a list); transpose channels-first audio. int16 and
                int32 are scaled to [-1, 1]; float arrays are used as they are.
            sampling_rate: rate of `raw_audio` in Hz; other rates than `self.sampling_rate` are resampled
                (`resample`). None means `self.sampling_rate` (with a warning, as a wrong rate goes unnoticed).
            videos: None, one uint8 RGB video (num_frames, H, W, 3) or channels-first (num_frames, 3, H, W), a
                list of them (one per clip) or an array (B, num_frames, H, W, 3).
            spec_augment: apply one frequency and one time mask per clip (training only).
            generator: numpy Generator or seed for the SpecAugment masks.
            return_tensors: "np", "pt", ... as in Transformers.

        Returns:
            BatchFeature with `input_features` float32 (B, max_length, feature_size) and, with videos,
            `pixel_values_videos` float32 (B, num_frames, 3, image_size, image_size). There is no mask of the padded
            fbank frames: the audio encoder attends to all `max_length` frames, as it was trained to.
        """
        waveforms = [self._to_mono(clip, sampling_rate) for clip in self._as_batch(raw_audio)]
        features = np.stack([self._extract_fbank(waveform) for waveform in waveforms])
        if spec_augment:
            rng = np.random.default_rng(generator)
            features = np.stack([self._spec_augment(feature, rng) for feature in features])
        data = {"input_features": ((features - self.mean) / self.std).astype(np.float32)}
        if videos is not None:
            data["pixel_values_videos"] = self.preprocess_videos(videos, len(waveforms))
        return BatchFeature(data, tensor_type=return_tensors)

    def split_windows(self, waveform: np.ndarray | list, sampling_rate: int) -> list[np.ndarray]:
        """Cut a long clip into consecutive windows of `max_length` fbank frames (10.24 s) to caption each.

        The clip is first converted as in `__call__` (mono, `self.sampling_rate`). Windows start every
        `max_length * hop_length` samples and are `window_length - hop_length` samples longer than that (15 ms),
        so that each full window gives exactly `max_length` frames. A tail shorter than one 25 ms fbank frame
        is dropped. Returns float32 (samples,) arrays at `self.sampling_rate`, to pass back to `__call__`.
        """
        waveform = self._to_mono(waveform, sampling_rate)
        length = self.window_stride + self.window_length - self.hop_length
        starts = range(0, max(1, waveform.shape[0] - self.window_length + 1), self.window_stride)
        return [waveform[start : start + length].astype(np.float32) for start in starts]

    @property
    def window_stride(self) -> int:
        """Samples (at `sampling_rate`) between the starts of consecutive `split_windows` windows (10.24 s)."""
        return self.max_length * self.hop_length

    @staticmethod
    def _as_batch(raw_audio) -> list:
        if isinstance(raw_audio, (list, tuple)) and raw_audio and not np.isscalar(raw_audio[0]):
            return list(raw_audio)
        return [raw_audio]

    def _to_mono(self, clip, sampling_rate: int | None) -> np.ndarray:
        """One clip -> float64 mono (samples,) at `self.sampling_rate`; ValueError naming what is wrong."""
        if sampling_rate is None:
            logger.warning_once(
                f"no sampling_rate given: the audio is taken to be at the model's {self.sampling_rate} Hz; pass "
                "sampling_rate to have audio at any other rate resampled instead of misread"
            )
            sampling_rate = self.sampling_rate
        if isinstance(sampling_rate, (float, np.floating)) and float(sampling_rate).is_integer():
            sampling_rate = int(sampling_rate)
        if (
            not isinstance(sampling_rate, (int, np.integer))
            or isinstance(sampling_rate, bool)
            or sampling_rate <= 0
        ):
            raise ValueError(f"sampling_rate must be positive whole Hz, got {sampling_rate!r}")
        clip = np.asarray(clip)
        if clip.dtype == np.int16 or clip.dtype == np.int32:
            clip = clip / float(-np.iinfo(clip.dtype).min)
        elif not np.issubdtype(clip.dtype, np.floating):
            raise ValueError(
                f"unsupported audio dtype {clip.dtype}: use float32/float64 in [-1, 1], int16 or int32"
            )
        clip = clip.astype(np.float64)
        if clip.ndim == 2:
            if not 1 <= clip.shape[1] <= MAX_CHANNELS:
                raise ValueError(
                    f"audio of shape {clip.shape}: expected (samples, channels) with at most {MAX_CHANNELS}"
                    " channels; pass a batch as a list of clips and transpose channels-first audio"
                )
            clip = clip.mean(axis=1)
        elif clip.ndim != 1:
            raise ValueError(
                f"audio must be (samples,) or (samples, channels), got {clip.ndim}-D shape {clip.shape}"
            )
        if clip.shape[0] == 0:
            raise ValueError("audio is empty (zero samples)")
        if not np.isfinite(clip).all():
            raise ValueError("audio contains NaN or infinite samples")
        peak = np.abs(clip).max()
        if peak > MAX_AMPLITUDE:
            raise ValueError(
                f"audio peak amplitude {peak:.3g} is out of range: float audio must lie in [-1, 1] (at most "
                f"{MAX_AMPLITUDE:.0f})"
            )
        return resample(clip - clip.mean(), int(sampling_rate), self.sampling_rate)

    def _extract_fbank(self, waveform: np.ndarray) -> np.ndarray:
        """Mono waveform (samples,) -> un-normalised log-mel (max_length, feature_size), padded with `padding_value`."""
        if waveform.shape[0] < self.window_length:
            raise ValueError(
                f"audio of {waveform.shape[0]} samples is shorter than one {self.window_length}-sample fbank frame"
            )
        num_frames = 1 + (waveform.shape[0] - self.window_length) // self.hop_length
        if num_frames > self.max_length:
            logger.warning(
                f"audio of {waveform.shape[0] / self.sampling_rate:.2f} s ({num_frames} fbank frames) is truncated to"
                f" {self.max_length} frames ({self.max_length * self.hop_length / self.sampling_rate:.2f} s); use"
                ' split_windows (or the pipeline\'s long_audio="windows") to caption all of it'
            )
            num_frames = self.max_length
        waveform = waveform - waveform.mean()
        fbank = self._log_mel(waveform[: (num_frames - 1) * self.hop_length + self.window_length])
        features = np.full((self.max_length, self.feature_size), self.padding_value, dtype=np.float64)
        features[:num_frames] = fbank
        return features

    def _log_mel(self, waveform: np.ndarray) -> np.ndarray:
        """Kaldi fbank of a waveform (samples,) -> (frames, feature_size), frames cut with `snip_edges`."""
        frames = np.lib.stride_tricks.sliding_window_view(waveform, self.window_length)[:: self.hop_length]
        frames = frames - frames.mean(axis=1, keepdims=True)
        # Kaldi pre-emphasis: the first sample is filtered against itself.
        frames = np.concatenate(
            [frames[:, :1] * (1 - PREEMPHASIS), frames[:, 1:] - PREEMPHASIS * frames[:, :-1]], axis=1
        )
        fft_length = 1 << (self.window_length - 1).bit_length()
        power = np.abs(np.fft.rfft(frames * np.hanning(self.window_length), n=fft_length)) ** 2
        mel_filters = _kaldi_mel_filters(self.sampling_rate, self.feature_size, fft_length)
        return np.log(np.maximum(power @ mel_filters, LOG_FLOOR))

    def _spec_augment(self, features: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One frequency and one time mask set to 0 on the un-normalised fbank (max_length, feature_size),
        drawn like torchaudio's FrequencyMasking / TimeMasking: width floor(U(0, param)), start floor(U(0, size - width))."""
        features = features.copy()
        for axis, param in ((1, self.freq_mask_param), (0, self.time_mask_param)):
            size = features.shape[axis]
            width = rng.uniform(0, min(param, size))
            start = int(rng.uniform(0, size - width))
            index = [slice(None), slice(None)]
            index[axis] = slice(start, start + int(width))
            features[tuple(index)] = 0.0
        return features

    # Frames are prepared here rather than by a transformers video processor (`BaseVideoProcessor`): its resize and
    # crop run on torchvision (5.x calls torchvision's functional transforms, 4.55 imports them), which this package
    # does not depend on; Pillow's bicubic resize here also keeps the released CLIP preprocessing bit for bit.
    def preprocess_videos(self, videos, batch_size: int | None = None) -> np.ndarray:
        """uint8 videos (one (num_frames, H, W, 3) or (num_frames, 3, H, W) array or a list of them) -> float32
        (B, num_frames, 3, image_size, image_size); `batch_size`, when given, must match the number of videos."""
        if not isinstance(videos, (list, tuple)):
            videos = np.asarray(videos)
            if videos.ndim not in (4, 5):
                raise ValueError(
                    f"videos must be one uint8 RGB video (frames, height, width, 3) or a batch of them, got an array "
                    f"of shape {videos.shape}"
                )
            videos = [videos] if videos.ndim == 4 else list(videos)
        if not videos:
            raise ValueError("no videos given (an empty list or batch): give one video per clip")
        if batch_size is not None and len(videos) != batch_size:
            raise ValueError(
                f"got {len(videos)} videos for {batch_size} audio clips; give one video per clip"
            )
        return np.stack([self._preprocess_frames(np.asarray(video)) for video in videos])

    def _preprocess_frames(self, video: np.ndarray) -> np.ndarray:
        """uint8 RGB (num_frames, H, W, 3), or channels-first (num_frames, 3, H, W) -> float32
        (num_frames, 3, image_size, image_size)."""
        if video.ndim == 4 and video.shape[-1] != 3 and video.shape[1] == 3:
            video = video.transpose(0, 2, 3, 1)
        if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
            raise ValueError(
                "a video must be uint8 RGB (frames, height, width, 3) or (frames, 3, height, width), got "
                f"{video.dtype} {video.shape}"
            )
        if video.shape[0] != self.num_frames:
            raise ValueError(
                f"a video must have num_frames={self.num_frames} frames, got {video.shape[0]}; sample them with"
                " lavcap_hf.model.media_decoding.load_media(num_frames=...)"
            )
        if 0 in video.shape[1:3]:
            raise ValueError(
                f"video frames must not be empty, got frames of {video.shape[1]}x{video.shape[2]} pixels"
            )
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        pixels = np.stack([self._resize_and_crop(frame) for frame in video]).astype(np.float32) / 255.0
        return ((pixels - mean) / std).transpose(0, 3, 1, 2)

    def _resize_and_crop(self, frame: np.ndarray) -> np.ndarray:
        """(H, W, 3) -> (image_size, image_size, 3): shortest side to image_size (bicubic), centre crop."""
        height, width = frame.shape[:2]
        # Same arithmetic as CLIPImageProcessor: the long side is truncated, not rounded.
        long_side = int(self.image_size * max(height, width) / min(height, width))
        new_width, new_height = (
            (self.image_size, long_side) if width <= height else (long_side, self.image_size)
        )
        image = Image.fromarray(frame).resize((new_width, new_height), Image.BICUBIC)
        left, top = (new_width - self.image_size) // 2, (new_height - self.image_size) // 2
        return np.asarray(image.crop((left, top, left + self.image_size, top + self.image_size)))
