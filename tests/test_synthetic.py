"""Synthetic audio-visual scenes: decodable clips, captions, reproducibility, and the property the demo relies
on: the sound is recoverable from the audio only and the place from the frames only."""

import collections
import itertools
import json
import subprocess
import sys

import av
import numpy as np
import pytest

from lavcap_hf.data.synthetic import (
    PLACES,
    SOUNDS,
    generate_dataset,
    parse_caption,
    plan_split,
    score_caption,
    synthesize_scene,
)
from lavcap_hf.model.media_decoding import load_media

# No function of a package the stacks pin differently runs here (held to it, tests/conftest.py): one stack is enough.
pytestmark = pytest.mark.stack_independent

SAMPLING_RATE = 16000
FPS = 10
DURATION_RANGE = (1.0, 2.0)
NUM_COMBOS = len(SOUNDS) * len(PLACES)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("synthetic")
    records = generate_dataset(
        out_dir, num_train=2 * NUM_COMBOS, num_test=NUM_COMBOS, seed=7, duration_range=DURATION_RANGE, fps=FPS
    )
    decoded = {
        split: [load_media(r["video_path"], sampling_rate=SAMPLING_RATE, num_frames=8) for r in rows]
        for split, rows in records.items()
    }
    return out_dir, records, decoded


