"""`lavcap app`: a Gradio page (usable as a Hugging Face Space, `app/app.py`) that captions one clip.

Built on `pipeline("audio-visual-captioning")`: the visitor uploads or records a video (or picks one of the clips
synthesised at start-up) and gets the caption, a picture of the OT plan (frames x audio tokens, the frames as
thumbnails along their axis), the sampled frames, and the fusion type and decoding settings. The decoding controls
start at the model's `generation_config` (on a CPU with one beam, which the page says). An unusable upload (not
media, no audio stream, too long) or a failed captioning empties the outputs and leaves a plain-language message
naming the file and the problem in the status line until the next request; requests wait in a queue.

With no model named it serves the demo's trained model (`lavcap demo`), training it first where it is missing, so
it runs on a fresh machine with nothing downloaded. Tooling: no model file imports this module.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

# Set before gradio is imported: the page must not report usage anywhere.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
from transformers import pipeline  # noqa: E402

from ..captioning.plotting import plot_ot_plan  # noqa: E402
from ..data.media_encoding import write_media
from ..data.synthetic import PLACES, SOUNDS, make_caption, synthesize_scene  # noqa: E402
from ..model.media_decoding import MediaError, load_media  # noqa: E402
from ..model.pipeline_lavcap import TASK  # noqa: E402
from ..quantization import pipeline_placement  # noqa: E402

logger = logging.getLogger(__name__)

DEMO_OUTPUT = "lavcap_demo"
DEFAULT_MODEL = os.path.join(DEMO_OUTPUT, "model-ot_att")
MAX_CLIP_SECONDS = 120.0  # longer uploads are refused: decoding and captioning them would hold the queue
LONG_AUDIO_CHOICES = {"first window only": "truncate", "every window": "windows"}
LONG_AUDIO_LABELS = {mode: choice for choice, mode in LONG_AUDIO_CHOICES.items()}
QUEUE_CONCURRENCY = 1  # one captioning at a time; the others wait their turn in the queue
QUEUE_MAX_SIZE = 64
NUM_EXAMPLES = 6
# The decoding sliders' ends (or the model's own setting where it is beyond them).
MAX_BEAMS = 8
MIN_NEW_TOKENS, MAX_NEW_TOKENS_LIMIT = 4, 256
# The max-new-tokens slider's start for a model whose generation_config sets no max_new_tokens (the page says so).
FALLBACK_MAX_NEW_TOKENS = 30
THUMBNAIL_HEIGHT = 160
# The status line shows the video's length beside the sound's when the video is longer by more than this.
LENGTHS_DIFFER_SECONDS = 0.1
FAILURE_TITLE = "This clip cannot be captioned."
# What the page says for the problems `load_media` names (keyed by the start of `MediaError.problem`).
PLAIN_PROBLEMS = {
    "not a readable media file": "not a video or sound file, or a damaged one: it could not be read",
    "no audio stream": "no sound (no audio stream), and the model captions the sound: choose a clip with sound",
    "no video stream": "no picture (no video stream), and this model also looks at the frames: choose a video",
    "audio stream is empty": "the sound track is empty",
    "audio contains NaN": "the sound track is damaged (it holds invalid samples)",
    "video stream has no frames": "the video track has no frames",
    "no decodable video frames": "none of the video's frames could be read",
    "not a readable image": "not a picture that could be read",
}


class ClipProblem(ValueError):
    """An upload that cannot be captioned; the message names the file and the problem, for the page."""


@dataclass(frozen=True)
class DecodingDefaults:
    """Where the page's decoding controls start, and the line that says why where it is not the model's own."""

    num_beams: int
    max_new_tokens: int
    note: str


def decoding_defaults(generation_config: Any, on_cpu: bool) -> DecodingDefaults:
    """The controls' start: the model's `generation_config` (its `num_beams` and `max_new_tokens`), except one beam
    on a CPU, where beam search would make every visitor wait several times longer; `note` says so."""
    num_beams = int(getattr(generation_config, "num_beams", None) or 1)
    max_new_tokens = getattr(generation_config, "max_new_tokens", None)
    notes = []
    if max_new_tokens is None:
        max_new_tokens = FALLBACK_MAX_NEW_TOKENS
        notes.append(
            f"The model's generation_config sets no max_new_tokens: the page starts at {max_new_tokens}."
        )
    if on_cpu and num_beams > 1:
        notes.append(
            f"This page runs on a CPU, so it starts with 1 beam, faster than the model's own {num_beams} beams "
            f"(its generation_config): set the beam size to {num_beams} for the model's own captions."
        )
        num_beams = 1
    return DecodingDefaults(num_beams, int(max_new_tokens), " ".join(notes))


@dataclass
class CaptionView:
    """What the page shows for one captioned clip."""

    caption: str
    plan_picture: Image.Image | None
    frames: list[tuple[Image.Image, str]]
    settings: str
    status: str

    def outputs(self, picture_dir: str) -> tuple[Any, ...]:
        """The page's outputs, with the pictures as files in `picture_dir` (see `picture_file`)."""
        plan = picture_file(self.plan_picture, picture_dir) if self.plan_picture is not None else None
        frames = [(picture_file(image, picture_dir), label) for image, label in self.frames]
        return self.caption, plan, frames, self.settings, self.status


