"""The torch `Dataset` of LAVCap clips, which decodes a clip's media in `__getitem__` (so DataLoader workers do it, never
the training step), frame folders, and the epoch-seeded shuffling sampler."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..model.feature_extraction_lavcap import resample
from ..model.media_decoding import IMAGE_EXTENSIONS, MediaError, load_media
from .clips import Clip, MediaSource


class LavCapDataset(torch.utils.data.Dataset):
    """Clips decoded on access: waveform, frames or precomputed embeddings, caption, and a per-example seed.

    `__getitem__` runs in the DataLoader workers; the collator ([`lavcap_hf.data.collator.LavCapDataCollator`]) turns
    a list of items into model inputs. Random choices (instruction, SpecAugment masks) are drawn from the item's
    `seed`, a function of (`seed`, epoch, index): a resumed or multi-process run sees exactly the examples an
    uninterrupted single-process run sees. The trainer calls `start_epoch` at the start of every epoch (before the
    DataLoader workers copy the dataset), and [`EpochShuffleSampler`] orders the examples from the same epoch.

    Args:
        clips: the clips (`load_clips`, `group_clips`).
        sampling_rate: audio rate the model takes (16 kHz).
        num_frames: frames per clip (20); precomputed embeddings must have this many rows.
        load_audio: decode audio (False for a `visual_only` model).
        load_visual: give the clip's frames, or its `video_embeds` when it has them (False for `audio_only`).
        seed: base seed of the per-example random choices.
    """

    def __init__(
        self,
        clips: Sequence[Clip],
        sampling_rate: int = 16000,
        num_frames: int = 20,
        load_audio: bool = True,
        load_visual: bool = True,
        seed: int = 0,
    ) -> None:
        self.clips = clips
        self.sampling_rate = sampling_rate
        self.num_frames = num_frames
        self.load_audio = load_audio
        self.load_visual = load_visual
        self.seed = seed
        self.epoch = 0

    def start_epoch(self, epoch: int) -> None:
        """Set the epoch the next examples belong to.

        Not named `set_epoch` on purpose: accelerate calls a dataset's `set_epoch` with its own iteration counter,
        which a resumed run restarts from 0 with transformers 4.x.
        """
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.clips)

    def example_seed(self, index: int) -> int:
        return int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1, np.uint64)[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Returns `index`, `id`, `caption`, `seed`, `sampling_rate`, and as the flags ask: `audio` float32 (samples,)
        at `sampling_rate`, and `video_embeds` float32 (num_frames, dim) when the clip has them, else `frames` uint8
        (num_frames, H, W, 3)."""
        clip = self.clips[index]
        item: dict[str, Any] = {
            "index": index,
            "id": clip.id,
            "caption": clip.caption,
            "seed": self.example_seed(index),
            "sampling_rate": self.sampling_rate,
        }
        if self.load_audio:
            item["audio"] = self._load_audio(clip)
        if self.load_visual:
            item.update(self._load_visual(clip))
        return item

    def _load_audio(self, clip: Clip) -> np.ndarray:
        if isinstance(clip.audio, np.ndarray):
            if clip.sampling_rate is None:
                raise ValueError(f"clip {clip.id}: an audio array needs its sampling_rate")
            audio = np.asarray(clip.audio, dtype=np.float64)
            return resample(audio, clip.sampling_rate, self.sampling_rate).astype(np.float32)
        source = clip.audio if clip.audio is not None else clip.video
        if source is None or isinstance(source, np.ndarray):
            raise ValueError(
                f"clip {clip.id}: the model captions audio but the clip has no audio or video file"
            )
        return self._decode(clip, source, need_audio=True, need_frames=False).audio

    def _load_visual(self, clip: Clip) -> dict[str, np.ndarray]:
        if clip.video_embeds is not None:
            return {"video_embeds": self._load_embeds(clip)}
        if clip.video is None:
            raise ValueError(
                f"clip {clip.id}: the model uses frames but the clip has no video or video_embeds"
            )
        if isinstance(clip.video, np.ndarray):
            frames = clip.video
            if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[0] != self.num_frames:
                raise ValueError(
                    f"clip {clip.id}: frames in memory must be uint8 (num_frames={self.num_frames}, H, W, 3), got "
                    f"{frames.dtype} {frames.shape}"
                )
            return {"frames": frames}
        if isinstance(clip.video, (str, os.PathLike)) and os.path.isdir(clip.video):
            return {"frames": load_frame_folder(clip.video, self.num_frames)}
        return {"frames": self._decode(clip, clip.video, need_audio=False, need_frames=True).frames}

    def _decode(self, clip: Clip, source: MediaSource, need_audio: bool, need_frames: bool) -> Any:
        kwargs = {
            "sampling_rate": self.sampling_rate,
            "num_frames": self.num_frames,
            "need_audio": need_audio,
            "need_frames": need_frames,
        }
        if not isinstance(source, bytes):
            return load_media(source, **kwargs)
        # PyAV probes the container from the content, so the bytes are decoded from an anonymous temporary file.
        with tempfile.NamedTemporaryFile(suffix=".media") as file:
            file.write(source)
            file.flush()
            try:
                return load_media(file.name, **kwargs)
            except MediaError as error:
                raise MediaError(f"clip {clip.id} (bytes)", error.problem) from error

    def _load_embeds(self, clip: Clip) -> np.ndarray:
        source = clip.video_embeds
        if isinstance(source, np.ndarray):
            embeds = source.astype(np.float32)
        else:
            try:
                embeds = np.load(source).astype(np.float32)
            except (OSError, ValueError) as error:
                raise ValueError(
                    f"{source}: cannot read the visual features of clip {clip.id} ({error})"
                ) from error
        if embeds.ndim != 2 or embeds.shape[0] != self.num_frames:
            raise ValueError(
                f"{source if not isinstance(source, np.ndarray) else 'clip ' + clip.id}: visual features must be "
                f"(num_frames={self.num_frames}, dim), got shape {embeds.shape}"
            )
        return embeds


def load_frame_folder(folder: str | os.PathLike, num_frames: int) -> np.ndarray:
    """`num_frames` images of a folder of frames (sorted by name), spread as `load_media` spreads video frames:
    the image at the centre of each of `num_frames` equal segments. Returns uint8 RGB (num_frames, H, W, 3)."""
    names = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not names:
        raise MediaError(
            folder, f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in the frame folder"
        )
    picks = ((np.arange(num_frames) + 0.5) * len(names) / num_frames).astype(int)
    frames = []
    for index in picks:
        try:
            with Image.open(names[index]) as image:
                frames.append(np.asarray(image.convert("RGB")))
        except OSError as error:
            raise MediaError(names[index], f"not a readable image ({error})") from error
    if len({frame.shape for frame in frames}) > 1:
        raise MediaError(folder, "frames of different sizes")
    return np.stack(frames)


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """Random order of a [`LavCapDataset`], a function of (`seed`, the dataset's current epoch) only.

    Resuming mid-epoch then replays the interrupted epoch's order whatever the DataLoader wrappers reset (accelerate's
    `skip_first_batches` restarts its epoch counter at 0 with transformers 4.x). Every process draws the same order;
    accelerate shards the batches.
    """

    def __init__(self, dataset: LavCapDataset, seed: int = 0) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.dataset.epoch])
        return iter(rng.permutation(len(self.dataset)).tolist())
