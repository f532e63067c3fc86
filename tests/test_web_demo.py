"""The web demo (`lavcap app`, `app/app.py`): its functions without a browser, then the page served on a local port
and driven in headless Chromium, and eight concurrent requests through the Gradio client."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib
from helpers import save_scene_model
from PIL import Image
from transformers import GenerationConfig, pipeline
from web_app_driver import (
    caption_in_page,
    chromium,
    image_size,
    running_app,
    wait_for_caption,
    wait_for_status,
    wait_until_no_toast,
)

from lavcap_hf.apps import web_demo
from lavcap_hf.captioning.plotting import ot_plan_figure, plot_ot_plan
from lavcap_hf.data.media_encoding import write_media
from lavcap_hf.data.synthetic import synthesize_scene
from lavcap_hf.model.media_decoding import load_media

ROOT = Path(__file__).resolve().parents[1]
TASK = "audio-visual-captioning"
# The tiny model's own decoding (its saved generation_config.json): values no default of the page or of
# transformers has, so that controls starting there can only have read them from the model.
MODEL_BEAMS, MODEL_MAX_NEW_TOKENS = 3, 13


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-model")
    save_scene_model(folder)
    generation = GenerationConfig.from_pretrained(folder)
    generation.num_beams, generation.max_new_tokens = MODEL_BEAMS, MODEL_MAX_NEW_TOKENS
    generation.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """A 2.5 s synthesised scene (longer than the tiny model's 1.28 s window), the same sound under 4 s of video, a
    video without sound, a text file named .mp4 and a cut-off mp4."""
    folder = tmp_path_factory.mktemp("media")
    audio, frames = synthesize_scene("chirps", "beach", np.random.default_rng(3), duration_s=2.5)
    _, long_frames = synthesize_scene("chirps", "beach", np.random.default_rng(3), duration_s=4.0)
    names = ("scene.mp4", "long_video.mp4", "silent.mp4", "not_media.mp4", "truncated.mp4")
    files = {name: folder / name for name in names}
    write_media(files["scene.mp4"], frames, 10, audio, 16000)
    write_media(files["long_video.mp4"], long_frames, 10, audio, 16000)
    write_media(files["silent.mp4"], frames, 10, None, 16000)
    files["not_media.mp4"].write_text("this is text, not a video")
    files["truncated.mp4"].write_bytes(files["scene.mp4"].read_bytes()[:1500])
    return files


@pytest.fixture(scope="module")
def app(tiny_model) -> web_demo.CaptioningApp:
    return web_demo.CaptioningApp(str(tiny_model), device="cpu")


def pipeline_caption(model: Path, path: Path, num_beams: int, max_new_tokens: int) -> str:
    """What `pipeline("audio-visual-captioning")` captions `path` as: the page must show the same."""
    captioner = pipeline(TASK, model=str(model), device="cpu")
    return captioner(str(path), num_beams=num_beams, max_new_tokens=max_new_tokens)[0]["caption"]


# -- without a browser ---------------------------------------------------------------------------------------------


def test_caption_is_the_pipelines_with_plan_frames_and_settings(app, tiny_model, media) -> None:
    view = app.caption(str(media["scene.mp4"]), num_beams=2, max_new_tokens=9)
    assert view.caption == pipeline_caption(tiny_model, media["scene.mp4"], 2, 9)
    assert view.plan_picture is not None and min(view.plan_picture.size) > 100
    assert len(view.frames) == app.num_frames
    assert [label.split(" · ")[0] for _, label in view.frames] == [
        f"frame {i}" for i in range(app.num_frames)
    ]
    assert "`ot_att`" in view.settings and "| beam size | 2 |" in view.settings
    # 2.5 s against a 1.28 s window: the status says only the start was heard and offers the windows.
    assert "first 1.28 s" in view.status and "every window" in view.status


def test_every_window_gives_one_timed_caption_per_window(app, media) -> None:
    view = app.caption(str(media["scene.mp4"]), num_beams=1, max_new_tokens=5, long_audio="windows")
    lines = view.caption.splitlines()
    duration = load_media(
        media["scene.mp4"], need_frames=False
    ).duration  # 2.5 s and the AAC encoder's padding
    assert len(lines) == math.ceil(duration / app.window_seconds) == 2
    assert lines[0].startswith("0.00-1.28 s: ") and lines[1].startswith(f"1.28-{duration:.2f} s: ")
    assert "2 consecutive windows" in view.status


def test_windows_are_counted_from_the_sound_not_the_longer_video(app, media) -> None:
    """4 s of video over 2.56 s of sound: the pipeline windows the sound (2 windows of 1.28 s), and the status
    line says so; counted from the longest stream it said 4."""
    decoded = load_media(media["long_video.mp4"], num_frames=2)
    sound_seconds = len(decoded.audio) / decoded.sampling_rate
    extractor = app.captioner.feature_extractor
    assert len(extractor.split_windows(decoded.audio, decoded.sampling_rate)) == 2
    assert math.ceil(decoded.duration / app.window_seconds) == 4  # the video's length, in windows
    view = app.caption(str(media["long_video.mp4"]), 1, 5, long_audio="windows")
    assert len(view.caption.splitlines()) == 2
    assert "captioned as 2 consecutive windows" in view.status, view.status
    assert f"sound {sound_seconds:.2f} s, video 4.00 s" in view.status
    first_only = app.caption(str(media["long_video.mp4"]), 1, 5).status
    assert f"Its sound is {sound_seconds:.2f} s long" in first_only and "first 1.28 s" in first_only


def failure_outputs(app, path, num_beams=1, max_new_tokens=5, long_audio="first window only") -> str:
    """The page's outputs for a request that fails: no caption, picture or frames, and the reason in the status
    line (returned), under the page's failure title."""
    caption, picture, frames, settings, status = app.handle(path, num_beams, max_new_tokens, long_audio)
    assert (caption, picture, frames) == ("", None, [])
    assert f"| beam size | {num_beams} |" in settings
    assert status.startswith(f"⚠️ **{web_demo.FAILURE_TITLE}** "), status
    return status.removeprefix(f"⚠️ **{web_demo.FAILURE_TITLE}** ")


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        (
            "not_media.mp4",
            r"not\_media.mp4: not a video or sound file, or a damaged one: it could not be read",
        ),
        ("truncated.mp4", "truncated.mp4: not a video or sound file, or a damaged one: it could not be read"),
        ("silent.mp4", "silent.mp4: no sound (no audio stream), and the model captions the sound"),
        (None, "no clip: upload or record a video"),
    ],
)
def test_unusable_uploads_get_a_plain_message_naming_the_problem(app, media, name, problem) -> None:
    path = str(media[name]) if name else None
    message = failure_outputs(app, path)
    assert message.startswith(problem), message
    assert "Errno" not in message and "[" not in message  # FFmpeg's error number is no help to a visitor
    assert str(media["scene.mp4"].parent) not in message  # the server's upload folder is not shown


