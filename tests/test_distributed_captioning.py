"""`lavcap caption --output` across processes (`accelerate launch`, gloo on CPU): shards, part files, resume, merge,
the run's identity and lock.

The multi-process runs are real: `accelerate launch --multi_gpu --num_processes 2` starts two processes through
torchrun, which on a machine without a GPU caption on the CPU with a gloo process group (`--cpu` would start one
process only: accelerate's CPU launcher needs mpirun for more). Faults are injected by `tests/fault_injection.py`,
launched in place of `-m lavcap_hf`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fault_injection import EXIT_STATUS as FAULT_EXIT_STATUS
from helpers import save_scene_model
from transformers import GenerationConfig

from lavcap_cli import main
from lavcap_hf import LavCapForConditionalGeneration
from lavcap_hf.captioning.corpus import merge_parts, read_part, run_identity, settings_path
from lavcap_hf.captioning.files import batch_windows, caption_windows, load_captioning_pipeline
from lavcap_hf.captioning.sharded_run import part_files, part_path, shard
from lavcap_hf.data.media_encoding import write_media

ROOT = Path(__file__).resolve().parents[1]
NUM_GOOD = 18
BAD = {"clip05b_text.mp4": "not a readable media file", "clip11b_silent.mp4": "no audio stream"}
GENERATION = ["--batch-size", "2", "--num-beams", "2", "--max-new-tokens", "4", "--quiet"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """18 half-second clips of 4 small frames, a text file named .mp4 and a video without audio, sorted so that
    the bad files fall into two different batches."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    time = np.arange(8000) / 16000
    for index in range(NUM_GOOD):
        audio = (0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000) * time)).astype(np.float32)
        frames = rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
        write_media(folder / f"clip{index:02d}.mp4", frames, 8, audio, 16000)
    (folder / "clip05b_text.mp4").write_text("this is text, not a video")
    write_media(
        folder / "clip11b_silent.mp4", rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8), 8, None, 16000
    )
    return folder


@pytest.fixture(scope="module")
def reference(model_dir, corpus, tmp_path_factory) -> bytes:
    """The output of a plain one-process run (no workers) over the corpus."""
    output = tmp_path_factory.mktemp("reference") / "captions.jsonl"
    assert (
        main(["caption", str(corpus), "--model", str(model_dir), "--output", str(output), *GENERATION]) == 0
    )
    assert not part_files(str(output)) and not os.path.exists(settings_path(str(output)))
    return output.read_bytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(
    model_dir: Path, corpus: Path, output: Path, tmp_path: Path, fault: str | None = None
) -> subprocess.CompletedProcess:
    """`accelerate launch` of `lavcap caption` on 2 processes; with `fault`, through `tests/fault_injection.py`."""
    program = ["-m", "lavcap_hf"] if fault is None else [str(ROOT / "tests" / "fault_injection.py"), fault]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        *program, "caption", str(corpus), "--model", str(model_dir), "--output", str(output),
        "--num-workers", "1", *GENERATION,
    ]  # fmt: skip
    return subprocess.run(
        command, capture_output=True, text=True, env=environment(tmp_path), timeout=600, cwd=tmp_path
    )


def environment(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        "HF_HOME": str(tmp_path / "hf"),  # no accelerate config of this machine's user
    }


def identity(model_dir: Path, batch_size: int = 2, **generation) -> dict:
    """The identity that `lavcap caption ... GENERATION` records for the model in `model_dir`."""
    pipe = load_captioning_pipeline(str(model_dir))
    return run_identity(pipe, batch_size, **{"num_beams": 2, "max_new_tokens": 4, **generation})


def paths_of(output: Path) -> list[str]:
    return [json.loads(line)["path"] for line in output.read_text().splitlines()]


