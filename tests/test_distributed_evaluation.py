"""`lavcap evaluate` across processes (`accelerate launch`, gloo on CPU): shards, part files, resume, merge.

As in `tests/test_distributed_captioning.py`, the two-process runs are real: `accelerate launch --multi_gpu
--num_processes 2` through torchrun, each process on the CPU with one thread, every launch under a timeout so that a
deadlock fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fault_injection import EXIT_STATUS as FAULT_EXIT_STATUS
from test_distributed_captioning import environment, free_port

from lavcap_cli import main
from lavcap_hf.captioning.files import load_captioning_pipeline
from lavcap_hf.captioning.sharded_run import part_files, part_path
from lavcap_hf.data.clips import load_audiocaps
from lavcap_hf.data.media_encoding import write_media
from lavcap_hf.data.synthetic import PLACES, SOUNDS, make_caption
from lavcap_hf.evaluation.run import evaluate_model, read_predictions

# Training runs, benchmarks and launched processes: the opt-in integration tier (pyproject.toml).
pytestmark = pytest.mark.integration


ROOT = Path(__file__).resolve().parents[1]
IDS = [f"yt{index}" for index in range(6)]
BAD = "yt2"  # no visual features
PREDICTION_FILES = ["predictions.jsonl"] + [
    f"predictions_{name}.jsonl" for name in ("no_visual", "shuffled_visual", "no_audio")
]
RUN_FILES = [*PREDICTION_FILES, "scores.json", "scores.md", "run.json"]
# 6 clips in 3 batches of 2 (the 5 readable ones again for each modality condition): the 2 processes get 1 and 2.
GENERATION = ["--batch-size", "2", "--num-beams", "2", "--max-new-tokens", "4", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    """The AudioCaps layout: 6 wav clips of 0.5 s with (4, 32) visual features, none for yt2 (an unreadable clip),
    2 reference captions each in test_coco.json."""
    root = tmp_path_factory.mktemp("audiocaps")
    (root / "test" / "waveforms").mkdir(parents=True)
    (root / "visual_feature" / "test").mkdir(parents=True)
    rng = np.random.default_rng(2)
    sounds, places = list(SOUNDS), list(PLACES)
    entries, annotations = [], []
    for index, clip_id in enumerate(IDS):
        audio = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 4000) * np.arange(8000) / 16000)
        write_media(
            root / "test" / "waveforms" / f"Y{clip_id}.wav", None, 10, audio.astype(np.float32), 16000
        )
        if clip_id != BAD:
            features = rng.standard_normal((4, 32)).astype(np.float32)
            np.save(root / "visual_feature" / "test" / f"Y{clip_id}.npy", features)
        sound = sounds[index % len(sounds)]
        caption = make_caption(sound, places[0])
        entries.append(
            {
                "youtube_id": clip_id,
                "caption": caption,
                "audio_path": f"Y{clip_id}.wav",
                "video_path": f"Y{clip_id}",
            }
        )
        for place in places[:2]:
            annotations.append({"image_id": clip_id, "caption": make_caption(sound, place)})
    (root / "test.json").write_text(json.dumps(entries))
    (root / "test_coco.json").write_text(json.dumps({"annotations": annotations}))
    return root


def evaluate_arguments(model_dir: Path, split: Path, output: Path) -> list[str]:
    return [
        "evaluate",
        "--model",
        str(model_dir),
        "--data",
        str(split),
        "--output-dir",
        str(output),
        *GENERATION,
    ]


@pytest.fixture(scope="module")
def reference(model_dir, split, tmp_path_factory) -> Path:
    """The output folder of a plain one-process run with the modality test."""
    output = tmp_path_factory.mktemp("reference") / "eval"
    assert main([*evaluate_arguments(model_dir, split, output), "--modality-test"]) == 0
    assert [line["id"] for line in map(json.loads, (output / "predictions.jsonl").open())] == IDS
    assert json.loads((output / "scores.json").read_text())["unreadable"][0]["id"] == BAD
    return output


def launch_two_processes(
    model_dir: Path, split: Path, output: Path, tmp_path: Path, fault: str | None = None
) -> subprocess.CompletedProcess:
    """`accelerate launch` of `lavcap evaluate` on 2 processes; with `fault`, through `tests/fault_injection.py`."""
    program = ["-m", "lavcap_hf"] if fault is None else [str(ROOT / "tests" / "fault_injection.py"), fault]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        *program, *evaluate_arguments(model_dir, split, output), "--modality-test",
    ]  # fmt: skip
    return subprocess.run(
        command, capture_output=True, text=True, env=environment(tmp_path), timeout=600, cwd=tmp_path
    )


def assert_same_run(output: Path, reference: Path) -> None:
    for name in RUN_FILES:
        assert (output / name).read_bytes() == (reference / name).read_bytes(), name
    assert not [path for name in PREDICTION_FILES for path in part_files(str(output / name))]


def test_two_processes_write_the_one_process_files(model_dir, split, reference, tmp_path) -> None:
    output = tmp_path / "eval"
    done = launch_two_processes(model_dir, split, output, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert_same_run(output, reference)  # predictions of every condition, scores, table
    assert done.stdout.count("| Metric | Full |") == 1  # the main process alone prints the table


def test_rerun_after_a_killed_process_predicts_every_clip_once(model_dir, split, reference, tmp_path) -> None:
    output = tmp_path / "eval"
    # Fault injection: process 1 exits hard after its first batch (clips yt2, yt3); torchrun then stops process 0.
    killed = launch_two_processes(model_dir, split, output, tmp_path, fault="exit:1:1")
    assert killed.returncode != 0 and re.search(rf"exitcode\s*: {FAULT_EXIT_STATUS}\b", killed.stderr)
    part = Path(part_path(str(output / "predictions.jsonl"), 1, 2))
    assert list(read_predictions(part)) == ["yt2", "yt3"]
    main_share = list(
        read_predictions(output / "predictions.jsonl")
    )  # process 0 may be stopped before it writes
    assert main_share == ["yt0", "yt1"][: len(main_share)]
    assert not (output / "scores.json").exists() and not (output / "predictions_no_visual.jsonl").exists()

    # Only the last window is left: process 0's share of the full input is empty, process 1's is one window.
    rerun = launch_two_processes(model_dir, split, output, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert_same_run(output, reference)


def test_a_resumed_run_keeps_the_parts_records_and_redoes_cut_lines(
    model_dir, split, reference, tmp_path
) -> None:
    """One process resumes what two left: their complete lines are kept, a line cut short is redone, and the
    parts are merged into the predictions file in split order."""
    lines = (reference / "predictions.jsonl").read_text().splitlines(keepends=True)
    kept = json.dumps({**json.loads(lines[3]), "prediction": "kept from the part file"}) + "\n"
    output = tmp_path / "eval"
    output.mkdir()
    (output / "predictions.jsonl").write_text(lines[0] + lines[1][:20])  # process 0, cut while writing yt1
    part = Path(part_path(str(output / "predictions.jsonl"), 1, 2))
    part.write_text(
        lines[2] + kept + lines[4][:-9]
    )  # process 1: yt2 (unreadable), yt3, cut while writing yt4
    pipe = load_captioning_pipeline(str(model_dir), device="cpu")
    clips = load_audiocaps(split, "test")
    generation = {"batch_size": 2, "num_beams": 2, "max_new_tokens": 4, "progress": False}

    with pytest.raises(ValueError, match=r"predictions\.jsonl\.part-00001-of-00002.*no run\.json"):
        evaluate_model(pipe.model, pipe.processor, clips, output, **generation)
    shutil.copy(reference / "run.json", output / "run.json")
    result = evaluate_model(pipe.model, pipe.processor, clips, output, **generation)

    assert (output / "predictions.jsonl").read_text() == "".join([*lines[:3], kept, *lines[4:]])
    assert not part.exists()
    assert result.predictions["yt3"] == "kept from the part file"
    assert result.scores["clips"] == {"total": 6, "readable": 5, "evaluated": 5}