def test_a_failure_inside_the_pipeline_is_a_message_not_a_crash(app, media) -> None:
    # generate() cannot run num_beams=0
    message = failure_outputs(app, str(media["scene.mp4"]), num_beams=0)
    assert message.startswith("captioning failed (") and message.endswith("the page goes on serving"), message
    assert app.handle(str(media["scene.mp4"]), 1, 5, "first window only")[0]  # and the next request is served


def test_pictures_reach_the_page_as_files_written_once(app, media) -> None:
    """Gradio (6.17) rewrites the cache file of a PIL output on every request, and a visitor still downloading the
    same picture read it cut short ("peer closed connection", seen with 8 concurrent requests for one clip): the
    page gets files named by their content instead, which a second request for the same clip reuses untouched."""
    first = app.handle(str(media["scene.mp4"]), 1, 5, "first window only")
    pictures = [first[1], *(path for path, _ in first[2])]
    assert len(first[2]) == app.num_frames and min(Image.open(first[1]).size) > 100
    written = {path: os.stat(path).st_mtime_ns for path in pictures}
    second = app.handle(str(media["scene.mp4"]), 1, 5, "first window only")
    assert [second[1], *(path for path, _ in second[2])] == pictures
    assert {path: os.stat(path).st_mtime_ns for path in pictures} == written
    assert not [name for name in os.listdir(app.picture_dir) if name.endswith(".part")]


