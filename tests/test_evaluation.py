"""`lavcap_hf.evaluation.run`: a tiny model evaluated end to end on synthesised splits, resuming, the modality test."""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import record_generation_settings
from transformers import GenerationConfig

from lavcap_cli import add_evaluate_arguments
from lavcap_hf import LavCapForConditionalGeneration, LavCapProcessor
from lavcap_hf.data.clips import Clip, load_audiocaps
from lavcap_hf.data.media_encoding import write_media
from lavcap_hf.data.synthetic import PLACES, SOUNDS, generate_dataset
from lavcap_hf.evaluation.metrics import CAPTION_METRICS, compute_caption_metrics
from lavcap_hf.evaluation.run import evaluate_model, read_predictions, run_evaluate
from lavcap_hf.hub.model_card import load_eval_results
from lavcap_hf.testing.configs import tiny_lavcap_config
from lavcap_hf.testing.tokenizers import word_level_tokenizer

CONDITIONS = ("full", "no_visual", "shuffled_visual", "no_audio")
TITLES = {"no_visual": "No visual", "shuffled_visual": "Shuffled visual", "no_audio": "No audio"}
GENERATION = {"batch_size": 2, "num_beams": 2, "max_new_tokens": 5}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[LavCapForConditionalGeneration, LavCapProcessor, Path]:
    """A random tiny model (4 frames, 1.28 s of audio) with its processor, in memory and saved to a folder."""
    tokenizer = word_level_tokenizer([*SOUNDS.values(), *PLACES.values(), "is heard"])
    config = tiny_lavcap_config(
        vocab_size=len(tokenizer),
        audio_token_id=tokenizer.convert_tokens_to_ids("<|audio|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video|>"),
    )
    torch.manual_seed(0)
    model = LavCapForConditionalGeneration(config).eval()
    processor = LavCapProcessor.from_model_config(config, tokenizer)
    folder = tmp_path_factory.mktemp("model")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor, folder


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """5 synthetic mp4 clips listed twice each (two captions, as AudioCaps lists a clip once per caption), and a
    broken file in the middle of the list."""
    root = tmp_path_factory.mktemp("manifest_split")
    records = generate_dataset(root, num_train=0, num_test=5, duration_range=(1.0, 1.2))["test"]
    (root / "broken.mp4").write_text("not a video")
    rows = []
    for record in records[:2]:
        rows.append(
            {"id": record["id"], "video_path": f"test/{record['id']}.mp4", "caption": record["caption"]}
        )
    rows.append({"id": "broken", "video_path": "broken.mp4", "caption": "nothing to see"})
    for record in records[2:]:
        rows.append(
            {"id": record["id"], "video_path": f"test/{record['id']}.mp4", "caption": record["caption"]}
        )
    for record in records:
        rows.append(
            {
                "id": record["id"],
                "video_path": f"test/{record['id']}.mp4",
                "caption": f"{record['sound']} is heard",
            }
        )
    path = root / "eval.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def audiocaps_root(tmp_path_factory) -> Path:
    """The AudioCaps layout released with LAVCap: 6 wav clips, precomputed visual features (clip 3's missing), and
    3 reference captions per clip in test_coco.json."""
    root = tmp_path_factory.mktemp("audiocaps")
    (root / "test" / "waveforms").mkdir(parents=True)
    (root / "visual_feature" / "test").mkdir(parents=True)
    rng = np.random.default_rng(1)
    captions = list(SOUNDS.values())
    entries, annotations = [], []
    for index in range(6):
        youtube_id = f"yt{index}"
        audio = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 4000) * np.arange(19200) / 16000)
        write_media(
            root / "test" / "waveforms" / f"Y{youtube_id}.wav", None, 10, audio.astype(np.float32), 16000
        )
        if index != 3:
            np.save(root / "visual_feature" / "test" / f"Y{youtube_id}.npy", rng.standard_normal((4, 32)))
        entries.append(
            {
                "youtube_id": youtube_id,
                "caption": captions[index],
                "audio_path": f"Y{youtube_id}.wav",
                "video_path": f"Y{youtube_id}",
            }
        )
        for place in list(PLACES.values())[:3]:
            annotations.append({"image_id": youtube_id, "caption": f"{captions[index]} {place}"})
    (root / "test.json").write_text(json.dumps(entries))
    (root / "test_coco.json").write_text(json.dumps({"annotations": annotations}))
    return root