def log_spectrum(audio: np.ndarray, window: int = 512, bands: int = 32) -> np.ndarray:
    """Mean power spectrum over Hann-windowed frames, pooled into bands, log, level-normalised. (bands,)"""
    frames = audio[: len(audio) // window * window].reshape(-1, window) * np.hanning(window)
    power = (np.abs(np.fft.rfft(frames, axis=1)) ** 2).mean(axis=0)[1:]
    log_power = np.log(power.reshape(bands, -1).mean(axis=1) + 1e-10)
    return log_power - log_power.mean()


def mean_colour(frames: np.ndarray) -> np.ndarray:
    return frames.reshape(-1, 3).mean(axis=0)


def nearest_neighbour_accuracy(train_x, train_y, test_x, test_y) -> float:
    """Accuracy of a 1-nearest-neighbour classifier (Euclidean) fitted on the train features."""
    train_x, test_x = np.asarray(train_x), np.asarray(test_x)
    nearest = ((test_x[:, None] - train_x[None]) ** 2).sum(axis=-1).argmin(axis=1)
    return float(np.mean([train_y[i] == y for i, y in zip(nearest, test_y, strict=True)]))


def test_clips_have_audio_and_video_of_the_planned_duration(dataset):
    out_dir, records, decoded = dataset
    for record, media in zip(records["test"], decoded["test"], strict=True):
        duration = record["duration_s"]
        assert media.audio.ndim == 1 and abs(len(media.audio) / SAMPLING_RATE - duration) < 0.1
        assert abs(media.duration - duration) < 0.15
        assert np.abs(media.audio).max() > 0.1
        assert media.frames.shape == (8, 64, 64, 3)
        with av.open(record["video_path"]) as container:
            assert len(container.streams.audio) == 1
            num_video_frames = sum(1 for _ in container.decode(video=0))
        assert num_video_frames == round(duration * FPS)
    low, high = DURATION_RANGE
    assert all(low <= r["duration_s"] <= high for r in records["train"] + records["test"])


def test_manifests_match_records_with_paths_relative_to_out_dir(dataset):
    out_dir, records, _ = dataset
    for split, rows in records.items():
        lines = [json.loads(line) for line in (out_dir / f"{split}.jsonl").read_text().splitlines()]
        assert len(lines) == len(rows)
        for line, row in zip(lines, rows, strict=True):
            assert (out_dir / line["video_path"]).resolve() == (out_dir / row["video_path"]).resolve()
            assert (out_dir / line["video_path"]).is_file()
            assert {k: v for k, v in line.items() if k != "video_path"} == {
                k: v for k, v in row.items() if k != "video_path"
            }


def test_captions_name_sound_then_place(dataset):
    _, records, _ = dataset
    for row in records["train"] + records["test"]:
        assert row["caption"] == f"{SOUNDS[row['sound']]} {PLACES[row['place']]}"
        assert parse_caption(row["caption"]) == (row["sound"], row["place"])


def test_train_and_test_are_disjoint(dataset):
    _, records, decoded = dataset
    train_ids = {r["id"] for r in records["train"]}
    assert train_ids.isdisjoint(r["id"] for r in records["test"])
    assert {r["seed"] for r in records["train"]}.isdisjoint(r["seed"] for r in records["test"])
    for train_media, test_media in itertools.product(decoded["train"], decoded["test"]):
        n = min(len(train_media.audio), len(test_media.audio))
        assert not np.allclose(train_media.audio[:n], test_media.audio[:n], atol=1e-3)


@pytest.mark.parametrize("num", [0, 7, NUM_COMBOS, NUM_COMBOS + 13, 3 * NUM_COMBOS])
def test_splits_are_balanced_over_combinations(num):
    specs = plan_split("test", num, seed=1, duration_range=(2.0, 4.0))
    counts = collections.Counter((s.sound, s.place) for s in specs)
    assert len(specs) == num and set(counts) <= set(itertools.product(SOUNDS, PLACES))
    assert all(
        counts[combo] in (num // NUM_COMBOS, num // NUM_COMBOS + 1)
        for combo in itertools.product(SOUNDS, PLACES)
    )
    assert len(counts) == min(num, NUM_COMBOS)


def _generate_small(out_dir, seed):
    records = generate_dataset(out_dir, num_train=3, num_test=3, seed=seed, duration_range=(1.0, 1.5))
    return records["train"] + records["test"]


def _file_bytes(records):
    return [open(record["video_path"], "rb").read() for record in records]


def test_same_seed_reproduces_the_dataset_byte_for_byte(tmp_path):
    first, second, other = (
        _generate_small(tmp_path / "a", 11),
        _generate_small(tmp_path / "b", 11),
        _generate_small(tmp_path / "c", 12),
    )
    for a, b in zip(first, second, strict=True):
        assert {k: v for k, v in a.items() if k != "video_path"} == {
            k: v for k, v in b.items() if k != "video_path"
        }
    assert _file_bytes(first) == _file_bytes(second)
    assert {r["seed"] for r in first}.isdisjoint(r["seed"] for r in other)


@pytest.mark.integration
def test_clips_do_not_depend_on_what_the_process_did_before(tmp_path):
    """The same clips from a fresh interpreter and from this one after other encodes (x264's SIMD once made
    the bytes depend on the process's history)."""
    for index in range(3):  # leave encoder state and freed buffers behind
        generate_dataset(tmp_path / f"warm-{index}", num_train=2, num_test=0, seed=100 + index, size=96)
    here = _file_bytes(_generate_small(tmp_path / "here", 11))
    code = (
        "import sys; from lavcap_hf.data.synthetic import generate_dataset; "
        "generate_dataset(sys.argv[1], num_train=3, num_test=3, seed=11, duration_range=(1.0, 1.5))"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "fresh")], check=True, timeout=300)
    fresh_dir = tmp_path / "fresh"
    fresh = [
        (fresh_dir / json.loads(line)["video_path"]).read_bytes()
        for split in ("train", "test")
        for line in (fresh_dir / f"{split}.jsonl").read_text().splitlines()
    ]
    assert here == fresh


def test_scene_content_is_a_function_of_the_rng():
    audio_a, frames_a = synthesize_scene(
        "chirps", "beach", np.random.default_rng(5), duration_s=2.5, fps=8, size=32
    )
    audio_b, frames_b = synthesize_scene(
        "chirps", "beach", np.random.default_rng(5), duration_s=2.5, fps=8, size=32
    )
    assert audio_a.dtype == np.float32 and audio_a.shape == (40000,) and np.abs(audio_a).max() <= 1
    assert frames_a.dtype == np.uint8 and frames_a.shape == (20, 32, 32, 3)
    np.testing.assert_array_equal(audio_a, audio_b)
    np.testing.assert_array_equal(frames_a, frames_b)
    assert not np.array_equal(frames_a[0], frames_a[-1])  # the camera moves


