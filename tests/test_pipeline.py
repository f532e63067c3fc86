"""`pipeline("audio-visual-captioning")` end to end on real media files with tiny saved models.

The pipeline runs from the saved folders in a subprocess that cannot import lavcap_hf (trust_remote_code); its
results are compared with `model.generate` on the same inputs, computed and decoded here with the package.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
from helpers import run_without_package
from transformers import pipeline

from lavcap_hf import (
    FUSION_TYPES,
    AudioVisualCaptioningPipeline,
    LavCapForConditionalGeneration,
    LavCapProcessor,
)
from lavcap_hf.data.media_encoding import write_media
from lavcap_hf.model.media_decoding import load_media
from lavcap_hf.model.optimal_transport import OT_FUSION_TYPES
from lavcap_hf.testing.configs import tiny_lavcap_config
from lavcap_hf.testing.tokenizers import word_level_tokenizer

TASK = "audio-visual-captioning"
RATE = 44100
SECONDS = 1.2
# Saved as the model's generation config: a call without generation arguments must use it.
DEFAULT_NEW_TOKENS = 5
LENGTHS = (2, 6)


def stereo_tone(left_hz: float, right_hz: float, seconds: float = SECONDS) -> np.ndarray:
    """float32 (samples, 2) at 44.1 kHz, a different tone in each channel."""
    time = np.arange(int(seconds * RATE)) / RATE
    return (
        0.4 * np.stack([np.sin(2 * np.pi * left_hz * time), np.sin(2 * np.pi * right_hz * time)], 1)
    ).astype(np.float32)


def noise_frames(count: int, seed: int, height: int = 48, width: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def tiny_model(fusion_type: str, seed: int) -> tuple[LavCapForConditionalGeneration, LavCapProcessor]:
    """A tiny random LAVCap model and its processor."""
    tokenizer = word_level_tokenizer(["a dog barks", "rain falls on a roof"])
    config = tiny_lavcap_config(fusion_type, vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    model = LavCapForConditionalGeneration(config).eval()
    model.generation_config.max_new_tokens = DEFAULT_NEW_TOKENS
    return model, LavCapProcessor.from_model_config(config, tokenizer)


def save_model(folder: Path, fusion_type: str, seed: int) -> None:
    """`tiny_model` saved into one folder, model and processor together."""
    model, processor = tiny_model(fusion_type, seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Saved models (`av_model`: ot_att, `audio_model`: audio_only), media files and array inputs."""
    root = tmp_path_factory.mktemp("pipeline")
    save_model(root / "av_model", "ot_att", seed=0)
    save_model(root / "audio_model", "audio_only", seed=1)
    write_media(root / "clip.mp4", noise_frames(12, 0), 10, stereo_tone(440, 660), RATE)
    write_media(root / "clip.mkv", noise_frames(12, 1), 10, stereo_tone(300, 1200), RATE)
    write_media(root / "clip.webm", noise_frames(12, 2), 10, stereo_tone(2000, 150), RATE)
    write_media(root / "sound.wav", None, 10, stereo_tone(500, 700), RATE)
    write_media(root / "silent.mp4", noise_frames(12, 3), 10, None, RATE)
    (root / "notes.mp4").write_text("not a video\n" * 100)
    data = (root / "clip.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    np.savez(
        root / "arrays.npz",
        audio=stereo_tone(800, 350),
        frames=noise_frames(4, 4, 40, 56),
        video_embeds=np.random.default_rng(5).standard_normal((4, 32)).astype(np.float32),
    )
    return root


