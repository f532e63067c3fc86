"""`lavcap caption` over a folder with good and broken files."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import record_generation_settings
from transformers import GenerationConfig, pipeline

from lavcap_cli import main, parse_command_line
from lavcap_hf import LavCapForConditionalGeneration, LavCapProcessor
from lavcap_hf.data.media_encoding import write_media
from lavcap_hf.model.media_decoding import load_media
from lavcap_hf.testing.configs import tiny_lavcap_config
from lavcap_hf.testing.tokenizers import word_level_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    tokenizer = word_level_tokenizer(["a bird chirps in a forest"])
    config = tiny_lavcap_config(
        vocab_size=len(tokenizer),
        audio_token_id=tokenizer.convert_tokens_to_ids("<|audio|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video|>"),
    )
    LavCapForConditionalGeneration(config).save_pretrained(folder)
    LavCapProcessor.from_model_config(config, tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    t = np.arange(32000) / 16000
    for name in ("one.mp4", "nested/two.mkv"):
        (folder / name).parent.mkdir(exist_ok=True)
        audio = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t).astype(np.float32)
        frames = rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8)
        write_media(folder / name, frames, 10, audio, 16000)
    write_media(
        folder / "silent_video.mp4", rng.integers(0, 255, (10, 32, 32, 3), dtype=np.uint8), 10, None, 16000
    )
    (folder / "not_media.mp4").write_text("this is text")
    (folder / "truncated.mp4").write_bytes((folder / "one.mp4").read_bytes()[:2000])
    (folder / "notes.txt").write_text("ignored: not a media extension")
    return folder


def test_caption_folder_reports_bad_files_and_captions_the_rest(
    model_dir, media_dir, tmp_path, capsys
) -> None:
    output = tmp_path / "captions.jsonl"
    plots = tmp_path / "plots"
    code = main(
        [
            "caption",
            str(media_dir),
            str(tmp_path / "missing.mp4"),
            "--model",
            str(model_dir),
            "--output",
            str(output),
            "--batch-size",
            "2",
            "--num-beams",
            "2",
            "--max-new-tokens",
            "3",
            "--plot-ot",
            str(plots),
            "--quiet",
        ]
    )
    assert code == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(Path(r["path"]).name for r in rows) == ["one.mp4", "two.mkv"]
    assert all(isinstance(r["caption"], str) for r in rows)
    assert sorted(p.name for p in plots.iterdir()) == ["one.png", "two.png"]
    err = capsys.readouterr().err
    assert "4 file(s) could not be captioned" in err
    assert "missing.mp4: file not found" in err
    assert "silent_video.mp4: no audio stream" in err
    assert "not_media.mp4: not a readable media file" in err
    assert "truncated.mp4" in err
    assert "captioned 2 of 6 file(s)" in err


def test_caption_writes_csv_and_fails_only_when_nothing_was_captioned(model_dir, media_dir, tmp_path) -> None:
    output = tmp_path / "out.csv"
    args = [
        "--model",
        str(model_dir),
        "--output",
        str(output),
        "--num-beams",
        "1",
        "--max-new-tokens",
        "2",
        "--quiet",
    ]
    assert main(["caption", str(media_dir / "one.mp4"), str(media_dir / "not_media.mp4"), *args]) == 0
    with open(output, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]).name for r in rows] == ["one.mp4"]
    assert main(["caption", str(media_dir / "not_media.mp4"), *args]) == 1


@pytest.mark.parametrize("fusion_type", ["channel_concat", "ot_cross_attention"])
def test_caption_decodes_frames_for_fusions_without_video_tokens(fusion_type, media_dir, tmp_path) -> None:
    """These fusions use the frames but give them no placeholder tokens: the frames must still be decoded."""
    tokenizer = word_level_tokenizer(["a bird chirps in a forest"])
    config = tiny_lavcap_config(
        fusion_type=fusion_type,
        vocab_size=len(tokenizer),
        audio_token_id=tokenizer.convert_tokens_to_ids("<|audio|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video|>"),
    )
    assert config.placeholder_counts[1] == 0 and config.uses_visual
    LavCapForConditionalGeneration(config).save_pretrained(tmp_path / "model")
    LavCapProcessor.from_model_config(config, tokenizer).save_pretrained(tmp_path / "model")
    output = tmp_path / "captions.jsonl"
    code = main(
        ["caption", str(media_dir / "one.mp4"), "--model", str(tmp_path / "model"), "--output", str(output)]
    )
    assert code == 0
    assert [json.loads(line)["path"] for line in output.read_text().splitlines()] == [
        str(media_dir / "one.mp4")
    ]


ROOT = Path(__file__).resolve().parents[1]

BLOCK_TORCH_AND_TRANSFORMERS = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} is blocked in this process")
sys.meta_path.insert(0, _Block())
"""