def test_44100_hz_clips_decode_at_their_rate(tmp_path):
    records = generate_dataset(
        tmp_path, num_train=1, num_test=0, sampling_rate=44100, duration_range=(1.0, 1.0)
    )
    media = load_media(records["train"][0]["video_path"], sampling_rate=44100, num_frames=4)
    assert abs(len(media.audio) / 44100 - 1.0) < 0.1 and np.abs(media.audio).max() > 0.1


def test_frames_do_not_depend_on_the_sound_nor_audio_on_the_place():
    _, frames = synthesize_scene("beeps", "cave", np.random.default_rng(3))
    audio, _ = synthesize_scene("beeps", "forest", np.random.default_rng(3))
    for sound in SOUNDS:
        np.testing.assert_array_equal(synthesize_scene(sound, "cave", np.random.default_rng(3))[1], frames)
    for place in PLACES:
        np.testing.assert_array_equal(synthesize_scene("beeps", place, np.random.default_rng(3))[0], audio)


def test_place_is_recognisable_from_frames_alone(dataset):
    _, records, decoded = dataset
    accuracy = nearest_neighbour_accuracy(
        [mean_colour(m.frames) for m in decoded["train"]],
        [r["place"] for r in records["train"]],
        [mean_colour(m.frames) for m in decoded["test"]],
        [r["place"] for r in records["test"]],
    )
    assert accuracy > 0.9


def test_sound_is_recognisable_from_audio_alone(dataset):
    _, records, decoded = dataset
    accuracy = nearest_neighbour_accuracy(
        [log_spectrum(m.audio) for m in decoded["train"]],
        [r["sound"] for r in records["train"]],
        [log_spectrum(m.audio) for m in decoded["test"]],
        [r["sound"] for r in records["test"]],
    )
    assert accuracy > 0.9


def test_sound_is_not_predictable_from_frames(dataset):
    _, records, decoded = dataset
    accuracy = nearest_neighbour_accuracy(
        [mean_colour(m.frames) for m in decoded["train"]],
        [r["sound"] for r in records["train"]],
        [mean_colour(m.frames) for m in decoded["test"]],
        [r["sound"] for r in records["test"]],
    )
    # Chance is 1/6; 30 balanced test clips put 12 or more hits (0.4) at p < 0.01 for an independent sound.
    assert accuracy < 0.4


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("a device beeps repeatedly in a kitchen", (True, True)),
        ("A device beeps repeatedly, in a kitchen.", (True, True)),
        ("an engine hums in a kitchen", (False, True)),
        ("a device beeps repeatedly in a cave", (True, False)),
        ("a device beeps repeatedly", (True, False)),
        ("a device beeps repeatedly and an engine hums in a kitchen", (False, True)),
        ("in a kitchen in a forest a device beeps repeatedly", (True, False)),
        ("", (False, False)),
    ],
)
def test_score_caption(prediction, expected):
    score = score_caption(prediction, "beeps", "kitchen")
    assert (score["sound_correct"], score["place_correct"]) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sound": "barks"}, "sound"),
        ({"place": "moon"}, "place"),
        ({"duration_s": 0.0}, "duration_s"),
        ({"sampling_rate": 8000}, "sampling_rate"),
        ({"fps": 0}, "fps"),
        ({"size": 31}, "size"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    arguments = {"sound": "hums", "place": "beach", "rng": np.random.default_rng(0), **kwargs}
    with pytest.raises(ValueError, match=message):
        synthesize_scene(**arguments)


def test_bad_dataset_arguments_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="train"):
        generate_dataset(tmp_path, num_train=-1, num_test=2)
    with pytest.raises(ValueError, match="duration_range"):
        generate_dataset(tmp_path, num_train=2, num_test=2, duration_range=(3.0, 2.0))