# Runs in the subprocess: every pipeline call of this module, results pickled to results.pkl.
PIPELINE_SCRIPT = """
import pickle
import numpy as np
from transformers import pipeline

try:
    import lavcap_hf
    raise SystemExit("lavcap_hf should not be importable here")
except ImportError:
    pass

root = {root!r}
av_pipe = pipeline({task!r}, model=root + "/av_model", trust_remote_code=True)
audio_pipe = pipeline({task!r}, model=root + "/audio_model", trust_remote_code=True)
arrays = np.load(root + "/arrays.npz")
clips = [root + "/clip.mp4", root + "/clip.mkv", root + "/clip.webm"]
results = {{
    "classes": [type(p).__module__ + "." + type(p).__name__ for p in (av_pipe, audio_pipe)],
    "single": av_pipe(clips[0]),
    "list": av_pipe(clips, batch_size=2, return_ot_plan=True),
    "beams": av_pipe(clips[0], num_beams=2, max_new_tokens=4),
    "generate_kwargs": av_pipe(clips[0], generate_kwargs={{"max_new_tokens": 3}}),
    "frames": av_pipe({{"audio": arrays["audio"], "sampling_rate": {rate}, "frames": arrays["frames"]}}),
    "embeds": av_pipe({{"audio": arrays["audio"], "sampling_rate": {rate}, "video_embeds": arrays["video_embeds"]}}),
    "wav": audio_pipe(root + "/sound.wav"),
}}
for length in {lengths!r}:
    results[length] = av_pipe(clips[0], max_new_tokens=length, min_new_tokens=length)
errors = {{}}
for name, pipe, path in [
    ("missing", av_pipe, root + "/missing.mp4"),
    ("not media", av_pipe, root + "/notes.mp4"),
    ("truncated", av_pipe, root + "/truncated.mp4"),
    ("no audio", av_pipe, root + "/silent.mp4"),
    ("no video", av_pipe, root + "/sound.wav"),
    ("audio model, no audio", audio_pipe, root + "/silent.mp4"),
]:
    try:
        pipe(path)
        errors[name] = None
    except Exception as error:
        errors[name] = (isinstance(error, ValueError), type(error).__module__, str(error))
results["errors"] = errors
with open(root + "/results.pkl", "wb") as f:
    pickle.dump(results, f)
"""


@pytest.fixture(scope="module")
def remote(workdir) -> dict[str, Any]:
    """Results of the pipeline calls made without the package installed."""
    script = PIPELINE_SCRIPT.format(root=str(workdir), task=TASK, rate=RATE, lengths=LENGTHS)
    output = run_without_package(script, workdir)
    # Every loader got trust_remote_code; none asked for it on stdin.
    assert "Do you wish to run the custom code" not in output
    with open(workdir / "results.pkl", "rb") as f:
        return pickle.load(f)


class Reference:
    """`model.generate` on processor outputs, decoded by hand: what the pipeline must return."""

    def __init__(self, model: LavCapForConditionalGeneration, processor: LavCapProcessor) -> None:
        self.model = model
        self.processor = processor

    @classmethod
    def from_folder(cls, folder: Path) -> Reference:
        return cls(
            LavCapForConditionalGeneration.from_pretrained(folder).eval(),
            LavCapProcessor.from_pretrained(folder),
        )

    def inputs(self, path: Path | None = None, **arrays: Any) -> dict[str, torch.Tensor]:
        """Model inputs of one clip: a file decoded with `load_media`, or arrays given to the processor."""
        if path is not None:
            extractor = self.processor.feature_extractor
            decoded = load_media(
                path,
                sampling_rate=extractor.sampling_rate,
                num_frames=extractor.num_frames,
                need_audio=self.model.config.uses_audio,
                need_frames=self.model.config.uses_visual,
            )
            arrays = {
                "audio": decoded.audio,
                "sampling_rate": decoded.sampling_rate,
                "videos": decoded.frames,
            }
        return self.processor(**arrays)

    def caption(self, inputs: dict[str, torch.Tensor], **generate_kwargs: Any) -> tuple[str, int]:
        """(caption, number of generated tokens)."""
        with torch.no_grad():
            sequences = self.model.generate(**inputs, **generate_kwargs)
        length = inputs["input_ids"].shape[1]
        new = sequences[0, length:]
        caption = self.processor.tokenizer.decode(new, skip_special_tokens=True).strip()
        return caption, len(new)

    def ot_plan(self, inputs: dict[str, torch.Tensor]) -> np.ndarray:
        media = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        with torch.no_grad():
            return self.model.get_multimodal_features(**media, output_ot_plan=True).ot_plan[0].numpy()


@pytest.fixture(scope="module")
def av_reference(workdir) -> Reference:
    return Reference.from_folder(workdir / "av_model")


@pytest.mark.integration
def test_pipeline_loads_from_the_folder_without_the_package(remote) -> None:
    for name in remote["classes"]:
        assert name.endswith(".AudioVisualCaptioningPipeline")
        assert not name.startswith("lavcap_hf")