@pytest.mark.integration
def test_two_processes_write_the_one_process_output(model_dir, corpus, reference, tmp_path) -> None:
    output = tmp_path / "captions.jsonl"
    done = launch_two_processes(model_dir, corpus, output, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert output.read_bytes() == reference
    assert len(paths_of(output)) == NUM_GOOD
    assert not part_files(str(output)) and not os.path.exists(settings_path(str(output)))
    assert f"{len(BAD)} file(s) could not be captioned" in done.stderr
    for name, reason in BAD.items():
        assert f"{corpus / name}: {reason}" in done.stderr
    assert f"captioned {NUM_GOOD} of {NUM_GOOD + len(BAD)} file(s)" in done.stderr


@pytest.mark.integration
def test_rerun_after_a_killed_process_captions_every_clip_exactly_once(
    model_dir, corpus, reference, tmp_path
) -> None:
    output = tmp_path / "captions.jsonl"
    # Fault injection: process 1 exits hard after its first batch; torchrun then stops process 0.
    killed = launch_two_processes(model_dir, corpus, output, tmp_path, fault="exit:1:1")
    assert killed.returncode != 0 and re.search(rf"exitcode\s*: {FAULT_EXIT_STATUS}\b", killed.stderr)
    assert not output.exists()
    parts = part_files(str(output))
    assert [Path(p).name for p in parts] == [f"captions.jsonl.part-0000{r}-of-00002" for r in (0, 1)]
    kept = [r for part in parts for r in read_part(part) if "caption" in r]
    assert 0 < len(kept) < NUM_GOOD

    rerun = launch_two_processes(model_dir, corpus, output, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert f"({len(kept)} by an earlier, interrupted run)" in rerun.stderr
    assert output.read_bytes() == reference  # each clip once, in input order, with the one-process caption
    assert not part_files(str(output))


def test_a_truncated_last_line_is_dropped_and_redone_and_complete_lines_are_kept(
    model_dir, corpus, reference, tmp_path
) -> None:
    output = tmp_path / "captions.jsonl"
    first, second, third = (json.loads(line) for line in reference.decode().splitlines()[:3])
    part = Path(part_path(str(output), 0, 1))
    Path(settings_path(str(output))).write_text(json.dumps(identity(model_dir)))
    kept = json.dumps({"path": first["path"], "caption": "kept from the part file"}) + "\n"
    part.write_text(kept + json.dumps(second) + "\n" + json.dumps(third)[:-9])  # a crash while writing line 3
    assert (
        main(["caption", str(corpus), "--model", str(model_dir), "--output", str(output), *GENERATION]) == 0
    )
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["path"] for row in rows] == [
        json.loads(line)["path"] for line in reference.decode().splitlines()
    ]
    assert rows[0]["caption"] == "kept from the part file"  # not captioned again
    assert rows[1:] == [json.loads(line) for line in reference.decode().splitlines()[1:]]
    assert not part.exists()


def test_parts_of_a_run_with_other_settings_are_not_resumed(model_dir, corpus, tmp_path) -> None:
    output = tmp_path / "captions.jsonl"
    Path(part_path(str(output), 0, 2)).write_text(json.dumps({"path": "x.mp4", "caption": "old"}) + "\n")
    Path(settings_path(str(output))).write_text(json.dumps(identity(model_dir, num_beams=1)))
    args = [
        "caption",
        str(corpus / "clip00.mp4"),
        "--model",
        str(model_dir),
        "--output",
        str(output),
        *GENERATION,
    ]
    with pytest.raises(ValueError, match=r"other settings \(num_beams: 1 -> 2\).*--no-resume"):
        main(args)
    assert main([*args, "--no-resume"]) == 0
    assert paths_of(output) == [str(corpus / "clip00.mp4")] and not part_files(str(output))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_decoding_workers_give_the_pipelines_own_captions(model_dir, corpus, num_workers) -> None:
    """Featurising in DataLoader workers and generating from the featurised batches is `pipe(paths)` split up."""
    pipe = load_captioning_pipeline(str(model_dir), device="cpu")
    paths = [str(corpus / f"clip{index:02d}.mp4") for index in range(5)] + [str(corpus / "clip05b_text.mp4")]
    windows = [[0, 1, 2], [3, 4, 5]]
    kwargs = {"num_beams": 2, "max_new_tokens": 4}
    records = [r for batch in caption_windows(pipe, paths, windows, 3, num_workers, **kwargs) for r in batch]
    assert [r["path"] for r in records] == paths
    assert "not a readable media file" in records[5]["error"]
    expected = pipe(paths[:5], batch_size=3, **kwargs)
    assert [r["caption"] for r in records[:5]] == [result[0]["caption"] for result in expected]


@pytest.mark.parametrize("count, batch_size", [(20, 2), (7, 3), (1, 8), (0, 4)])
@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_shards_cover_every_window_once_in_order(count, batch_size, world_size) -> None:
    windows = batch_windows(count, batch_size)
    shards = [shard(windows, rank, world_size) for rank in range(world_size)]
    assert [w for s in shards for w in s] == windows
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert [i for w in windows for i in w] == list(range(count))


def test_merge_refuses_to_lose_a_file_without_a_record(tmp_path) -> None:
    output = str(tmp_path / "captions.jsonl")
    Path(part_path(output, 1, 2)).write_text(json.dumps({"path": "b.mp4", "caption": "a dog barks"}) + "\n")
    Path(part_path(output, 0, 2)).write_text(
        json.dumps({"path": "a.mp4", "error": "a.mp4: no audio stream"}) + "\n"
    )
    with pytest.raises(RuntimeError, match=r"1 file\(s\) have no record .*\(first: c\.mp4\)"):
        merge_parts(output, ["a.mp4", "b.mp4", "c.mp4"], "jsonl")
    assert len(part_files(output)) == 2  # nothing removed
    assert merge_parts(output, ["a.mp4", "b.mp4"], "csv") == (1, [("a.mp4", "a.mp4: no audio stream")])
    assert Path(output).read_bytes() == b"path,caption\r\nb.mp4,a dog barks\r\n" and not part_files(output)


def interrupted_run(model_dir: Path, corpus: Path, output: Path, monkeypatch) -> bytes:
    """Start `lavcap caption` and stop it (as Ctrl-C would) when it starts its second batch; returns its part file."""
    original = LavCapForConditionalGeneration.generate
    calls = []

    def interrupt_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LavCapForConditionalGeneration, "generate", interrupt_second_batch)
    with pytest.raises(KeyboardInterrupt):
        main(["caption", str(corpus), "--model", str(model_dir), "--output", str(output), *GENERATION])
    monkeypatch.setattr(LavCapForConditionalGeneration, "generate", original)
    (part,) = part_files(str(output))
    assert len(read_part(part)) == 2  # the first batch
    return Path(part).read_bytes()