def picture_file(image: Image.Image, folder: str) -> str:
    """`image` as a PNG in `folder`, named by its content and written once (atomically).

    Returned as PIL images, the pictures would be rewritten into Gradio's cache on every request (6.17 writes a PIL
    output's file even when it exists), so that a visitor still downloading the same picture (the same clip, e.g. an
    example, captioned by two visitors at once) could read it cut short. A file is copied into that cache only once.
    """
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    path = os.path.join(folder, hashlib.sha256(data).hexdigest()[:32] + ".png")
    if not os.path.exists(path):
        staging = f"{path}.{os.getpid()}.{id(buffer)}.part"
        with open(staging, "wb") as f:
            f.write(data)
        os.replace(staging, path)
    return path


def resolve_model(model: str | None) -> str:
    """`model`, or the demo's trained model, trained first (`lavcap demo`'s defaults) where it is missing."""
    if model:
        return model
    if not os.path.isfile(os.path.join(DEFAULT_MODEL, "config.json")):
        from .demo import run_demo

        print(
            f"no model given and {DEFAULT_MODEL} is missing: training the demo's models first (a few minutes)"
        )
        run_demo(DEMO_OUTPUT)
    return DEFAULT_MODEL


def check_clip_length(duration: float, window_seconds: float, max_seconds: float) -> None:
    """ClipProblem for a clip (its longest stream: decoding costs) longer than `max_seconds`."""
    if duration > max_seconds:
        raise ClipProblem(
            f"too long: {duration:.1f} s, and this page takes clips of up to {max_seconds:.0f} s. Cut it to at most "
            f"{max_seconds:.0f} s; each {window_seconds:.2f} s window can then be captioned with 'every window'."
        )


def long_clip_notice(sound_seconds: float, window_seconds: float, windows: int | None) -> str:
    """The status line about the length of a clip's sound, which is what the model hears and the pipeline cuts into
    windows (a video may go on after its sound ends). `windows`: how many were captioned with "every window", None
    when only the first was captioned."""
    if windows is not None:
        if windows < 2:
            return ""
        return (
            f"Its sound is {sound_seconds:.2f} s long: captioned as {windows} consecutive windows of "
            f"{window_seconds:.2f} s."
        )
    if sound_seconds <= window_seconds:
        return ""
    return (
        f"Its sound is {sound_seconds:.2f} s long and the model hears {window_seconds:.2f} s at a time: this is the "
        f"caption of the first {window_seconds:.2f} s. Choose 'every window' to caption the whole clip window by "
        "window."
    )


def clip_lengths(duration: float, sound_seconds: float | None) -> str:
    """A clip's length for the status line: its sound's, and the video's where that goes on longer. `duration` is
    the longest stream's (`DecodedMedia.duration`), `sound_seconds` None for a clip decoded without its sound."""
    if sound_seconds is None:
        return f"{duration:.2f} s"
    if duration - sound_seconds > LENGTHS_DIFFER_SECONDS:
        return f"sound {sound_seconds:.2f} s, video {duration:.2f} s"
    return f"{sound_seconds:.2f} s"


def plain_problem(problem: str) -> str:
    """`MediaError.problem` in the page's words (`PLAIN_PROBLEMS`); a problem not listed there as it is."""
    return next((text for start, text in PLAIN_PROBLEMS.items() if problem.startswith(start)), problem)


def markdown_text(text: str) -> str:
    """`text` shown as it is in a Markdown component (a file name's `_` or `*` is not emphasis)."""
    return re.sub(r"([\\`*_\[\]<>|~#])", r"\\\1", text)