def test_long_clip_notice() -> None:
    assert web_demo.long_clip_notice(1.0, 1.28, None) == ""
    assert "first 10.24 s" in web_demo.long_clip_notice(25.0, 10.24, None)
    assert "3 consecutive windows of 10.24 s" in web_demo.long_clip_notice(25.0, 10.24, 3)
    assert web_demo.long_clip_notice(10.3, 10.24, 1) == ""  # a tail too short for an fbank frame is no window
    with pytest.raises(web_demo.ClipProblem, match=r"too long: 121.0 s.*up to 120 s.*'every window'"):
        web_demo.check_clip_length(121.0, 10.24, 120)
    web_demo.check_clip_length(120.0, 10.24, 120)


def test_decoding_starts_at_the_models_generation_config(app, tiny_model, media) -> None:
    """The controls start at the model's generation_config; on a CPU the page starts with one beam and says so."""
    assert app.captioner.device.type == "cpu"
    assert (app.decoding.num_beams, app.decoding.max_new_tokens) == (1, MODEL_MAX_NEW_TOKENS)
    assert f"model's own {MODEL_BEAMS} beams" in app.decoding.note and "CPU" in app.decoding.note
    own = web_demo.CaptioningApp(str(tiny_model), device="cpu", model_decoding=True)
    assert (own.decoding.num_beams, own.decoding.max_new_tokens, own.decoding.note) == (
        MODEL_BEAMS,
        MODEL_MAX_NEW_TOKENS,
        "",
    )
    view = own.caption(str(media["scene.mp4"]))  # no settings given: the model's
    assert view.caption == pipeline_caption(tiny_model, media["scene.mp4"], MODEL_BEAMS, MODEL_MAX_NEW_TOKENS)
    assert f"| beam size | {MODEL_BEAMS} |" in view.settings
    assert f"| max new tokens | {MODEL_MAX_NEW_TOKENS} |" in view.settings


def test_decoding_defaults_for_a_model_without_max_new_tokens() -> None:
    unset = web_demo.decoding_defaults(GenerationConfig(num_beams=2), on_cpu=False)
    assert (unset.num_beams, unset.max_new_tokens) == (2, web_demo.FALLBACK_MAX_NEW_TOKENS)
    assert "sets no max_new_tokens" in unset.note
    greedy = web_demo.decoding_defaults(GenerationConfig(max_new_tokens=9), on_cpu=True)
    assert (greedy.num_beams, greedy.max_new_tokens, greedy.note) == (1, 9, "")  # nothing faster to choose


def test_too_long_upload_is_refused_before_captioning(tiny_model, media) -> None:
    short = web_demo.CaptioningApp(str(tiny_model), max_seconds=2.0, device="cpu")
    assert re.match(
        r"scene.mp4: too long: 2\.[56] s.*up to 2 s", failure_outputs(short, str(media["scene.mp4"]))
    )


def test_audio_only_model_has_no_plan_picture(tmp_path, media) -> None:
    save_scene_model(tmp_path, fusion_type="audio_only")
    view = web_demo.CaptioningApp(str(tmp_path), device="cpu").caption(str(media["scene.mp4"]), 1, 5)
    assert view.caption and view.plan_picture is None and view.frames == []
    assert "none (audio only)" in view.settings


def test_example_clips_are_synthesised_scenes(tmp_path) -> None:
    clips = web_demo.example_clips(str(tmp_path), count=3)
    assert [(Path(path).name, scene) for path, scene in clips] == [
        ("a_device_beeps_repeatedly_in_a_kitchen.mp4", "a device beeps repeatedly in a kitchen"),
        ("an_engine_hums_in_a_forest.mp4", "an engine hums in a forest"),
        ("steam_hisses_on_a_beach.mp4", "steam hisses on a beach"),
    ]
    decoded = load_media(clips[0][0], num_frames=4)
    assert decoded.duration == pytest.approx(3.0, abs=0.1) and decoded.frames.shape[0] == 4