@pytest.mark.integration
@pytest.mark.parametrize(
    "argv", [["--help"], ["caption", "--help"], ["evaluate", "--help"], ["convert", "--help"]]
)
def test_help_imports_neither_torch_nor_transformers(argv) -> None:
    import sys

    code = (
        BLOCK_TORCH_AND_TRANSFORMERS
        + f"import sys; from lavcap_cli import main; sys.argv = ['lavcap', *{argv!r}]; main()"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch" not in result.stderr
    if argv == ["--help"]:
        for command in ("caption", "demo", "train", "evaluate", "convert", "push-to-hub"):
            assert command in result.stdout


@pytest.mark.integration
def test_import_lavcap_hf_still_registers_the_auto_classes() -> None:
    import sys

    code = "import lavcap_hf; from transformers import AutoConfig; print(type(AutoConfig.for_model('lavcap')).__name__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "LavCapConfig"


def test_light_parser_choices_are_written_from_the_package() -> None:
    """lavcap_cli/choices.py is what scripts/write_cli_choices.py writes from lavcap_hf today, and the parsers offer
    exactly those choices."""
    import lavcap_cli
    from lavcap_hf.data.clips import DEFAULT_COLUMNS
    from lavcap_hf.model.configuration_lavcap import FUSION_TYPES
    from lavcap_hf.quantization import QUANTIZE_CHOICES

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from write_cli_choices import CHOICES_FILE, choices_source
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert CHOICES_FILE.read_text(encoding="utf-8") == choices_source(), (
        "run python scripts/write_cli_choices.py"
    )
    assert lavcap_cli.FUSION_TYPES == FUSION_TYPES and lavcap_cli.DEFAULT_COLUMNS == DEFAULT_COLUMNS
    assert lavcap_cli.QUANTIZE_CHOICES == QUANTIZE_CHOICES
    convert = lavcap_cli.build_parser()._subparsers._group_actions[0].choices["convert"]
    assert tuple(next(a for a in convert._actions if a.dest == "fusion_type").choices) == FUSION_TYPES


def test_no_output_file_is_written_when_nothing_was_captioned(model_dir, media_dir, tmp_path, capsys) -> None:
    output = tmp_path / "captions.jsonl"
    bad = [str(media_dir / "not_media.mp4"), str(media_dir / "silent_video.mp4")]
    assert main(["caption", *bad, "--model", str(model_dir), "--output", str(output), "--quiet"]) == 1
    assert not output.exists()
    assert "captioned 0 of 2 file(s)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no part, identity or lock file left either


def test_audio_files_are_captioned_with_the_visual_input_absent(
    model_dir, media_dir, tmp_path, capsys
) -> None:
    """An audio-visual model captions a file without a video stream as `lavcap evaluate --modality-test` captions
    its no-visual condition: every frame embedding zero, in place of the vision tower's output."""
    rng = np.random.default_rng(3)
    audio = 0.3 * np.sin(2 * np.pi * 440 * np.arange(32000) / 16000) + 0.01 * rng.standard_normal(32000)
    write_media(tmp_path / "voice.wav", None, 10, audio.astype(np.float32), 16000)
    output = tmp_path / "captions.jsonl"
    paths = [str(media_dir / "one.mp4"), str(tmp_path / "voice.wav")]  # one batch of both kinds
    generation = ["--batch-size", "2", "--num-beams", "2", "--max-new-tokens", "4", "--quiet"]
    assert main(["caption", *paths, "--model", str(model_dir), "--output", str(output), *generation]) == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["path"] for row in rows] == paths
    assert (
        "1 of them had no video stream and were captioned with the visual input absent"
        in capsys.readouterr().err
    )

    captioner = pipeline("audio-visual-captioning", model=str(model_dir), device="cpu")
    config = captioner.model.config
    decoded = load_media(paths[1], need_frames=False)
    no_visual = np.zeros((config.num_frames, config.visual_embed_dim), dtype=np.float32)
    expected = captioner(
        [paths[0], {"audio": decoded.audio, "sampling_rate": 16000, "video_embeds": no_visual}],
        num_beams=2,
        max_new_tokens=4,
    )
    assert [row["caption"] for row in rows] == [result[0]["caption"] for result in expected]


@pytest.fixture(scope="module")
def model_with_decoding(model_dir, tmp_path_factory) -> Path:
    """The tiny model with a generation_config.json of its own: 3 beams, at most 5 new tokens."""
    folder = tmp_path_factory.mktemp("decoding") / "model"
    shutil.copytree(model_dir, folder)
    config = GenerationConfig.from_pretrained(folder)
    config.num_beams, config.max_new_tokens = 3, 5
    config.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("output_name", [None, "captions.jsonl"])
def test_caption_decodes_as_the_models_generation_config_unless_told_otherwise(
    output_name, model_with_decoding, media_dir, tmp_path, monkeypatch, capsys
) -> None:
    settings = record_generation_settings(monkeypatch)
    output = ["--output", str(tmp_path / output_name)] if output_name else []
    command = ["caption", str(media_dir / "one.mp4"), "--model", str(model_with_decoding), *output, "--quiet"]
    assert main(command) == 0
    assert settings == [{"num_beams": 3, "max_new_tokens": 5}]
    out = (tmp_path / output_name).read_text() if output_name else capsys.readouterr().out
    assert len(json.loads(out)["caption"].split()) <= 5  # one word per token

    settings.clear()
    assert main([*command, "--num-beams", "2"]) == 0
    assert main([*command, "--max-new-tokens", "2"]) == 0
    assert settings == [{"num_beams": 2, "max_new_tokens": 5}, {"num_beams": 3, "max_new_tokens": 2}]


@pytest.mark.parametrize(
    "command",
    [["caption", "a.mp4", "--model", "m"], ["evaluate", "--model", "m", "--data", "d", "--output-dir", "o"]],
)
def test_decoding_options_default_to_the_models_generation_config(command) -> None:
    args = parse_command_line(command)
    assert args.num_beams is None and args.max_new_tokens is None


def test_the_program_leaves_the_process_group_its_command_ran_in(
    model_dir, media_dir, tmp_path, monkeypatch
) -> None:
    """Run as the program (each process of `accelerate launch` runs `lavcap`), a command that ended destroys the
    process group: left to interpreter exit, gloo's worker threads can abort a finished run (SIGABRT). A one-process
    gloo group stands in for the launch."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        argv = ["lavcap", "caption", str(media_dir / "one.mp4"), "--model", str(model_dir), "--quiet"]
        monkeypatch.setattr(sys, "argv", argv)
        assert main() == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