def frame_gallery(frames: np.ndarray, duration: float) -> list[tuple[Image.Image, str]]:
    """The sampled frames (F, H, W, 3) as thumbnails, each labelled with its index and the time it shows."""
    count = len(frames)
    gallery = []
    for index, frame in enumerate(frames):
        image = Image.fromarray(np.asarray(frame, dtype=np.uint8))
        width = max(1, round(image.width * THUMBNAIL_HEIGHT / image.height))
        # Frame i is the one shown at the centre of the i-th of F equal segments of the clip (`load_media`).
        seconds = (index + 0.5) * duration / count
        gallery.append((image.resize((width, THUMBNAIL_HEIGHT)), f"frame {index} · {seconds:.2f} s"))
    return gallery


def plan_picture(plan: np.ndarray, frames: np.ndarray | None, title: str) -> Image.Image:
    """The OT plan (V, A) drawn by `plot_ot_plan`, as an image."""
    buffer = io.BytesIO()
    plot_ot_plan(plan, buffer, title=title, frames=frames)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def example_clips(folder: str, count: int = NUM_EXAMPLES, seed: int = 1234) -> list[tuple[str, str]]:
    """Write `count` synthesised clips (3 s, a sound in a place, each pair different) to `folder`; (path, what the
    clip shows, e.g. "a bird chirps in a cave") of each, the second to label it on the page."""
    os.makedirs(folder, exist_ok=True)
    places = list(PLACES)
    clips = []
    for index, sound in enumerate(list(SOUNDS)[:count]):
        place = places[index % len(places)]
        audio, frames = synthesize_scene(sound, place, np.random.default_rng([seed, index]), duration_s=3.0)
        scene = make_caption(sound, place)
        path = os.path.join(folder, f"{scene.replace(' ', '_')}.mp4")
        if not os.path.exists(path):
            write_media(path, frames, 10, audio, 16000)
        clips.append((path, scene))
    return clips