def test_plan_picture_shows_the_frames_along_their_axis(tmp_path) -> None:
    plan = np.full((4, 8), 1 / 32, dtype=np.float32)
    frames = np.zeros((4, 48, 64, 3), dtype=np.uint8)
    plot_ot_plan(plan, tmp_path / "bare.png")
    plot_ot_plan(plan, tmp_path / "thumbs.png", frames=frames)
    bare, thumbs = (Image.open(tmp_path / f"{n}.png").size for n in ("bare", "thumbs"))
    assert thumbs[0] > bare[0] and thumbs[1] == bare[1]  # a column of thumbnails beside the rows
    with pytest.raises(ValueError, match=r"frames must be uint8 \(4, H, W, 3\).*got \(3, 48, 64, 3\)"):
        plot_ot_plan(plan, tmp_path / "bad.png", frames=frames[:3])


@pytest.mark.parametrize("spread", ["even", "peaked"])
def test_plan_colour_bar_is_in_plain_words_and_numbers(spread) -> None:
    """An almost even plan (float32 rounding around 1/(V*A)) drew its colour bar as "1e-5+1" offsets, stretching
    the rounding noise over the whole scale; the colour bar says what bright means, in plain numbers."""
    rng = np.random.default_rng(0)
    if spread == "even":
        plan = np.full((4, 8), 1 / 32) + rng.normal(0, 1e-8, (4, 8))
    else:
        plan = rng.dirichlet(np.full(8, 0.2), size=4) / 4
    figure = ot_plan_figure(plan.astype(np.float32), title="caption: a bird chirps in a cave")
    figure.draw_without_rendering()
    colour_bar = next(axes for axes in figure.axes if axes.get_label() == "colorbar")
    assert "bright" in colour_bar.get_ylabel() and "even share" in colour_bar.get_ylabel()
    assert colour_bar.yaxis.get_offset_text().get_text() == ""
    labels = [tick.get_text() for tick in colour_bar.get_yticklabels() if tick.get_text()]
    assert labels and all(re.fullmatch(r"\d+(\.\d+)?", label) for label in labels), labels
    low, high = colour_bar.get_ylim()
    assert low == 0 and high >= 2 * 1.0  # an even share (1) at most halfway up: its noise is not contrast
    if spread == "even":
        assert "1" in labels