INSTALLED_SCRIPT = """
import sys
import lavcap_hf
from transformers import AutoModel, AutoProcessor, pipeline

folder = sys.argv[1]
pipe = pipeline({task!r}, model=folder)
model = AutoModel.from_pretrained(folder)
processor = AutoProcessor.from_pretrained(folder)
for loaded in (type(pipe), type(pipe.model), type(model), type(processor)):
    print(loaded.__module__ + "." + loaded.__name__)
print("caption: " + pipe(sys.argv[2])[0]["caption"])
"""


@pytest.mark.integration
def test_installed_package_loads_the_folder_without_remote_code(workdir, av_reference) -> None:
    """With lavcap_hf installed, the folder's own copy of the code (saved for users without the package) is not
    needed: no `trust_remote_code`, and the installed classes run. stdin is closed, so a question would fail."""
    folder, clip = workdir / "av_model", workdir / "clip.mp4"
    result = subprocess.run(
        [sys.executable, "-c", INSTALLED_SCRIPT.format(task=TASK), str(folder), str(clip)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(workdir / "installed_modules")},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    *classes, caption = result.stdout.splitlines()[-5:]
    assert all(name.startswith("lavcap_hf.") for name in classes), classes
    assert caption == "caption: " + av_reference.caption(av_reference.inputs(clip))[0]
    assert not (workdir / "installed_modules").exists()  # no remote module was imported


def test_written_mp4_has_h264_video_and_44k_stereo_aac(workdir) -> None:
    with av.open(str(workdir / "clip.mp4")) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert video.codec_context.name in ("h264", "mpeg4")
        assert audio.codec_context.name == "aac"
        assert audio.codec_context.sample_rate == RATE
        assert audio.codec_context.channels == 2


def test_single_path_uses_the_saved_generation_config(remote, av_reference, workdir) -> None:
    expected, new_tokens = av_reference.caption(av_reference.inputs(workdir / "clip.mp4"))
    assert new_tokens <= DEFAULT_NEW_TOKENS
    assert remote["single"] == [{"caption": expected}]


def test_list_of_paths_in_batches_keeps_input_order(remote, av_reference, workdir) -> None:
    results = remote["list"]
    assert len(results) == 3
    plans = []
    for result, name in zip(results, ["clip.mp4", "clip.mkv", "clip.webm"], strict=True):
        assert isinstance(result, list) and len(result) == 1
        inputs = av_reference.inputs(workdir / name)
        assert result[0]["caption"] == av_reference.caption(inputs)[0], name
        np.testing.assert_allclose(result[0]["ot_plan"], av_reference.ot_plan(inputs), atol=1e-5, rtol=0)
        plans.append(result[0]["ot_plan"])
    # The clips differ, so their plans do: the comparison above would notice swapped results.
    assert not np.allclose(plans[0], plans[1], atol=1e-4) and not np.allclose(plans[1], plans[2], atol=1e-4)


def test_ot_plan_has_the_sinkhorn_marginals(remote, av_reference) -> None:
    audio, video = av_reference.model.config.placeholder_counts
    for result in remote["list"]:
        plan = result[0]["ot_plan"]
        assert plan.shape == (video, audio) and plan.dtype == np.float32
        np.testing.assert_allclose(plan.sum(axis=1), np.full(video, 1 / video), atol=1e-5, rtol=0)
        np.testing.assert_allclose(plan.sum(axis=0), np.full(audio, 1 / audio), atol=1e-5, rtol=0)


def test_dict_inputs_with_frames_or_video_embeds(remote, av_reference, workdir) -> None:
    arrays = np.load(workdir / "arrays.npz")
    common = {"audio": arrays["audio"], "sampling_rate": RATE}
    with_frames = av_reference.inputs(**common, videos=arrays["frames"])
    with_embeds = av_reference.inputs(**common, video_embeds=arrays["video_embeds"])
    assert remote["frames"] == [{"caption": av_reference.caption(with_frames)[0]}]
    assert remote["embeds"] == [{"caption": av_reference.caption(with_embeds)[0]}]


def test_generation_arguments_pass_through(remote, av_reference, workdir) -> None:
    inputs = av_reference.inputs(workdir / "clip.mp4")
    captions = {}
    for length in LENGTHS:
        captions[length], new_tokens = av_reference.caption(
            inputs, max_new_tokens=length, min_new_tokens=length
        )
        assert new_tokens == length
        assert remote[length] == [{"caption": captions[length]}]
    assert len(captions[LENGTHS[1]]) > len(captions[LENGTHS[0]])
    beams = av_reference.caption(inputs, num_beams=2, max_new_tokens=4)[0]
    assert remote["beams"] == [{"caption": beams}]
    assert remote["generate_kwargs"] == [{"caption": av_reference.caption(inputs, max_new_tokens=3)[0]}]


def test_audio_only_model_captions_a_wav(remote, workdir) -> None:
    reference = Reference.from_folder(workdir / "audio_model")
    expected = reference.caption(reference.inputs(workdir / "sound.wav"))[0]
    assert remote["wav"] == [{"caption": expected}]


@pytest.mark.parametrize(
    ("name", "file", "problem"),
    [
        ("missing", "missing.mp4", "file not found"),
        ("not media", "notes.mp4", "not a readable media file"),
        ("truncated", "truncated.mp4", "corrupt data"),
        ("no audio", "silent.mp4", "no audio stream"),
        ("no video", "sound.wav", "no video stream"),
        ("audio model, no audio", "silent.mp4", "no audio stream"),
    ],
)
def test_bad_files_raise_value_errors_naming_file_and_problem(remote, workdir, name, file, problem) -> None:
    assert remote["errors"][name] is not None, f"{name}: no error raised"
    is_value_error, module, message = remote["errors"][name]
    assert is_value_error, (module, message)
    assert not module.startswith("av"), message
    assert message.startswith(str(workdir / file)), message
    assert problem in message


@pytest.mark.parametrize("fusion_type", FUSION_TYPES)
def test_every_fusion_type_captions_a_video_in_process(fusion_type: str, workdir) -> None:
    reference = Reference(*tiny_model(fusion_type, seed=2))
    pipe = pipeline(TASK, model=reference.model, processor=reference.processor)
    assert isinstance(pipe, AudioVisualCaptioningPipeline)
    expected = reference.caption(reference.inputs(workdir / "clip.mp4"), max_new_tokens=3)[0]
    assert pipe(str(workdir / "clip.mp4"), max_new_tokens=3) == [{"caption": expected}]
    if fusion_type not in OT_FUSION_TYPES:
        with pytest.raises(ValueError, match="no OT plan"):
            pipe(str(workdir / "clip.mp4"), max_new_tokens=1, return_ot_plan=True)
        return
    # With the plan: the same caption from a single front-end pass (the plan and the prompt embeddings share it).
    front_end_calls = []
    encode = reference.model.model.get_multimodal_features

    def counted_encode(*args, **kwargs):
        front_end_calls.append(1)
        return encode(*args, **kwargs)

    reference.model.model.get_multimodal_features = counted_encode
    try:
        result = pipe(str(workdir / "clip.mp4"), max_new_tokens=3, return_ot_plan=True)
    finally:
        del reference.model.model.get_multimodal_features
    config = reference.model.config
    assert result[0]["caption"] == expected
    assert result[0]["ot_plan"].shape == (config.num_frames, config.num_audio_tokens)
    assert len(front_end_calls) == 1


# -- several return sequences, batches and generation defaults --------------------------------------------------

CLIPS = ("clip.mp4", "clip.mkv", "clip.webm")


def reference_captions(
    reference: Reference, inputs: dict[str, torch.Tensor], **generate_kwargs: Any
) -> list[str]:
    """Every returned sequence of `model.generate` on one clip alone, decoded after the prompt."""
    with torch.no_grad():
        sequences = reference.model.generate(**inputs, **generate_kwargs)
    return reference.processor.batch_decode(sequences, prompt_length=inputs["input_ids"].shape[1])


@pytest.fixture(scope="module")
def av_pipe(av_reference):
    return pipeline(TASK, model=av_reference.model, processor=av_reference.processor)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_each_clip_gets_its_own_return_sequences_at_any_batch_size(
    av_pipe, av_reference, workdir, batch_size
) -> None:
    """As the text-generation pipeline: a list of n dicts per input, the clip's own n best beams in order."""
    settings = {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 4}
    results = av_pipe([str(workdir / name) for name in CLIPS], batch_size=batch_size, **settings)
    expected = [reference_captions(av_reference, av_reference.inputs(workdir / n), **settings) for n in CLIPS]
    assert [[r["caption"] for r in result] for result in results] == expected
    assert all(set(r) == {"caption"} for result in results for r in result)
    # Each clip's beams differ from each other and the clips' from another clip's, so rows handed to the wrong clip
    # or beam would be noticed.
    assert all(len(set(captions)) == len(captions) for captions in expected)
    assert len({tuple(captions) for captions in expected}) > 1


def test_each_caption_is_paired_with_its_clips_ot_plan(av_pipe, av_reference, workdir) -> None:
    settings = {"num_beams": 2, "num_return_sequences": 2, "max_new_tokens": 3}
    paths = [str(workdir / name) for name in CLIPS]
    results = av_pipe(paths, batch_size=3, return_ot_plan=True, **settings)
    for result, name in zip(results, CLIPS, strict=True):
        inputs = av_reference.inputs(workdir / name)
        assert [r["caption"] for r in result] == reference_captions(av_reference, inputs, **settings)
        for caption in result:
            np.testing.assert_allclose(caption["ot_plan"], av_reference.ot_plan(inputs), atol=1e-5, rtol=0)


def test_windows_keep_their_return_sequences_together(av_pipe, av_reference, tmp_path) -> None:
    """`long_audio="windows"` with n sequences: window after window, each window's n captions with its timestamp,
    batched or not."""
    path = tmp_path / "long.mp4"
    write_media(path, noise_frames(30, 7), 10, stereo_tone(440, 880, seconds=3.0), RATE)
    settings = {"num_beams": 2, "num_return_sequences": 2, "max_new_tokens": 3}
    results = av_pipe(str(path), long_audio="windows", **settings)
    processor, extractor = av_reference.processor, av_reference.processor.feature_extractor
    audio = load_media(path, sampling_rate=extractor.sampling_rate, need_frames=False).audio
    windows = extractor.split_windows(audio, extractor.sampling_rate)
    spans = list(dict.fromkeys(r["timestamp"] for r in results))
    assert len(windows) == len(spans) == 3
    frames = load_media(path, num_frames=extractor.num_frames, need_audio=False, frame_spans=spans).frames
    expected = []
    for index, (window, span) in enumerate(zip(windows, spans, strict=True)):
        window_frames = frames[index * extractor.num_frames : (index + 1) * extractor.num_frames]
        inputs = processor(audio=window, sampling_rate=extractor.sampling_rate, videos=window_frames)
        expected += [
            {"caption": c, "timestamp": span} for c in reference_captions(av_reference, inputs, **settings)
        ]
    assert results == expected
    assert av_pipe([str(path)] * 2, batch_size=4, long_audio="windows", **settings) == [expected] * 2


@pytest.fixture(scope="module")
def beam_folder(tmp_path_factory) -> Path:
    """A tiny model whose saved generation_config.json decodes with 3 beams and at most 5 new tokens."""
    folder = tmp_path_factory.mktemp("beams") / "model"
    # (A seed whose captions differ between these settings on both stacks; the test checks that they do.)
    model, processor = tiny_model("ot_att", seed=2)
    model.generation_config.num_beams = 3
    model.generation_config.max_new_tokens = 5
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_the_models_generation_config_gives_the_defaults_and_arguments_override_it(
    beam_folder, workdir
) -> None:
    reference = Reference.from_folder(beam_folder)
    assert reference.model.generation_config.num_beams == 3  # read back from generation_config.json
    inputs = reference.inputs(workdir / "clip.mp4")
    saved = reference_captions(reference, inputs, num_beams=3, max_new_tokens=5)
    greedy = reference_captions(reference, inputs, num_beams=1, max_new_tokens=5)
    library_defaults = reference_captions(reference, inputs, num_beams=1, max_new_tokens=20)
    assert len({saved[0], greedy[0], library_defaults[0]}) == 3  # the checks below can tell them apart
    pipe = pipeline(TASK, model=str(beam_folder))
    assert pipe(str(workdir / "clip.mp4")) == [{"caption": saved[0]}]
    assert pipe(str(workdir / "clip.mp4"), num_beams=1) == [{"caption": greedy[0]}]
    assert pipe(str(workdir / "clip.mp4"), generate_kwargs={"num_beams": 1}) == [{"caption": greedy[0]}]
    # Arguments given when the pipeline is built hold for every call, beside the call's own.
    built = pipeline(TASK, model=str(beam_folder), max_new_tokens=20)
    assert built(str(workdir / "clip.mp4"), num_beams=1) == [{"caption": library_defaults[0]}]
    with pytest.raises(ValueError, match="given twice"):
        pipe(str(workdir / "clip.mp4"), num_beams=1, generate_kwargs={"num_beams": 2})