class CaptioningApp:
    """The page's work: one `pipeline("audio-visual-captioning")` and the checks around it.

    Args:
        model: model folder or Hub id (model + processor).
        max_seconds: longest clip accepted.
        device: torch device of the pipeline (default: transformers' choice).
        model_decoding: start the decoding controls at the model's own settings even on a CPU (by default a CPU
            starts with one beam: `decoding_defaults`).
        quantize: load the decoder's linear layers in "4bit" or "8bit" (`lavcap_hf.quantization`; default: not).
    """

    def __init__(
        self,
        model: str,
        max_seconds: float = MAX_CLIP_SECONDS,
        device: str | None = None,
        model_decoding: bool = False,
        quantize: str | None = None,
    ) -> None:
        self.model_name = model
        self.max_seconds = max_seconds
        self.quantize = quantize
        self.captioner = pipeline(TASK, model=model, **pipeline_placement(device, quantize))
        on_cpu = self.captioner.device.type == "cpu" and not model_decoding
        self.decoding = decoding_defaults(self.captioner.model.generation_config, on_cpu)
        config = self.captioner.model.config
        self.fusion_type: str = config.fusion_type
        self.uses_audio: bool = config.uses_audio
        self.uses_visual: bool = config.uses_visual
        # The OT fusion types (named ot_*) compute a transport plan between the frames and the audio tokens.
        self.has_plan = self.fusion_type.startswith("ot_")
        extractor = self.captioner.feature_extractor
        self.sampling_rate: int = extractor.sampling_rate
        self.num_frames: int = extractor.num_frames
        self.window_seconds: float = extractor.window_stride / extractor.sampling_rate
        self.picture_dir = tempfile.mkdtemp(prefix="lavcap-app-pictures-")

    def decode(self, path: str | None) -> Any:
        """Decode an upload as the pipeline will; ClipProblem naming the file and the problem if it cannot be."""
        if not path:
            raise ClipProblem("no clip: upload or record a video first (or pick an example)")
        name = os.path.basename(path)
        try:
            return load_media(
                path,
                sampling_rate=self.sampling_rate,
                num_frames=self.num_frames,
                need_audio=self.uses_audio,
                need_frames=self.uses_visual,
            )
        except MediaError as error:
            # The upload's server-side folder means nothing to the visitor: name the file only.
            raise ClipProblem(f"{name}: {plain_problem(error.problem.replace(path, name))}") from error

    def caption(
        self,
        path: str | None,
        num_beams: int | None = None,
        max_new_tokens: int | None = None,
        long_audio: str = "truncate",
    ) -> CaptionView:
        """Caption one uploaded file (decoding settings left None: the page's defaults, `self.decoding`);
        ClipProblem for an unusable upload."""
        if long_audio not in LONG_AUDIO_CHOICES.values():
            raise ClipProblem(f"long clips: choose one of {list(LONG_AUDIO_CHOICES)}")
        num_beams = self.decoding.num_beams if num_beams is None else num_beams
        max_new_tokens = self.decoding.max_new_tokens if max_new_tokens is None else max_new_tokens
        start = time.perf_counter()
        media = self.decode(path)
        name = os.path.basename(path)
        try:
            check_clip_length(media.duration, self.window_seconds, self.max_seconds)
        except ClipProblem as problem:
            raise ClipProblem(f"{name}: {problem}") from problem
        results = self.captioner(
            path,
            num_beams=int(num_beams),
            max_new_tokens=int(max_new_tokens),
            long_audio=long_audio,
            return_ot_plan=self.has_plan,
        )
        windowed = long_audio == "windows" and len(results) > 1
        if windowed:
            caption = "\n".join(
                f"{r['timestamp'][0]:.2f}-{r['timestamp'][1]:.2f} s: {r['caption']}" for r in results
            )
        else:
            caption = results[0]["caption"]
        picture = None
        if self.has_plan:
            picture = self._plan_picture(path, results[0], media, windowed)
        seconds = time.perf_counter() - start
        sound_seconds = None if media.audio is None else len(media.audio) / media.sampling_rate
        lengths = clip_lengths(media.duration, sound_seconds)
        status = f"Captioned **{markdown_text(name)}** ({lengths}) in {seconds:.1f} s."
        if sound_seconds is not None:
            windows = len(results) if long_audio == "windows" else None
            status = f"{status} {long_clip_notice(sound_seconds, self.window_seconds, windows)}".strip()
        return CaptionView(
            caption=caption,
            plan_picture=picture,
            frames=frame_gallery(media.frames, media.duration) if media.frames is not None else [],
            settings=self.settings_table(num_beams, max_new_tokens, long_audio),
            status=status,
        )

    def _plan_picture(self, path: str, result: dict[str, Any], media: Any, windowed: bool) -> Image.Image:
        """The first (or only) window's plan, with the frames that window saw."""
        frames = media.frames
        title = f"caption: {result['caption']}"
        if windowed:
            span = result["timestamp"]
            frames = load_media(path, num_frames=self.num_frames, need_audio=False, frame_spans=[span]).frames
            title = f"{span[0]:.2f}-{span[1]:.2f} s, {title}"
        return plan_picture(result["ot_plan"], frames, title)

    def settings_table(self, num_beams: int, max_new_tokens: int, long_audio: str) -> str:
        rows = {
            "model": f"`{self.model_name}`",
            "fusion type": f"`{self.fusion_type}`",
            "audio window": f"{self.window_seconds:.2f} s",
            "frames": str(self.num_frames) if self.uses_visual else "none (audio only)",
            "beam size": str(int(num_beams)),
            "max new tokens": str(int(max_new_tokens)),
            "long clips": LONG_AUDIO_LABELS.get(long_audio, long_audio),
            "device": str(self.captioner.device),
        }
        if self.quantize:
            rows["language model"] = f"{self.quantize} (bitsandbytes)"
        return "| setting | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows.items())

    def handle(self, path: str | None, num_beams: int, max_new_tokens: int, long_audio_choice: str) -> tuple:
        """The page's event: `caption`'s outputs; nothing escapes to the server.

        A problem is answered like a caption, not raised: raised (`gr.Error`), it showed only in a toast that
        closes by itself, beside the previous clip's caption and pictures. Here the caption and pictures are
        emptied and the status line holds the reason until the next request (also for API clients).
        """
        mode = LONG_AUDIO_CHOICES.get(long_audio_choice, long_audio_choice)
        try:
            return self.caption(path, num_beams, max_new_tokens, mode).outputs(self.picture_dir)
        except ClipProblem as problem:
            reason = str(problem)
        except Exception as error:  # a bug or a resource problem: log it, tell the visitor, keep serving
            logger.exception("captioning %s failed", path)
            reason = f"captioning failed ({type(error).__name__}: {error}); the page goes on serving"
        settings = self.settings_table(num_beams, max_new_tokens, mode)
        failure = CaptionView("", None, [], settings, f"⚠️ **{FAILURE_TITLE}** {markdown_text(reason)}")
        return failure.outputs(self.picture_dir)


