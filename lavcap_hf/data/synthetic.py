"""Synthetic audio-visual scenes for the demo and the tests.

Each clip pairs one sound event (synthesised with numpy) with one place (rendered as coarse RGB frames). The
caption names both, ``"<sound phrase> <place phrase>"``, e.g. ``"a device beeps repeatedly in a kitchen"``.
Sound and place are drawn independently, so the place can only be known from the frames and the sound only
from the audio: a captioner that uses the frames as context should name the place, an audio-only one cannot.

Manifests: ``generate_dataset`` writes ``<out_dir>/<split>.jsonl`` with one record per line. Its
``video_path`` is relative to ``out_dir`` (the folder holding the manifest), so a dataset folder can be moved;
the records returned by ``generate_dataset`` carry absolute paths instead.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .media_encoding import write_media

SOUNDS: dict[str, str] = {
    "beeps": "a device beeps repeatedly",
    "hums": "an engine hums",
    "hisses": "steam hisses",
    "clicks": "something clicks",
    "chirps": "a bird chirps",
    "rumbles": "thunder rumbles",
}
PLACES: dict[str, str] = {
    "kitchen": "in a kitchen",
    "forest": "in a forest",
    "beach": "on a beach",
    "street": "in a city street",
    "cave": "in a cave",
}
SPLITS = ("train", "test")
MIN_SAMPLING_RATE = 16000  # the hiss band reaches 7.5 kHz
MIN_FRAME_SIZE = 16


@dataclass(frozen=True)
class SceneSpec:
    """Everything needed to regenerate one clip: ``synthesize_scene(sound, place, default_rng(seed), duration_s)``."""

    id: str
    sound: str
    place: str
    caption: str
    seed: int
    duration_s: float


def make_caption(sound: str, place: str) -> str:
    """Caption of a scene, e.g. ``make_caption("beeps", "kitchen") == "a device beeps repeatedly in a kitchen"``."""
    _check_choice("sound", sound, SOUNDS)
    _check_choice("place", place, PLACES)
    return f"{SOUNDS[sound]} {PLACES[place]}"


def parse_caption(caption: str) -> tuple[str | None, str | None]:
    """Sound and place keys named by a (predicted) caption; ``None`` for a part that names none or several."""
    text = " " + " ".join(re.findall(r"[a-z]+", caption.lower())) + " "
    return _single_match(text, SOUNDS), _single_match(text, PLACES)


def score_caption(prediction: str, sound: str, place: str) -> dict[str, bool]:
    """Whether ``prediction`` names exactly the right sound and exactly the right place."""
    predicted_sound, predicted_place = parse_caption(prediction)
    return {"sound_correct": predicted_sound == sound, "place_correct": predicted_place == place}


def _single_match(text: str, phrases: dict[str, str]) -> str | None:
    found = [key for key, phrase in phrases.items() if f" {phrase} " in text]
    return found[0] if len(found) == 1 else None


def _check_choice(kind: str, value: str, options: dict[str, str]) -> None:
    if value not in options:
        raise ValueError(f"Unknown {kind} {value!r}; expected one of {sorted(options)}.")


# --------------------------------------------------------------------------------------------------- audio


def _band_noise(rng: np.random.Generator, n: int, sr: int, low_hz: float, high_hz: float) -> np.ndarray:
    """White noise restricted to [low_hz, high_hz] in the frequency domain, unit RMS. Shape (n,)."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / sr)
    spectrum[(freqs < low_hz) | (freqs > high_hz)] = 0.0
    noise = np.fft.irfft(spectrum, n)
    return noise / (np.sqrt(np.mean(noise**2)) + 1e-12)


def _onsets(rng: np.random.Generator, duration_s: float, period_s: float, jitter: float) -> np.ndarray:
    """Event start times (s): a random phase, then steps of period_s * (1 +- jitter)."""
    steps = period_s * (1.0 + rng.uniform(-jitter, jitter, int(duration_s / period_s) + 2))
    times = rng.uniform(0.0, period_s) + np.concatenate([[0.0], np.cumsum(steps)])
    return times[times < duration_s]


def _place_events(n: int, sr: int, onsets: np.ndarray, make_event: Callable[[], np.ndarray]) -> np.ndarray:
    out = np.zeros(n)
    for onset in onsets:
        start = int(onset * sr)
        event = make_event()[: n - start]
        out[start : start + len(event)] += event
    return out


