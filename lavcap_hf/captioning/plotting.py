"""Pictures of OT plans (frames x audio tokens), with the frames as thumbnails along their axis."""

from __future__ import annotations

import os
import textwrap
from typing import IO, TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Inches per frame row and the bounds of inches per audio-token column: a few tokens get wide cells, many narrow.
ROW_INCHES = 0.45
COLUMN_INCHES = (0.15, 0.6)
THUMBNAIL_PIXELS = 96  # height each frame is resized to in the thumbnail strip
DPI = 100
# Characters per title line: about as many as fit over the heat map at 9 pt, within these bounds.
TITLE_CHARS_PER_INCH = 14
TITLE_CHARS = (30, 70)
# The colour scale reaches at least this multiple of an even share, so that an even share is its middle colour.
EVEN_SHARE_COLOUR_SPAN = 2.0
COLOUR_BAR_LABEL = "bright = strongly matched\n(1 = an even share, 0 = none)"


def plot_ot_plan(
    plan: np.ndarray,
    path: str | os.PathLike | IO[bytes],
    title: str = "",
    frames: np.ndarray | None = None,
) -> None:
    """Save `ot_plan_figure(plan, title, frames)` as a PNG; `path` is a file name or a binary file object."""
    ot_plan_figure(plan, title=title, frames=frames).savefig(path, dpi=DPI, format="png")


def ot_plan_figure(plan: np.ndarray, title: str = "", frames: np.ndarray | None = None) -> Figure:
    """The transport plan (V, A) of one clip as a heat map: frames on the y axis, audio tokens on x.

    The plan is shown scaled by V*A, so 1 means "as much mass as a uniform plan" (an even share). The colour scale
    starts at 0 and reaches at least 2, so an even plan is drawn in the middle colour (its rounding noise is not
    stretched into contrast) and its ticks are plain numbers. With `frames`, uint8 RGB (V, H, W, 3), each frame is
    drawn as a thumbnail beside its row. The colour bar's axes are labelled "colorbar" (`Axes.get_label`).
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter

    plan = np.asarray(plan, dtype=np.float32)
    if plan.ndim != 2:
        raise ValueError(f"an OT plan is (frames, audio tokens), got shape {plan.shape}")
    rows, tokens = plan.shape
    strip = None if frames is None else _thumbnail_strip(frames, rows)
    column = float(np.clip(6.0 / tokens, *COLUMN_INCHES))
    heat_w, heat_h = tokens * column, rows * ROW_INCHES
    thumb_w = 0.0 if strip is None else ROW_INCHES * strip.shape[1] / (strip.shape[0] / rows)
    # The title is centred over the heat map and wrapped to its width: the page's buttons sit over the right margin.
    wrapped = textwrap.fill(title or "OT plan", int(np.clip(heat_w * TITLE_CHARS_PER_INCH, *TITLE_CHARS)))
    left, right, bottom = 0.75 + thumb_w, 1.4, 0.65
    top = 0.35 + 0.2 * (wrapped.count("\n") + 1)
    width, height = left + heat_w + right, bottom + max(heat_h, 1.5) + top

    def box(x: float, w: float) -> list[float]:  # inches -> figure fractions, over the heat map's rows
        return [x / width, bottom / height, w / width, heat_h / height]

    fig = Figure(figsize=(width, height))
    ax = fig.add_axes(box(left, heat_w))
    scaled = plan * rows * tokens
    top_colour = max(float(scaled.max(initial=0.0)), EVEN_SHARE_COLOUR_SPAN)
    image = ax.imshow(scaled, aspect="auto", cmap="magma", interpolation="nearest", vmin=0.0, vmax=top_colour)
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
    colorbar = fig.colorbar(image, cax=fig.add_axes(box(left + heat_w + 0.15, 0.15), label="colorbar"))
    colorbar.formatter = FormatStrFormatter("%g")  # plain numbers: no offset (1e-5+1) or exponent notation
    colorbar.set_label(COLOUR_BAR_LABEL, fontsize=9)
    fig.text((left + heat_w / 2) / width, 1 - 0.15 / height, wrapped, ha="center", va="top", fontsize=9)
    return fig


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