def _record_generate_calls(monkeypatch) -> list[dict[str, torch.Tensor | None]]:
    """Make every `generate()` call log copies of its media inputs, then run as usual."""
    calls: list[dict[str, torch.Tensor | None]] = []
    original = LavCapForConditionalGeneration.generate

    def generate(self, *args, **kwargs):
        keys = ("input_ids", "input_features", "pixel_values_videos", "video_embeds")
        calls.append({key: None if kwargs.get(key) is None else kwargs[key].clone() for key in keys})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LavCapForConditionalGeneration, "generate", generate)
    return calls


def _rows_per_condition(
    calls: list[dict], clips_per_condition: list[int]
) -> list[dict[str, torch.Tensor | None]]:
    """Concatenate the logged calls of each condition (they run one after the other), row = clip."""
    calls = iter(calls)
    blocks = []
    for count in clips_per_condition:
        block, rows = [], 0
        while rows < count:
            block.append(next(calls))
            rows += len(block[-1]["input_ids"])
        blocks.append(
            {key: None if block[0][key] is None else torch.cat([c[key] for c in block]) for key in block[0]}
        )
    assert next(calls, None) is None
    return blocks


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_evaluates_a_split_with_the_modality_test(tiny, manifest, tmp_path, monkeypatch, capsys) -> None:
    model, processor, folder = tiny
    calls = _record_generate_calls(monkeypatch)
    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    output = tmp_path / "eval"
    argv = ["--model", str(folder), "--data", str(manifest), "--output-dir", str(output), "--modality-test"]
    argv += ["--batch-size", "2", "--num-beams", "2", "--max-new-tokens", "5", "--quiet"]
    scores = run_evaluate(parser.parse_args(argv))

    # Predictions: one line per clip in split order, all captions of a clip as its references.
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    ids = list(dict.fromkeys(row["id"] for row in rows))
    references = {i: [row["caption"] for row in rows if row["id"] == i] for i in ids}
    lines = _lines(output / "predictions.jsonl")
    assert [line["id"] for line in lines] == ids
    broken = lines[ids.index("broken")]
    assert set(broken) == {"id", "error"} and "broken.mp4: not a readable media file" in broken["error"]
    evaluated = [line for line in lines if line["id"] != "broken"]
    assert all(isinstance(line["prediction"], str) for line in evaluated)
    assert all(line["references"] == references[line["id"]] for line in evaluated)
    evaluated_ids = [line["id"] for line in evaluated]

    # Scores: the full-input metrics at the top level, readable by the model card, and the clip counts.
    written = json.loads((output / "scores.json").read_text())
    assert written == scores
    assert scores["clips"] == {"total": 6, "readable": 5, "evaluated": 5}
    assert scores["unreadable"] == [{"id": "broken", "reason": broken["error"]}]
    expected = compute_caption_metrics(
        {line["id"]: line["prediction"] for line in evaluated}, {i: references[i] for i in evaluated_ids}
    )
    for name in CAPTION_METRICS:
        assert scores[name] == pytest.approx(expected[name])
    assert expected["tokenizer"] == scores["tokenizer"] == "ptb"
    assert load_eval_results(output / "scores.json")["CIDEr"] == pytest.approx(expected["CIDEr"])

    # Modality test: each condition captions the evaluated clips, and the drop is full minus condition.
    conditions = scores["modality_test"]["conditions"]
    assert list(conditions) == list(CONDITIONS[1:]) and scores["modality_test"]["skipped"] == {}
    condition_lines = {name: _lines(output / f"predictions_{name}.jsonl") for name in conditions}
    for name, result in conditions.items():
        assert [line["id"] for line in condition_lines[name]] == evaluated_ids
        assert result["num_clips"] == 5
        for metric in CAPTION_METRICS:
            if scores[metric] is None:
                assert result[metric] is None and result["drop"][metric] is None
            else:
                assert result["drop"][metric] == pytest.approx(scores[metric] - result[metric])
    partners = [line["visual_from"] for line in condition_lines["shuffled_visual"]]
    assert sorted(partners) == sorted(evaluated_ids)
    assert all(partner != clip for partner, clip in zip(partners, evaluated_ids, strict=True))

    # The model saw what each condition promises.
    full, no_visual, shuffled, no_audio = _rows_per_condition(calls, [5, 5, 5, 5])
    config, extractor = model.config, processor.feature_extractor
    assert no_visual["pixel_values_videos"] is None
    assert no_visual["video_embeds"].shape == (5, config.num_frames, config.visual_embed_dim)
    assert not no_visual["video_embeds"].any()
    torch.testing.assert_close(no_visual["input_features"], full["input_features"])
    order = [evaluated_ids.index(partner) for partner in partners]
    torch.testing.assert_close(shuffled["pixel_values_videos"], full["pixel_values_videos"][order])
    torch.testing.assert_close(shuffled["input_features"], full["input_features"])
    silence = (
        math.log(np.finfo(np.float32).eps) - extractor.mean
    ) / extractor.std  # every bin at kaldi's floor
    torch.testing.assert_close(no_audio["input_features"], torch.full_like(full["input_features"], silence))
    torch.testing.assert_close(no_audio["pixel_values_videos"], full["pixel_values_videos"])

    # The markdown table: one row per metric with the full value, then each condition's value and drop.
    table = (output / "scores.md").read_text()
    header = "| Metric | Full | No visual | drop | Shuffled visual | drop | No audio | drop |"
    assert header in table
    cider = next(line for line in table.splitlines() if line.startswith("| CIDEr-D |"))
    cells = [cell.strip() for cell in cider.strip("|").split("|")]
    values = [scores["CIDEr"]]
    for name in CONDITIONS[1:]:
        values += [conditions[name]["CIDEr"], conditions[name]["drop"]["CIDEr"]]
    assert [float(cell) for cell in cells[1:]] == pytest.approx(values, abs=6e-5)
    assert "5 with readable media" in table and "- broken: " in table
    assert header in capsys.readouterr().out


