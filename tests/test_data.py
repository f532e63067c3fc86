"""Training / evaluation data: the three clip sources, decoding in LavCapDataset, the collator, the sampler."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from lavcap_hf import LavCapProcessor
from lavcap_hf.data.clips import Clip, group_clips, load_audiocaps, load_clips, load_manifest
from lavcap_hf.data.collator import LavCapDataCollator
from lavcap_hf.data.dataset import EpochShuffleSampler, LavCapDataset, load_frame_folder
from lavcap_hf.data.media_encoding import write_media
from lavcap_hf.model.feature_extraction_lavcap import LavCapFeatureExtractor
from lavcap_hf.model.media_decoding import MediaError, load_media
from lavcap_hf.model.processing_lavcap import DEFAULT_INSTRUCTION, TRAINING_INSTRUCTIONS
from lavcap_hf.testing.configs import tiny_lavcap_config
from lavcap_hf.testing.tokenizers import word_level_tokenizer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
RATE = 16000
FRAMES = 4
CAPTIONS = ["a dog barks", "rain falls on a roof", "a bell rings twice"]


def tone(seconds: float, frequency: float) -> np.ndarray:
    return (0.4 * np.sin(2 * np.pi * frequency * np.arange(int(seconds * RATE)) / RATE)).astype(np.float32)


@pytest.fixture(scope="module")
def clips_dir(tmp_path_factory) -> Path:
    """Three mp4 clips (H.264 + AAC) of distinct tones and colours."""
    root = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    for index in range(3):
        frames = rng.integers(0, 255, (10, 32, 32, 3), dtype=np.uint8)
        write_media(root / f"clip{index}.mp4", frames, 10, tone(1.2, 300 + 200 * index), RATE)
    return root


@pytest.fixture(scope="module")
def processor() -> LavCapProcessor:
    tokenizer = word_level_tokenizer(CAPTIONS)
    config = tiny_lavcap_config(
        vocab_size=len(tokenizer),
        audio_token_id=tokenizer.convert_tokens_to_ids("<|audio|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video|>"),
    )
    return LavCapProcessor.from_model_config(config, tokenizer)


# -- sources ------------------------------------------------------------------------------------------------------


@pytest.fixture
def audiocaps_root(tmp_path) -> Path:
    """The released layout: train.json / test.json entries, waveforms, visual_feature/<split>/*.npy, test_coco.json."""
    rng = np.random.default_rng(1)
    for split, entries in {
        "train": [("yt1", "a dog barks"), ("yt2", "rain falls on a roof")],
        "test": [("yt3", "a bell rings twice"), ("yt3", "a bell rings")],
    }.items():
        (tmp_path / split / "waveforms").mkdir(parents=True)
        (tmp_path / "visual_feature" / split).mkdir(parents=True)
        rows = []
        for number, (youtube_id, caption) in enumerate(entries):
            audio_name = f"{youtube_id}.wav"
            audio_file = tmp_path / split / "waveforms" / audio_name
            if not audio_file.exists():  # one file per clip, not per caption
                write_media(audio_file, None, 0, tone(1.0, 500 + 100 * number), RATE)
                np.save(
                    tmp_path / "visual_feature" / split / f"{youtube_id}.npy",
                    rng.standard_normal((FRAMES, 8)),
                )
            rows.append(
                {
                    "youtube_id": youtube_id,
                    "caption": caption,
                    "audio_path": audio_name,
                    "video_path": f"{youtube_id}.mp4",
                    "labels": "/m/0",
                    "torch_id": number,
                }
            )
        (tmp_path / f"{split}.json").write_text(json.dumps(rows))
    coco = {"annotations": [{"image_id": "yt3", "caption": f"reference {i}", "id": i} for i in range(5)]}
    (tmp_path / "test_coco.json").write_text(json.dumps(coco))
    return tmp_path


def test_audiocaps_layout_gives_entries_features_and_coco_references(audiocaps_root) -> None:
    train = load_audiocaps(audiocaps_root, "train")
    assert [(c.id, c.caption) for c in train] == [("yt1", "a dog barks"), ("yt2", "rain falls on a roof")]
    assert train[0].audio == audiocaps_root / "train" / "waveforms" / "yt1.wav"
    assert train[0].video_embeds == audiocaps_root / "visual_feature" / "train" / "yt1.npy"

    test = load_audiocaps(audiocaps_root, "test")
    assert len(test) == 2  # one entry per caption
    grouped = group_clips(test)
    assert [c.id for c in grouped] == ["yt3"]
    assert grouped[0].references == tuple(f"reference {i}" for i in range(5))

    item = LavCapDataset(grouped, num_frames=FRAMES)[0]
    expected_audio = load_media(audiocaps_root / "test" / "waveforms" / "yt3.wav", need_frames=False).audio
    np.testing.assert_array_equal(item["audio"], expected_audio)
    np.testing.assert_allclose(item["audio"][: RATE // 2], tone(0.5, 500), atol=1e-3)  # 16-bit PCM round trip
    np.testing.assert_array_equal(
        item["video_embeds"],
        np.load(audiocaps_root / "visual_feature" / "test" / "yt3.npy").astype(np.float32),
    )
    assert "frames" not in item and item["id"] == "yt3" and item["caption"] == "a bell rings twice"
    assert load_clips(audiocaps_root, "test")[0].references == grouped[0].references


def test_audiocaps_problems_are_named(audiocaps_root) -> None:
    (audiocaps_root / "visual_feature" / "train" / "yt2.npy").unlink()
    dataset = LavCapDataset(load_audiocaps(audiocaps_root, "train"), num_frames=FRAMES)
    with pytest.raises(ValueError, match=r"yt2\.npy: cannot read the visual features of clip yt2"):
        dataset[1]
    with pytest.raises(
        ValueError, match=r"visual features must be \(num_frames=5, dim\), got shape \(4, 8\)"
    ):
        LavCapDataset(load_audiocaps(audiocaps_root, "train"), num_frames=5)[0]
    with pytest.raises(ValueError, match=r"val\.json: not found"):
        load_audiocaps(audiocaps_root, "val")
    (audiocaps_root / "train.json").write_text(json.dumps([{"youtube_id": "x", "caption": "c"}]))
    with pytest.raises(ValueError, match=r"entry 0 lacks \['audio_path', 'video_path'\]"):
        load_audiocaps(audiocaps_root, "train")


def test_csv_manifest_paths_are_relative_to_it_and_rows_group_by_clip(clips_dir, tmp_path) -> None:
    manifest = clips_dir / "captions.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video_path", "caption"])
        writer.writerows(
            [["clip0.mp4", CAPTIONS[0]], ["clip1.mp4", CAPTIONS[1]], ["clip0.mp4", "a dog yelps"]]
        )
    clips = load_manifest(manifest)
    assert [c.id for c in clips] == ["clip0.mp4", "clip1.mp4", "clip0.mp4"]
    assert clips[0].video == clips_dir / "clip0.mp4" and clips[0].audio is None
    grouped = group_clips(clips)
    assert [(c.id, c.references) for c in grouped] == [
        ("clip0.mp4", (CAPTIONS[0], "a dog yelps")),
        ("clip1.mp4", (CAPTIONS[1],)),
    ]
    item = LavCapDataset(clips, num_frames=FRAMES)[1]
    decoded = load_media(clips_dir / "clip1.mp4", num_frames=FRAMES)
    np.testing.assert_array_equal(item["audio"], decoded.audio)
    np.testing.assert_array_equal(item["frames"], decoded.frames)

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"caption": "no media"}) + "\n")
    with pytest.raises(ValueError, match="row 1 has neither 'video_path' nor 'audio_path'"):
        load_manifest(broken)
    with pytest.raises(ValueError, match="not a dataset source"):
        load_clips(tmp_path / "nothing.txt")


def test_hf_dataset_with_bytes_and_paths_decodes_like_the_files(clips_dir, tmp_path) -> None:
    paths = [str(clips_dir / f"clip{i}.mp4") for i in range(3)]
    with_bytes = datasets.Dataset.from_dict(
        {"clip": ["a", "b", "c"], "video": [Path(p).read_bytes() for p in paths], "caption": CAPTIONS}
    )
    clips = load_clips(with_bytes, columns={"video": "video", "id": "clip"})
    assert [c.id for c in clips] == ["a", "b", "c"] and [c.caption for c in clips] == CAPTIONS
    assert isinstance(clips[0].video, bytes)
    # Paths in an `Audio(decode=False)` column ({"path", "bytes"} rows) next to a video path column.
    with_paths = datasets.Dataset.from_dict({"video": paths, "sound": paths, "caption": CAPTIONS})
    with_paths = with_paths.cast_column("sound", datasets.Audio(decode=False))
    path_clips = load_clips(with_paths, columns={"video": "video", "audio": "sound"})
    assert path_clips[2].audio == paths[2] and path_clips[2].id == "2"
    for dataset in (LavCapDataset(clips, num_frames=FRAMES), LavCapDataset(path_clips, num_frames=FRAMES)):
        for index, path in enumerate(paths):
            decoded = load_media(path, num_frames=FRAMES)
            np.testing.assert_array_equal(dataset[index]["audio"], decoded.audio)
            np.testing.assert_array_equal(dataset[index]["frames"], decoded.frames)
    # A saved dataset folder is a source too.
    with_bytes.save_to_disk(tmp_path / "saved")
    saved = load_clips(tmp_path / "saved", columns={"video": "video", "id": "clip"})
    assert [c.id for c in saved] == ["a", "b", "c"]

    audio_table = datasets.Dataset.from_dict(
        {
            "audio": [{"array": tone(1.0, 440).astype(np.float64) * 0.5, "sampling_rate": 8000}],
            "caption": ["x"],
        }
    )
    clip = load_clips(audio_table, columns={"audio": "audio"})[0]
    item = LavCapDataset([clip], load_visual=False)[0]
    assert item["audio"].shape == (2 * RATE,)  # 8 kHz -> 16 kHz

    corrupt = LavCapDataset([Clip(id="bad", video=b"not a media file")], num_frames=FRAMES)
    with pytest.raises(MediaError, match="clip bad \\(bytes\\)"):
        corrupt[0]


def test_frame_folder_gives_the_centre_frame_of_each_segment(tmp_path) -> None:
    for index in range(10):
        Image.fromarray(np.full((8, 8, 3), 20 * index, dtype=np.uint8)).save(tmp_path / f"{index:03d}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    frames = load_frame_folder(tmp_path, 4)
    # Segments of 2.5 images: centres at 1.25, 3.75, 6.25, 8.75 -> images 1, 3, 6, 8.
    assert frames.shape == (4, 8, 8, 3) and frames[:, 0, 0, 0].tolist() == [20, 60, 120, 160]
    (tmp_path / "empty").mkdir()
    with pytest.raises(MediaError, match="no image files"):
        load_frame_folder(tmp_path / "empty", 4)


def token_ids(processor: LavCapProcessor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def contains(sequence: list[int], part: list[int]) -> bool:
    return any(sequence[i : i + len(part)] == part for i in range(len(sequence) - len(part) + 1))


# -- collator -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def items(clips_dir) -> list[dict]:
    clips = [Clip(id=f"c{i}", caption=CAPTIONS[i], video=clips_dir / f"clip{i}.mp4") for i in range(3)]
    dataset = LavCapDataset(clips, num_frames=FRAMES, seed=7)
    return [dataset[i] for i in range(3)]


def test_training_batch_has_labels_on_caption_and_eos_only(processor, items) -> None:
    batch = LavCapDataCollator(processor, spec_augment=False)(items)
    tokenizer = processor.tokenizer
    # As released, every caption starts at one column: shorter prompts are padded before it.
    starts = (batch["labels"] != -100).int().argmax(dim=1)
    assert len(set(starts.tolist())) == 1
    start = int(starts[0])
    for row in range(3):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        kept = labels[labels != -100]
        assert tokenizer.decode(kept[:-1]) == CAPTIONS[row] and kept[-1] == tokenizer.eos_token_id
        # The caption's labels are its own tokens, and only padding follows them.
        end = start + len(kept)
        torch.testing.assert_close(ids[start:end], kept)
        assert mask[start:end].all() and not mask[end:].any()
        # The prompt is attended from BOS on, then padded up to the caption.
        prompt_length = int(mask[:start].sum())
        assert mask[:prompt_length].all() and not mask[prompt_length:start].any()
        prompt = ids[:prompt_length].tolist()
        assert sum(contains(prompt, token_ids(processor, text)) for text in TRAINING_INSTRUCTIONS) == 1
    assert batch["pixel_values_videos"].shape == (3, FRAMES, 3, 32, 32)
    assert "clip_index" not in batch


def test_spec_augment_masks_training_features_reproducibly(processor, items, monkeypatch) -> None:
    plain = LavCapDataCollator(processor, spec_augment=False)(items)["input_features"]
    extractor: LavCapFeatureExtractor = processor.feature_extractor
    log_mel_calls = []
    log_mel = extractor._log_mel
    monkeypatch.setattr(extractor, "_log_mel", lambda waveform: log_mel_calls.append(1) or log_mel(waveform))
    augmented = LavCapDataCollator(processor)(items)["input_features"]
    assert len(log_mel_calls) == len(items)  # one fbank per clip: the masks go on the collator's only pass
    again = LavCapDataCollator(processor)(items)["input_features"]
    torch.testing.assert_close(augmented, again, rtol=0, atol=0)
    masked_value = -extractor.mean / extractor.std  # a zeroed log-mel value after normalisation (and padding)
    assert (augmented != plain).any()
    for clip, item in enumerate(items):
        masked = augmented[clip] == masked_value  # (frames, mel)
        frames, bins = masked.all(dim=1), masked.all(dim=0)
        # One frequency band over all frames and one run of frames over all bins (plus the padded frames).
        assert torch.equal(masked, frames[:, None] | bins[None, :])
        audio_frames = 1 + (len(item["audio"]) - extractor.window_length) // extractor.hop_length
        for run in (bins, frames[:audio_frames]):
            where = torch.nonzero(run).flatten()
            assert len(where) == 0 or where[-1] - where[0] + 1 == len(where)
        unmasked = ~masked
        torch.testing.assert_close(augmented[clip][unmasked], plain[clip][unmasked], rtol=0, atol=0)

    # Another epoch draws other masks and instructions; the dataset seeds them, not global state.
    clips = [
        Clip(id=item["id"], caption=item["caption"], audio=item["audio"], sampling_rate=RATE)
        for item in items
    ]
    dataset = LavCapDataset(clips, load_visual=False, seed=7)
    seeds = [dataset[i]["seed"] for i in range(3)]
    dataset.start_epoch(1)
    assert [dataset[i]["seed"] for i in range(3)] != seeds


def test_evaluation_batch_is_left_padded_with_the_default_instruction(processor, items) -> None:
    batch = LavCapDataCollator(processor, training=False)(items)
    assert "labels" not in batch and batch["clip_index"].tolist() == [0, 1, 2]
    assert batch["attention_mask"][:, -1].all()
    plain = LavCapDataCollator(processor, spec_augment=False)(items)["input_features"]
    torch.testing.assert_close(batch["input_features"], plain)
    prompt = batch["input_ids"][0].tolist()
    assert contains(prompt, token_ids(processor, DEFAULT_INSTRUCTION))
    assert prompt[-len(token_ids(processor, "ASSISTANT:")) :] == token_ids(processor, "ASSISTANT:")

    mixed = [items[0], {**items[1], "video_embeds": np.zeros((FRAMES, 32), np.float32)}]
    mixed[1].pop("frames")
    with pytest.raises(ValueError, match="mixes clips with and without frames"):
        LavCapDataCollator(processor)(mixed)
    with pytest.raises(ValueError, match=r"clips \['c0'\] have none"):
        LavCapDataCollator(processor)([{**items[0], "caption": None}])


def test_dataloader_workers_decode_the_same_batches(processor, clips_dir) -> None:
    clips = [Clip(id=f"c{i}", caption=CAPTIONS[i], video=clips_dir / f"clip{i}.mp4") for i in range(3)]
    dataset = LavCapDataset(clips, num_frames=FRAMES, seed=1)
    collator = LavCapDataCollator(processor)
    kwargs = {"batch_size": 3, "collate_fn": collator, "sampler": EpochShuffleSampler(dataset, seed=0)}
    in_process = next(iter(torch.utils.data.DataLoader(dataset, num_workers=0, **kwargs)))
    in_worker = next(iter(torch.utils.data.DataLoader(dataset, num_workers=1, **kwargs)))
    assert in_process.keys() == in_worker.keys()
    for key, value in in_process.items():
        torch.testing.assert_close(in_worker[key], value, rtol=0, atol=0)


def test_epoch_shuffle_sampler_order_depends_on_seed_and_epoch_only(clips_dir) -> None:
    dataset = LavCapDataset([Clip(id=str(i), caption="x", video=clips_dir / "clip0.mp4") for i in range(20)])
    sampler = EpochShuffleSampler(dataset, seed=5)
    first = list(sampler)
    assert sorted(first) == list(range(20)) and list(sampler) == first
    dataset.start_epoch(1)
    second = list(sampler)
    assert second != first and sorted(second) == list(range(20))
    dataset.start_epoch(0)
    assert list(EpochShuffleSampler(dataset, seed=5)) == first


def test_extract_visual_features_writes_clip_embeddings_and_resumes(clips_dir, tmp_path) -> None:
    """examples/extract_visual_features.py with a tiny random CLIP: the files hold the vision tower's projected
    embeddings of the sampled frames, a second run skips them, and the manifest it writes trains as features."""
    spec = importlib.util.spec_from_file_location(
        "extract_visual_features", EXAMPLES / "extract_visual_features.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    clip_model = CLIPVisionModelWithProjection(config).eval()
    clip_model.save_pretrained(tmp_path / "clip")
    manifest = tmp_path / "clips.jsonl"
    rows = [
        {"id": f"clip/{i}", "video_path": str(clips_dir / f"clip{i}.mp4"), "caption": CAPTIONS[i]}
        for i in range(3)
    ]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = [str(manifest), "--output_dir", str(tmp_path / "features"), "--clip_model", str(tmp_path / "clip")]
    argv += ["--num_frames", str(FRAMES), "--batch_size", "2", "--num_workers", "1", "--device", "cpu"]
    argv += ["--write_manifest", str(tmp_path / "with_features.jsonl")]
    assert script.extract(script.parse_args(argv)) == 3

    extractor = LavCapFeatureExtractor(num_frames=FRAMES, image_size=32)
    for index in range(3):
        frames = load_media(clips_dir / f"clip{index}.mp4", num_frames=FRAMES, need_audio=False).frames
        with torch.no_grad():
            expected = clip_model(
                pixel_values=torch.from_numpy(extractor.preprocess_videos(frames)[0])
            ).image_embeds
        saved = np.load(tmp_path / "features" / f"clip_{index}.npy")
        assert saved.shape == (FRAMES, 16)
        np.testing.assert_allclose(saved, expected.numpy(), rtol=1e-5, atol=1e-6)
    stamps = [p.stat().st_mtime_ns for p in sorted((tmp_path / "features").iterdir())]
    (tmp_path / "features" / "clip_1.npy").unlink()
    assert script.extract(script.parse_args(argv)) == 1  # only the missing clip
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "features").iterdir())][::2] == stamps[::2]
    clips = load_manifest(tmp_path / "with_features.jsonl")
    item = LavCapDataset(clips, num_frames=FRAMES)[2]
    assert "frames" not in item
    np.testing.assert_array_equal(item["video_embeds"], np.load(tmp_path / "features" / "clip_2.npy"))


def test_clips_held_in_memory_are_used_as_they_are() -> None:
    frames = np.random.default_rng(0).integers(0, 255, (FRAMES, 16, 16, 3), dtype=np.uint8)
    clip = Clip(id="m", caption="x", audio=tone(1.0, 440), sampling_rate=RATE, video=frames)
    item = LavCapDataset([clip], num_frames=FRAMES)[0]
    np.testing.assert_array_equal(item["frames"], frames)
    np.testing.assert_array_equal(item["audio"], tone(1.0, 440))
    with pytest.raises(ValueError, match=r"frames in memory must be uint8 \(num_frames=5, H, W, 3\)"):
        LavCapDataset([clip], num_frames=5)[0]
    with pytest.raises(ValueError, match="has no audio or video file"):
        LavCapDataset([Clip(id="m", video=frames)], num_frames=FRAMES)[0]
