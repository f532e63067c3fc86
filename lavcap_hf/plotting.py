"""Pictures of OT plans (audio tokens x frames)."""

from __future__ import annotations

import os
import textwrap

import numpy as np


def plot_ot_plan(plan: np.ndarray, path: str | os.PathLike, title: str = "") -> None:
    """Save the transport plan (V, A) of one clip as a heat map: frames on the y axis, audio tokens on x.

    The plan is shown scaled by V*A, so 1.0 means "as much mass as a uniform plan".
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan = np.asarray(plan, dtype=np.float32)
    if plan.ndim != 2:
        raise ValueError(f"an OT plan is (frames, audio tokens), got shape {plan.shape}")
    frames, tokens = plan.shape
    fig, ax = plt.subplots(figsize=(max(4.0, tokens / 8), max(2.5, frames / 4)))
    image = ax.imshow(plan * frames * tokens, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xlabel(f"audio token (time, {tokens} tokens)")
    ax.set_ylabel(f"frame ({frames})")
    ax.set_title(textwrap.fill(title or "OT plan", 60), fontsize=8)
    fig.colorbar(image, ax=ax, label="mass x V x A")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