def replace_weights(model_dir: Path) -> None:
    """Save a model of the same shapes with other random weights over the one in `model_dir`."""
    weights = model_dir / "model.safetensors"

    def size_and_header() -> tuple[int, bytes]:
        data = weights.read_bytes()
        return len(data), data[: 8 + int.from_bytes(data[:8], "little")]

    before = size_and_header()
    save_scene_model(model_dir, seed=1)
    assert size_and_header() == before  # the same size and safetensors header: only the values differ


def change_generation_config(model_dir: Path) -> None:
    config = GenerationConfig.from_pretrained(model_dir)
    config.suppress_tokens = [3]
    config.save_pretrained(model_dir)


def change_feature_extractor(model_dir: Path) -> None:
    path = model_dir / "preprocessor_config.json"
    settings = json.loads(path.read_text())
    path.write_text(json.dumps({**settings, "mean": settings["mean"] + 1.0}))


@pytest.mark.parametrize(
    "change, rerun_options, refusal",
    [
        (replace_weights, [], r"weights: '[0-9a-f]{64}' -> '[0-9a-f]{64}'"),
        (None, ["--batch-size", "3"], r"batch_size: 2 -> 3"),
        (change_generation_config, [], r"suppress_tokens: None -> \[3\]"),
        (change_feature_extractor, [], r"processor: '[0-9a-f]{64}' -> '[0-9a-f]{64}'"),
    ],
    ids=["weights-replaced-at-the-same-path", "batch-size", "models-generation-config", "processor"],
)
def test_a_rerun_that_would_caption_otherwise_is_refused(
    change, rerun_options, refusal, model_dir, corpus, tmp_path, monkeypatch
) -> None:
    """Whatever changes a caption is part of the run's identity: parts captioned otherwise are not resumed."""
    model = shutil.copytree(model_dir, tmp_path / "model")
    output = tmp_path / "captions.jsonl"
    kept = interrupted_run(model, corpus, output, monkeypatch)
    if change is not None:
        change(model)
    rerun = ["caption", str(corpus), "--model", str(model), "--output", str(output), *GENERATION]
    with pytest.raises(ValueError, match=rf"holds a run with other settings \({refusal}\)"):
        main([*rerun, *rerun_options])
    assert Path(part_files(str(output))[0]).read_bytes() == kept and not output.exists()