def test_interrupted_run_resumes_to_the_same_predictions(tiny, audiocaps_root, tmp_path, monkeypatch) -> None:
    model, processor, _ = tiny
    clips = load_audiocaps(audiocaps_root, "test")
    reference = evaluate_model(model, processor, clips, tmp_path / "whole", progress=False, **GENERATION)
    assert reference.scores["clips"] == {"total": 6, "readable": 5, "evaluated": 5}
    assert [u["id"] for u in reference.scores["unreadable"]] == ["yt3"]
    assert "yt3" in reference.scores["unreadable"][0]["reason"]

    calls = _record_generate_calls(monkeypatch)
    original = LavCapForConditionalGeneration.generate  # the recording wrapper

    def interrupt_on_second_batch(self, *args, **kwargs):
        if len(calls) == 1:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LavCapForConditionalGeneration, "generate", interrupt_on_second_batch)
    output = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        evaluate_model(model, processor, clips, output, progress=False, **GENERATION)
    predictions = output / "predictions.jsonl"
    assert [line["id"] for line in _lines(predictions)] == ["yt0", "yt1"]
    assert not (output / "scores.json").exists()
    with open(predictions, "a") as f:  # a crash in the middle of the next write
        f.write('{"id": "yt2", "predic')

    monkeypatch.setattr(LavCapForConditionalGeneration, "generate", original)
    resumed = evaluate_model(model, processor, clips, output, progress=False, **GENERATION)
    assert len(calls) == 1 + 2  # the first window was not generated again, the two others were
    assert predictions.read_bytes() == (tmp_path / "whole" / "predictions.jsonl").read_bytes()
    assert resumed.predictions == reference.predictions
    assert resumed.scores == reference.scores

    with pytest.raises(ValueError, match=r"num_beams: 2 -> 3"):
        evaluate_model(model, processor, clips, output, progress=False, **{**GENERATION, "num_beams": 3})


def test_refuses_foreign_prediction_files_and_clips_without_references(tiny, tmp_path, monkeypatch) -> None:
    model, processor, _ = tiny
    calls = _record_generate_calls(monkeypatch)
    clips = [Clip(id="a", references=("a dog barks",), audio=np.zeros(16000), sampling_rate=16000)]
    (tmp_path / "predictions.jsonl").write_text('{"id": "a", "prediction": "x"}\n')
    with pytest.raises(ValueError, match="no run.json"):
        evaluate_model(model, processor, clips, tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"no reference caption \(first: \['b'\]\)"):
        evaluate_model(model, processor, [*clips, Clip(id="b", audio=np.zeros(16000))], tmp_path / "b")
    assert calls == []