def _beeps(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Repeated short tones at one pitch in 1000-1400 Hz."""
    freq, tone_s = rng.uniform(1000.0, 1400.0), rng.uniform(0.08, 0.15)
    t = np.arange(int(tone_s * sr)) / sr
    ramp = np.minimum(1.0, np.minimum(t, tone_s - t) / 0.005)  # 5 ms ramps avoid broadband clicks
    tone = np.sin(2 * np.pi * freq * t) * ramp
    onsets = _onsets(rng, n / sr, rng.uniform(0.25, 0.5), jitter=0.05)
    return _place_events(n, sr, onsets, lambda: tone)


def _hums(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Continuous harmonic tone, fundamental 60-110 Hz, 8 harmonics with 1/k amplitudes and slight vibrato."""
    t = np.arange(n) / sr
    f0 = rng.uniform(60.0, 110.0) * (1.0 + 0.01 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    return sum(np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k for k in range(1, 9))


def _hisses(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Continuous noise in 3.5-7.5 kHz with a slow swell."""
    t = np.arange(n) / sr
    swell = 1.0 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t + rng.uniform(0, 2 * np.pi))
    return _band_noise(rng, n, sr, 3500.0, 7500.0) * swell


def _clicks(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Train of broadband 3 ms decaying noise bursts, 3-10 per second."""
    decay = np.exp(-np.arange(int(0.003 * sr)) / (0.0007 * sr))
    onsets = _onsets(rng, n / sr, 1.0 / rng.uniform(3.0, 10.0), jitter=0.3)
    return _place_events(n, sr, onsets, lambda: rng.standard_normal(len(decay)) * decay)


def _chirps(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Short upward sweeps from 1.5-2.2 kHz rising by 0.8-1.2 kHz, in irregular succession."""
    sweep_s = rng.uniform(0.06, 0.12)
    t = np.arange(int(sweep_s * sr)) / sr
    window = np.sin(np.pi * t / sweep_s) ** 2

    def sweep() -> np.ndarray:
        f_start, rise = rng.uniform(1500.0, 2200.0), rng.uniform(800.0, 1200.0)
        return np.sin(2 * np.pi * (f_start * t + 0.5 * rise / sweep_s * t**2)) * window

    onsets = _onsets(rng, n / sr, rng.uniform(0.15, 0.3), jitter=0.4)
    return _place_events(n, sr, onsets, sweep)


def _rumbles(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Noise below 120-200 Hz under a slow (0.3-1 Hz), deep amplitude modulation."""
    t = np.arange(n) / sr
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.3, 1.0) * t + rng.uniform(0, 2 * np.pi))
    return _band_noise(rng, n, sr, 20.0, rng.uniform(120.0, 200.0)) * envelope


_SOUND_MAKERS: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "beeps": _beeps,
    "hums": _hums,
    "hisses": _hisses,
    "clicks": _clicks,
    "chirps": _chirps,
    "rumbles": _rumbles,
}


def synthesize_audio(
    sound: str, rng: np.random.Generator, duration_s: float, sampling_rate: int
) -> np.ndarray:
    """Mono waveform of one sound event over faint white background noise.

    Returns float32 (round(duration_s * sampling_rate),) with peak in [0.3, 0.8] times (1 + noise) <= 1.
    """
    _check_choice("sound", sound, SOUNDS)
    n = round(duration_s * sampling_rate)
    event = _SOUND_MAKERS[sound](rng, n, sampling_rate)
    event = event / (np.max(np.abs(event)) + 1e-12) * rng.uniform(0.3, 0.8)
    background = rng.standard_normal(n) * 10 ** (rng.uniform(-50.0, -40.0) / 20)
    return np.clip(event + background, -1.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------------- frames
# Each place is a static "world" image wider than the frame; the camera pans across it. Places differ by
# dominant colours and large-scale layout (bands, stripes, grids, blobs), so they survive 32x32 resizing.


def _jitter(rng: np.random.Generator, rgb: tuple[float, float, float], amount: float = 0.04) -> np.ndarray:
    return np.clip(np.asarray(rgb) + rng.uniform(-amount, amount, 3), 0.0, 1.0)


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column index arrays of shape (H, 1) and (1, W)."""
    return np.arange(height)[:, None], np.arange(width)[None, :]


def _kitchen(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Cream tiled wall over wooden cabinets with light handles."""
    y, x = _grid(h, w)
    img = np.broadcast_to(_jitter(rng, (0.92, 0.88, 0.78)), (h, w, 3)).copy()
    tile = max(4, h // 8)
    img[((y % tile) == 0) | ((x % tile) == 0)] = _jitter(rng, (0.7, 0.7, 0.68))
    counter = int(h * rng.uniform(0.6, 0.7))
    img[counter:] = _jitter(rng, (0.6, 0.4, 0.24))
    door = max(6, w // 6)
    img[counter + 2 : h - 2, :][:, (x[0] % door) == door // 2] = _jitter(rng, (0.85, 0.8, 0.7))
    return img


def _forest(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Dark green foliage with lighter leaf blobs and brown vertical trunks."""
    y, x = _grid(h, w)
    img = np.broadcast_to(_jitter(rng, (0.12, 0.38, 0.14)), (h, w, 3)).copy()
    for _ in range(w // 6):
        cy, cx, r = rng.uniform(0, h * 0.6), rng.uniform(0, w), rng.uniform(h / 12, h / 6)
        img[(y - cy) ** 2 + (x - cx) ** 2 < r**2] = _jitter(rng, (0.25, 0.55, 0.2))
    for _ in range(w // 12):
        left, width = rng.integers(0, w), rng.integers(max(2, w // 32), max(3, w // 12))
        img[int(h * rng.uniform(0.1, 0.4)) :, left : left + width] = _jitter(rng, (0.35, 0.22, 0.12))
    return img


def _beach(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Sky over sea over sand (horizontal bands), a sun disk and white wave lines."""
    y, x = _grid(h, w)
    horizon, shore = int(h * rng.uniform(0.3, 0.38)), int(h * rng.uniform(0.5, 0.58))
    img = np.empty((h, w, 3))
    img[:horizon], img[horizon:shore], img[shore:] = (
        _jitter(rng, (0.55, 0.78, 0.96)),
        _jitter(rng, (0.08, 0.4, 0.72)),
        _jitter(rng, (0.94, 0.84, 0.56)),
    )
    cy, cx, r = rng.uniform(0.1, 0.2) * h, rng.uniform(0, w), h / 12
    img[(y - cy) ** 2 + (x - cx) ** 2 < r**2] = (1.0, 0.95, 0.6)
    for row in range(horizon + 3, shore, 5):
        img[row, (x[0] + rng.integers(0, 8)) % 8 < 5] = (0.95, 0.97, 1.0)
    return img


def _street(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Grey buildings of varying heights with yellow window grids, pale sky, dark road with dashed line."""
    y, x = _grid(h, w)
    img = np.broadcast_to(_jitter(rng, (0.72, 0.74, 0.76)), (h, w, 3)).copy()
    road = int(h * rng.uniform(0.72, 0.8))
    left = 0
    while left < w:
        width, top = rng.integers(w // 8, w // 4), int(h * rng.uniform(0.1, 0.35))
        grey = rng.uniform(0.35, 0.5)
        img[top:road, left : left + width] = (grey, grey, grey * 1.02)
        windows = ((y[top:road] - top) % 6 < 3) & ((x[:, left : left + width] - left) % 5 < 2)
        img[top:road, left : left + width][windows] = _jitter(rng, (0.85, 0.78, 0.35))
        left += width + rng.integers(1, 4)
    img[road:] = _jitter(rng, (0.22, 0.22, 0.23))
    img[(road + h) // 2, (x[0] % 10) < 5] = (0.9, 0.9, 0.85)
    return img


def _cave(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Near-black rock with dim brown boulders and an orange torch glow."""
    y, x = _grid(h, w)
    img = np.broadcast_to(_jitter(rng, (0.1, 0.08, 0.06), 0.02), (h, w, 3)).copy()
    for _ in range(w // 8):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(h / 10, h / 5)
        img[(y - cy) ** 2 + (x - cx) ** 2 < r**2] = _jitter(rng, (0.22, 0.17, 0.13), 0.03)
    cy, cx = rng.uniform(0.3, 0.6) * h, rng.uniform(0, w)
    glow = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * (h / 10) ** 2))[..., None]
    return img + glow * np.array([0.5, 0.25, 0.05])


_PLACE_RENDERERS: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "kitchen": _kitchen,
    "forest": _forest,
    "beach": _beach,
    "street": _street,
    "cave": _cave,
}


def render_frames(place: str, rng: np.random.Generator, num_frames: int, size: int) -> np.ndarray:
    """Frames of a camera panning slowly across a place, with mild sensor noise.

    Returns uint8 (num_frames, size, size, 3).
    """
    _check_choice("place", place, PLACES)
    pan = size // 4
    world = _PLACE_RENDERERS[place](rng, size, size + pan)
    offsets = np.round(
        np.linspace(0, pan, num_frames) if rng.random() < 0.5 else np.linspace(pan, 0, num_frames)
    )
    frames = np.stack([world[:, int(o) : int(o) + size] for o in offsets])
    frames = frames.astype(np.float32) + 0.015 * rng.standard_normal(frames.shape, dtype=np.float32)
    return (np.clip(frames, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def synthesize_scene(
    sound: str,
    place: str,
    rng: np.random.Generator,
    duration_s: float = 3.0,
    sampling_rate: int = 16000,
    fps: int = 10,
    size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Audio and frames of one scene.

    Audio and frames come from two independent generators seeded from ``rng``, so the frames depend on the
    place and the seed only, never on the sound (and the audio never on the place).

    Returns audio float32 (round(duration_s * sampling_rate),) in [-1, 1] and frames uint8
    (max(1, round(duration_s * fps)), size, size, 3).
    """
    if not duration_s > 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}.")
    if sampling_rate < MIN_SAMPLING_RATE:
        raise ValueError(f"sampling_rate must be at least {MIN_SAMPLING_RATE} Hz, got {sampling_rate}.")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}.")
    if size < MIN_FRAME_SIZE or size % 2:
        raise ValueError(f"size must be an even number >= {MIN_FRAME_SIZE} (yuv420p video), got {size}.")
    audio_seed, video_seed = rng.integers(0, 2**63, size=2)
    audio = synthesize_audio(sound, np.random.default_rng(audio_seed), duration_s, sampling_rate)
    frames = render_frames(place, np.random.default_rng(video_seed), max(1, round(duration_s * fps)), size)
    return audio, frames


# --------------------------------------------------------------------------------------------------- dataset


def balanced_pairs(num: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """``num`` (sound, place) pairs, shuffled: every combination ``num // combos`` times, then distinct
    combinations for the remainder, so sound and place are independent in the sample itself."""
    combos = list(itertools.product(SOUNDS, PLACES))
    extra = rng.permutation(len(combos))[: num % len(combos)]
    pairs = combos * (num // len(combos)) + [combos[i] for i in extra]
    return [pairs[i] for i in rng.permutation(len(pairs))]


def plan_split(split: str, num: int, seed: int, duration_range: tuple[float, float]) -> list[SceneSpec]:
    """Scene specs of one split; different splits get different seed streams, so they share no clip."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
    if num < 0:
        raise ValueError(f"Number of {split} clips must be >= 0, got {num}.")
    low, high = duration_range
    if not 0 < low <= high:
        raise ValueError(f"duration_range must satisfy 0 < low <= high, got {duration_range}.")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    specs = []
    for index, (sound, place) in enumerate(balanced_pairs(num, rng)):
        specs.append(
            SceneSpec(
                id=f"{split}-{index:05d}",
                sound=sound,
                place=place,
                caption=make_caption(sound, place),
                seed=int(rng.integers(0, 2**63)),
                duration_s=round(float(rng.uniform(low, high)), 2),
            )
        )
    return specs


def generate_dataset(
    out_dir: str | Path,
    num_train: int,
    num_test: int,
    seed: int = 0,
    duration_range: tuple[float, float] = (2.0, 4.0),
    sampling_rate: int = 16000,
    fps: int = 10,
    size: int = 64,
) -> dict[str, list[dict]]:
    """Write ``<out_dir>/<split>/<id>.mp4`` clips (H.264 video + audio) and ``<out_dir>/<split>.jsonl``.

    Both splits are balanced over (sound, place) combinations; the test split covers every combination once
    ``num_test >= len(SOUNDS) * len(PLACES)``. The same arguments give byte-identical files, whatever the
    process did before and whatever the machine's load (H.264 is written by x264's C code, see `write_media`).

    Returns ``{"train": records, "test": records}``; a record has ``id``, ``video_path`` (absolute),
    ``caption``, ``sound``, ``place``, ``duration_s``, ``seed``. The manifests hold the same records with
    ``video_path`` relative to ``out_dir``.
    """
    out_dir = Path(out_dir).resolve()
    splits = {"train": num_train, "test": num_test}
    plans = {split: plan_split(split, num, seed, duration_range) for split, num in splits.items()}
    records: dict[str, list[dict]] = {}
    for split, specs in plans.items():
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        lines, records[split] = [], []
        for spec in specs:
            audio, frames = synthesize_scene(
                spec.sound,
                spec.place,
                np.random.default_rng(spec.seed),
                spec.duration_s,
                sampling_rate,
                fps,
                size,
            )
            relative = f"{split}/{spec.id}.mp4"
            write_media(out_dir / relative, frames, fps, audio, sampling_rate)
            lines.append(json.dumps({"video_path": relative, **asdict(spec)}))
            records[split].append({"video_path": str(out_dir / relative), **asdict(spec)})
        (out_dir / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines))
    return records