def start_held_run(
    model_dir: Path, corpus: Path, output: Path, tmp_path: Path
) -> tuple[subprocess.Popen, Path]:
    """`lavcap caption` in another process, held when it starts its second batch until the returned file exists."""
    release = tmp_path / f"release-{len(list(tmp_path.glob('release-*')))}"
    command = [
        sys.executable, str(ROOT / "tests" / "fault_injection.py"), f"hold:{release}",
        "caption", str(corpus), "--model", str(model_dir), "--output", str(output), *GENERATION,
    ]  # fmt: skip
    log = open(release.with_name(release.name + ".log"), "w")  # noqa: SIM115 (the process writes it)
    run = subprocess.Popen(command, env=environment(tmp_path), cwd=tmp_path, stderr=log)
    held = release.with_name(release.name + ".held")
    deadline = time.monotonic() + 600
    while not held.exists():
        assert run.poll() is None, Path(log.name).read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return run, release


@pytest.mark.integration
def test_a_second_run_on_the_same_output_is_refused_until_the_first_ends_or_dies(
    model_dir, corpus, reference, tmp_path
) -> None:
    output = tmp_path / "captions.jsonl"
    command = ["caption", str(corpus), "--model", str(model_dir), "--output", str(output), *GENERATION]
    first, release = start_held_run(model_dir, corpus, output, tmp_path)
    parts = {part: Path(part).read_bytes() for part in part_files(str(output))}
    holder = rf"pid {first.pid} on host {re.escape(socket.gethostname())}, started .*: lavcap caption "
    with pytest.raises(ValueError, match=rf"captions\.jsonl is in use by another run \({holder}"):
        main(command)
    assert {part: Path(part).read_bytes() for part in part_files(str(output))} == parts  # not appended to
    release.touch()
    assert first.wait(timeout=600) == 0, Path(f"{release}.log").read_text()[-3000:]
    assert output.read_bytes() == reference  # each clip once: the second run did not interleave

    # A run killed without a chance to clean up leaves its lock file; the lock itself died with it.
    output.unlink()
    crashed, _ = start_held_run(model_dir, corpus, output, tmp_path)
    crashed.kill()
    crashed.wait(timeout=60)
    assert Path(f"{output}.lock").exists() and part_files(str(output))
    assert main(command) == 0
    assert output.read_bytes() == reference and not Path(f"{output}.lock").exists()


@pytest.mark.integration
def test_a_refused_rerun_is_one_message_from_the_main_process(model_dir, corpus, tmp_path) -> None:
    output = tmp_path / "captions.jsonl"
    part = Path(part_path(str(output), 0, 2))
    part.write_text(json.dumps({"path": str(corpus / "clip00.mp4"), "caption": "old"}) + "\n")
    Path(settings_path(str(output))).write_text(json.dumps(identity(model_dir, batch_size=3)))
    refused = launch_two_processes(model_dir, corpus, output, tmp_path)
    assert refused.returncode != 0
    assert refused.stderr.count("other settings (") == 1, refused.stderr[-4000:]
    assert "lavcap caption: " in refused.stderr  # the message; the launcher's own report follows it
    assert not re.search(r'File ".*lavcap_(hf|cli)/', refused.stderr) and "ValueError" not in refused.stderr
    assert re.search(r"exitcode\s*: 2\b", refused.stderr)  # both processes exit with the refusal's status
    assert part_files(str(output)) == [str(part)] and not output.exists()