def test_cli_parses_app_without_importing_torch_or_gradio() -> None:
    code = (
        "import sys, lavcap_cli; a = lavcap_cli.parse_command_line(['app', '--model', 'm', '--port', '7861']);"
        "print(a.model, a.port, a.share, 'torch' in sys.modules, 'gradio' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["m", "7861", "False", "False", "False"]


def test_space_folder_is_complete() -> None:
    readme = (ROOT / "app" / "README.md").read_text()
    front = re.match(r"---\n(.*?)\n---\n", readme, flags=re.S)
    assert front, "app/README.md must start with the Space's YAML front matter"
    settings = dict(line.split(": ", 1) for line in front.group(1).splitlines() if ": " in line)
    assert settings["sdk"] == "gradio" and settings["app_file"] == "app.py"
    assert "create_demo" in (ROOT / "app" / "app.py").read_text()
    # The Space installs from app/requirements.txt alone: it must name every runtime dependency and gradio.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["app"]
    names = {re.split(r"[<>=!~ \[;]", r, maxsplit=1)[0].lower() for r in wanted}
    listed = {
        re.split(r"[<>=!~ \[;]", line, maxsplit=1)[0].lower()
        for line in (ROOT / "app" / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert names <= listed, names - listed


# -- served on a local port -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app_url(tiny_model, tmp_path_factory):
    with running_app(tiny_model, tmp_path_factory.mktemp("app")) as url:
        yield url


VISIBLE_LABEL_BADGES = """
return [...document.querySelectorAll(arguments[0] + ' [data-testid=block-label]')].filter(label => {
    const box = label.getBoundingClientRect();
    return box.width > 1 && box.height > 1 && getComputedStyle(label).visibility !== 'hidden';
}).length;
"""


@pytest.mark.integration
def test_browser_captions_an_upload_and_names_a_broken_one(app_url, tiny_model, media) -> None:
    """A visitor captions a clip with the page's starting settings, then uploads a text file on the same page: the
    reason stays in the status line after every toast has closed, beside no caption or picture of the last clip."""
    from selenium.webdriver.common.by import By

    expected = pipeline_caption(tiny_model, media["scene.mp4"], 1, MODEL_MAX_NEW_TOKENS)
    with chromium() as driver:
        caption_in_page(driver, app_url, media["scene.mp4"])
        # The decoding controls start at the model's generation_config, one beam on this CPU, which the page says.
        starts = {
            slider: driver.find_element(By.CSS_SELECTOR, f"#{slider} input[type=number]").get_attribute(
                "value"
            )
            for slider in ("beams", "tokens")
        }
        assert starts == {"beams": "1", "tokens": str(MODEL_MAX_NEW_TOKENS)}
        note = driver.find_element(By.ID, "decoding-note").text
        assert f"model's own {MODEL_BEAMS} beams" in note and "CPU" in note, note
        # Each example is labelled with the scene it shows (two kitchens looked alike as thumbnails).
        labels = [button.text for button in driver.find_elements(By.CSS_SELECTOR, "#examples button")]
        scenes = [scene for _, scene in web_demo.example_clips(str(media["scene.mp4"].parent / "examples"))]
        assert labels == scenes and len(set(labels)) == web_demo.NUM_EXAMPLES

        assert wait_for_caption(driver) == expected
        width, height = image_size(driver, "#ot-plan")
        assert width > 100 and height > 100
        assert "scene.mp4" in driver.find_element(By.ID, "status").text
        # No label badge over the picture: it covered the start of the picture's title (the caption).
        assert driver.execute_script(VISIBLE_LABEL_BADGES, "#ot-plan") == 0

        caption_in_page(driver, app_url, media["not_media.mp4"], reload=False)
        status = wait_for_status(driver, "not_media.mp4", timeout=120)
        wait_until_no_toast(driver)
        status = driver.find_element(By.ID, "status").text
        assert status.startswith(f"⚠️ {web_demo.FAILURE_TITLE} not_media.mp4: not a video or sound file"), (
            status
        )
        assert "Errno" not in driver.find_element(By.TAG_NAME, "body").text
        assert driver.find_element(By.CSS_SELECTOR, "#caption textarea").get_attribute("value") == ""
        assert not driver.find_elements(By.CSS_SELECTOR, "#ot-plan img, #frames img")


# The Gradio client runs in a process of its own: gradio_client 2.5 (the Gaudi stack's) leaves ~25 threads in the
# process that used it, reading the app's event streams with no timeout until the app stops, and its
# `Client.__del__` joins them. Kept out of the test process, they can neither block it nor be alive in its later
# forks (DataLoader workers); the client's process is bounded by the timeout and leaves with `os._exit`.
CONCURRENT_REQUESTS = """
import json, os, sys
from concurrent.futures import ThreadPoolExecutor
from gradio_client import Client, handle_file

url, clip, *lengths = sys.argv[1:]
client = Client(url, verbose=False)

def request(max_new_tokens):
    job = client.submit(handle_file(clip), 1, int(max_new_tokens), "first window only", api_name="/caption")
    return job.result(timeout=400)[0]

with ThreadPoolExecutor(len(lengths)) as pool:
    answers = list(pool.map(request, lengths))
print(json.dumps(answers), flush=True)
os._exit(0)
"""


@pytest.mark.integration
def test_eight_concurrent_requests_are_all_answered(app_url, tiny_model, media) -> None:
    lengths = range(
        4, 12
    )  # one max_new_tokens per request (the slider starts at 4): answers can be told apart
    env = {
        **os.environ,
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    command = [
        sys.executable,
        "-c",
        CONCURRENT_REQUESTS,
        app_url,
        str(media["scene.mp4"]),
        *map(str, lengths),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads(done.stdout.strip().splitlines()[-1])
    expected = [pipeline_caption(tiny_model, media["scene.mp4"], 1, n) for n in lengths]
    assert answers == expected