def test_read_predictions_ignores_a_cut_last_line_and_rejects_bad_lines(tmp_path) -> None:
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"id": "a", "prediction": "x"}\n{"id": "b", "error": "gone"}\n{"id": "c", "pre')
    assert read_predictions(path) == {"a": {"id": "a", "prediction": "x"}, "b": {"id": "b", "error": "gone"}}
    path.write_text('{"id": "a", "prediction": "x"}\n{"id": "b"}\n')
    with pytest.raises(ValueError, match="line 2 is not a record"):
        read_predictions(path)
    path.write_text('{"id": "a", "prediction": "x"\n{"id": "b", "error": "gone"}\n')
    with pytest.raises(ValueError, match="line 1 is not valid JSON"):
        read_predictions(path)


def test_evaluate_decodes_as_the_models_generation_config_unless_told_otherwise(
    tiny, manifest, tmp_path, monkeypatch
) -> None:
    _, _, folder = tiny
    model = tmp_path / "model"
    shutil.copytree(folder, model)
    config = GenerationConfig.from_pretrained(model)
    config.num_beams, config.max_new_tokens = 3, 5
    config.save_pretrained(model)
    settings = record_generation_settings(monkeypatch)
    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    output = tmp_path / "eval"
    argv = ["--model", str(model), "--data", str(manifest), "--output-dir", str(output), "--batch-size", "2"]

    scores = run_evaluate(parser.parse_args([*argv, "--quiet"]))
    assert settings == [{"num_beams": 3, "max_new_tokens": 5}] * 3  # 5 readable clips in batches of 2
    assert scores["generation"]["num_beams"] == 3 and scores["generation"]["max_new_tokens"] == 5
    recorded = json.loads((output / "run.json").read_text())
    assert recorded["num_beams"] == 3 and recorded["max_new_tokens"] == 5 and recorded["batch_size"] == 2
    assert all(len(line["prediction"].split()) <= 5 for line in _lines(output / "predictions.jsonl")[:2])

    settings.clear()
    run_evaluate(parser.parse_args([*argv, "--num-beams", "2", "--no-resume", "--quiet"]))
    assert settings == [{"num_beams": 2, "max_new_tokens": 5}] * 3


def test_a_resumed_evaluation_is_refused_with_other_weights_or_batch_size(
    tiny, audiocaps_root, tmp_path
) -> None:
    model, processor, _ = tiny
    clips = load_audiocaps(audiocaps_root, "test")
    evaluate_model(model, processor, clips, tmp_path, progress=False, **GENERATION)
    retrained = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in retrained.model.multi_modal_projector.parameters():
            parameter.add_(0.01)  # what training the projector does to every value, in miniature
    with pytest.raises(ValueError, match=r"other settings \(weights: '[0-9a-f]{64}' -> '[0-9a-f]{64}'\)"):
        evaluate_model(retrained, processor, clips, tmp_path, progress=False, **GENERATION)
    with pytest.raises(ValueError, match=r"other settings \(batch_size: 2 -> 3\)"):
        evaluate_model(model, processor, clips, tmp_path, progress=False, **{**GENERATION, "batch_size": 3})


@pytest.mark.integration
def test_an_output_folder_in_use_by_another_run_is_refused(tiny, audiocaps_root, tmp_path) -> None:
    model, processor, _ = tiny
    clips = load_audiocaps(audiocaps_root, "test")[:2]
    holder = subprocess.Popen(  # another run's main process, holding the folder's lock
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / "run.lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert holder.stdout.readline() == b"held\n"
    in_use = rf"in use by another run \(pid {holder.pid} on host {re.escape(socket.gethostname())}, started "
    with pytest.raises(ValueError, match=in_use):
        evaluate_model(model, processor, clips, tmp_path, progress=False, **GENERATION)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run.lock"]
    holder.kill()  # dies holding the lock: the kernel releases it
    holder.wait(timeout=60)
    result = evaluate_model(model, processor, clips, tmp_path, progress=False, **GENERATION)
    assert result.scores["clips"]["total"] == 2 and not (tmp_path / "run.lock").exists()


HOLD_LOCK = """
import sys
from lavcap_hf.captioning.sharded_run import RunLock
lock = RunLock(sys.argv[1])
assert lock.acquire() is None
print("held", flush=True)
sys.stdin.read()
"""
