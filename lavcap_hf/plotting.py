"""Pictures of OT plans (frames x audio tokens), with the frames as thumbnails along their axis."""

from __future__ import annotations

import os
import textwrap
from typing import IO

import numpy as np

# Inches per frame row and the bounds of inches per audio-token column: a few tokens get wide cells, many narrow.
ROW_INCHES = 0.45
COLUMN_INCHES = (0.15, 0.6)
THUMBNAIL_PIXELS = 96  # height each frame is resized to in the thumbnail strip


def plot_ot_plan(
    plan: np.ndarray,
    path: str | os.PathLike | IO[bytes],
    title: str = "",
    frames: np.ndarray | None = None,
) -> None:
    """Save the transport plan (V, A) of one clip as a PNG heat map: frames on the y axis, audio tokens on x.

    The plan is shown scaled by V*A, so 1.0 means "as much mass as a uniform plan". With `frames`, uint8 RGB
    (V, H, W, 3), each frame is drawn as a thumbnail beside its row. `path` is a file name or a binary file object.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan = np.asarray(plan, dtype=np.float32)
    if plan.ndim != 2:
        raise ValueError(f"an OT plan is (frames, audio tokens), got shape {plan.shape}")
    rows, tokens = plan.shape
    strip = None if frames is None else _thumbnail_strip(frames, rows)
    column = float(np.clip(6.0 / tokens, *COLUMN_INCHES))
    heat_w, heat_h = tokens * column, rows * ROW_INCHES
    thumb_w = 0.0 if strip is None else ROW_INCHES * strip.shape[1] / (strip.shape[0] / rows)
    wrapped = textwrap.fill(title or "OT plan", 70)
    left, right, bottom = 0.75 + thumb_w, 1.4, 0.65
    top = 0.35 + 0.2 * (wrapped.count("\n") + 1)
    width, height = left + heat_w + right, bottom + max(heat_h, 1.5) + top

    def box(x: float, w: float) -> list[float]:  # inches -> figure fractions, over the heat map's rows
        return [x / width, bottom / height, w / width, heat_h / height]

    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes(box(left, heat_w))
    image = ax.imshow(plan * rows * tokens, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xlabel(f"audio token (time, {tokens} tokens)")
    if strip is None:
        ax.set_ylabel(f"frame ({rows})")
    else:
        thumbs = fig.add_axes(box(left - thumb_w - 0.05, thumb_w), sharey=ax)
        thumbs.imshow(strip, extent=(0, 1, rows - 0.5, -0.5), aspect="auto", interpolation="bilinear")
        thumbs.set_xticks([])
        thumbs.set_ylabel(f"frame ({rows})")
        ax.tick_params(labelleft=False)
    ax.set_yticks(range(rows) if rows <= 32 else ax.get_yticks())
    colorbar = fig.add_axes(box(left + heat_w + 0.15, 0.15))
    fig.colorbar(image, cax=colorbar, label="mass x V x A")
    fig.text(0.5, 1 - 0.15 / height, wrapped, ha="center", va="top", fontsize=9)
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def _thumbnail_strip(frames: np.ndarray, rows: int) -> np.ndarray:
    """Frames (V, H, W, 3) resized to THUMBNAIL_PIXELS high and stacked top to bottom: uint8 (V * h, w, 3)."""
    from PIL import Image

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] != rows:
        raise ValueError(
            f"frames must be uint8 ({rows}, H, W, 3), one per row of the plan, got {frames.shape}"
        )
    height = THUMBNAIL_PIXELS
    width = max(1, round(frames.shape[2] * height / frames.shape[1]))
    resized = [np.asarray(Image.fromarray(f.astype(np.uint8)).resize((width, height))) for f in frames]
    return np.concatenate(resized, axis=0)
