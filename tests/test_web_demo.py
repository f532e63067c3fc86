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

import gradio as gr
import numpy as np
import pytest
import tomllib
from helpers import save_scene_model
from PIL import Image
from transformers import pipeline
from web_app_driver import (
    caption_in_page,
    chromium,
    image_size,
    running_app,
    wait_for_caption,
    wait_for_error,
)

from lavcap_hf import web_demo
from lavcap_hf.media import load_media, write_media
from lavcap_hf.plotting import plot_ot_plan
from lavcap_hf.synthetic import synthesize_scene

ROOT = Path(__file__).resolve().parents[1]
TASK = "audio-visual-captioning"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-model")
    save_scene_model(folder)
    return folder


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """A 2.5 s synthesised scene (longer than the tiny model's 1.28 s window), a video without sound, a text file
    named .mp4 and a cut-off mp4."""
    folder = tmp_path_factory.mktemp("media")
    audio, frames = synthesize_scene("chirps", "beach", np.random.default_rng(3), duration_s=2.5)
    files = {name: folder / name for name in ("scene.mp4", "silent.mp4", "not_media.mp4", "truncated.mp4")}
    write_media(files["scene.mp4"], frames, 10, audio, 16000)
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


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("not_media.mp4", "not_media.mp4: not a readable media file"),
        ("truncated.mp4", "truncated.mp4: "),
        ("silent.mp4", "silent.mp4: no audio stream"),
        (None, "no clip: upload or record a video"),
    ],
)
def test_unusable_uploads_get_a_message_naming_the_problem(app, media, name, problem) -> None:
    path = str(media[name]) if name else None
    with pytest.raises(gr.Error) as raised:
        app.handle(path, 1, 5, "first window only")
    message = raised.value.message
    assert message.startswith(problem), message
    assert str(media["scene.mp4"].parent) not in message  # the server's upload folder is not shown


def test_a_failure_inside_the_pipeline_is_a_message_not_a_crash(app, media) -> None:
    with pytest.raises(gr.Error, match="captioning failed: "):
        app.handle(str(media["scene.mp4"]), 0, 5, "first window only")  # generate() cannot run num_beams=0
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
    assert web_demo.long_clip_notice(1.0, 1.28, "truncate", 120) == ""
    assert "first 10.24 s" in web_demo.long_clip_notice(25.0, 10.24, "truncate", 120)
    assert "3 consecutive windows of 10.24 s" in web_demo.long_clip_notice(25.0, 10.24, "windows", 120)
    for mode in web_demo.LONG_AUDIO_CHOICES.values():
        with pytest.raises(web_demo.ClipProblem, match=r"too long: 121.0 s.*up to 120 s.*'every window'"):
            web_demo.long_clip_notice(121.0, 10.24, mode, 120)


def test_too_long_upload_is_refused_before_captioning(tiny_model, media) -> None:
    short = web_demo.CaptioningApp(str(tiny_model), max_seconds=2.0, device="cpu")
    with pytest.raises(gr.Error, match=r"scene.mp4: too long: 2\.[56] s.*up to 2 s"):
        short.handle(str(media["scene.mp4"]), 1, 5, "every window")


def test_audio_only_model_has_no_plan_picture(tmp_path, media) -> None:
    save_scene_model(tmp_path, fusion_type="audio_only")
    view = web_demo.CaptioningApp(str(tmp_path), device="cpu").caption(str(media["scene.mp4"]), 1, 5)
    assert view.caption and view.plan_picture is None and view.frames == []
    assert "none (audio only)" in view.settings


def test_example_clips_are_synthesised_scenes(tmp_path) -> None:
    paths = web_demo.example_clips(str(tmp_path), count=3)
    assert [Path(p).name for p in paths] == [
        "a_device_beeps_repeatedly_in_a_kitchen.mp4",
        "an_engine_hums_in_a_forest.mp4",
        "steam_hisses_on_a_beach.mp4",
    ]
    decoded = load_media(paths[0], num_frames=4)
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


@pytest.mark.slow
def test_browser_captions_an_upload_and_names_a_broken_one(app_url, tiny_model, media) -> None:
    expected = pipeline_caption(
        tiny_model, media["scene.mp4"], web_demo.DEFAULT_NUM_BEAMS, web_demo.DEFAULT_MAX_NEW_TOKENS
    )
    with chromium() as driver:
        caption_in_page(driver, app_url, media["scene.mp4"])
        assert wait_for_caption(driver) == expected
        width, height = image_size(driver, "#ot-plan")
        assert width > 100 and height > 100
        assert "scene.mp4" in driver.find_element("id", "status").text

        caption_in_page(driver, app_url, media["not_media.mp4"])
        message = wait_for_error(driver, containing="not_media.mp4")
        assert "not_media.mp4: not a readable media file" in message, message


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


@pytest.mark.slow
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
