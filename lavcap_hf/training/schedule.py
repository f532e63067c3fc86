"""The released learning-rate schedule: a linear warm-up from 2e-9, then a cosine computed over the whole run down to
1e-8, as a LambdaLR the Trainer steps with the optimizer."""

from __future__ import annotations

import functools
import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def lavcap_lr_factor(
    step: int, *, warmup_steps: int, total_steps: int, start_factor: float, min_factor: float
) -> float:
    """Multiple of the peak lr at optimizer step `step` (0-based) in the released schedule (optims.py).

    Linear warm-up from `start_factor` to 1 over `warmup_steps` steps, then a cosine from 1 to `min_factor` whose
    phase runs over the whole run, `pi * step / total_steps`, not over the steps after the warm-up.
    """
    if step < warmup_steps:
        return start_factor + (1.0 - start_factor) * step / warmup_steps
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))


def lavcap_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    num_training_steps: int,
    num_warmup_steps: int,
    warmup_start_lr: float = 0.0,
    min_lr: float | None = None,
    min_lr_rate: float | None = None,
) -> LambdaLR:
    """The released LAVCap schedule as a `LambdaLR` over the optimizer's lr (the peak, 5e-6 in the paper).

    Step `s` of `num_training_steps` runs at `warmup_start_lr + (lr - warmup_start_lr) * s / num_warmup_steps` during
    the warm-up, then at `min_lr + (lr - min_lr) * (1 + cos(pi * s / num_training_steps)) / 2`. `min_lr` (absolute)
    or `min_lr_rate` (fraction of lr) as for Transformers' `cosine_with_min_lr`.
    """
    if (min_lr is None) == (min_lr_rate is None):
        raise ValueError("the LAVCap schedule needs one of min_lr and min_lr_rate in lr_scheduler_kwargs")
    peak = optimizer.defaults["lr"]
    factor = functools.partial(
        lavcap_lr_factor,
        warmup_steps=num_warmup_steps,
        total_steps=num_training_steps,
        start_factor=warmup_start_lr / peak,
        min_factor=min_lr / peak if min_lr is not None else min_lr_rate,
    )
    return LambdaLR(optimizer, factor)