def build_demo(app: CaptioningApp, examples_dir: str | None = None) -> gr.Blocks:
    """The page, with its queue set: `QUEUE_CONCURRENCY` captioning at a time, up to `QUEUE_MAX_SIZE` waiting."""
    examples_dir = examples_dir or tempfile.mkdtemp(prefix="lavcap-app-examples-")
    examples = example_clips(examples_dir)
    decoding = app.decoding
    with gr.Blocks(title="LAVCap audio-visual captioning") as demo:
        gr.Markdown(
            "# LAVCap: audio-visual captioning\n"
            "Upload or record a video: the model captions its **sound**, using the frames as context. The OT plan "
            "shows how the frames (rows) were matched to the audio tokens (columns, in time order)."
        )
        with gr.Row():
            with gr.Column():
                video = gr.Video(label="Video", sources=["upload", "webcam"], height=320, elem_id="clip")
                with gr.Accordion("Decoding", open=True):
                    num_beams = gr.Slider(
                        1,
                        max(MAX_BEAMS, decoding.num_beams),
                        value=decoding.num_beams,
                        step=1,
                        label="Beam size",
                        elem_id="beams",
                    )
                    max_new_tokens = gr.Slider(
                        min(MIN_NEW_TOKENS, decoding.max_new_tokens),
                        max(MAX_NEW_TOKENS_LIMIT, decoding.max_new_tokens),
                        value=decoding.max_new_tokens,
                        step=1,
                        label="Max new tokens",
                        elem_id="tokens",
                    )
                    gr.Markdown(decoding.note, elem_id="decoding-note", visible=bool(decoding.note))
                    long_audio = gr.Radio(
                        list(LONG_AUDIO_CHOICES),
                        value="first window only",
                        label=f"Clips longer than the model's {app.window_seconds:.2f} s window",
                        elem_id="long-audio",
                    )
                run = gr.Button("Caption", variant="primary", elem_id="caption-button")
                gr.Examples(
                    [[path] for path, _ in examples],
                    inputs=[video],
                    label="Synthesised clips (made at start-up, not in the training set)",
                    example_labels=[scene for _, scene in examples],
                    elem_id="examples",
                )
            with gr.Column():
                caption = gr.Textbox(label="Caption", lines=2, elem_id="caption", interactive=False)
                status = gr.Markdown(elem_id="status")
                # No label badge on the picture: it would cover the start of the picture's title (the caption).
                gr.Markdown(
                    "**OT plan**: how the frames (rows) were matched to the audio tokens (columns)",
                    elem_id="ot-plan-heading",
                )
                picture = gr.Image(
                    label="OT plan (frames x audio tokens)",
                    show_label=False,
                    type="filepath",
                    elem_id="ot-plan",
                )
                frames = gr.Gallery(label="Sampled frames", columns=4, height="auto", elem_id="frames")
                settings = gr.Markdown(
                    app.settings_table(decoding.num_beams, decoding.max_new_tokens, "truncate"),
                    elem_id="settings",
                )
        run.click(
            app.handle,
            inputs=[video, num_beams, max_new_tokens, long_audio],
            outputs=[caption, picture, frames, settings, status],
            api_name="caption",
        )
    demo.queue(default_concurrency_limit=QUEUE_CONCURRENCY, max_size=QUEUE_MAX_SIZE)
    return demo


def create_demo(
    model: str | None = None,
    device: str | None = None,
    model_decoding: bool = False,
    quantize: str | None = None,
) -> gr.Blocks:
    """The page for `model` (default: the demo's trained model, trained first if missing), its decoder quantized
    where `quantize` says."""
    app = CaptioningApp(resolve_model(model), device=device, model_decoding=model_decoding, quantize=quantize)
    return build_demo(app)


def serve(demo: gr.Blocks, host: str | None = None, port: int | None = None, share: bool = False) -> None:
    """Serve the page until interrupted (host/port: gradio's defaults, or GRADIO_SERVER_NAME/PORT, when None)."""
    demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        show_error=True,
        max_file_size="200mb",
    )


def run_app_command(args: Any) -> int:
    """`lavcap app`."""
    demo = create_demo(args.model, args.device, args.model_decoding, args.quantize)
    serve(demo, args.host, args.port, args.share)
    return 0
