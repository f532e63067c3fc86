"""Optimal-transport alignment and audio-visual fusion of LAVCap (pure torch, no Transformers imports).

Notation: `ha` (B, A, C) audio tokens, `hv` (B, V, C) visual tokens (A=64, V=20 in the paper).
The OT fusion (docs/architecture.md, equations (1)-(14)) normalises both, builds the similarity `S = <hv, ha>`
(B, V, A) and solves an entropic transport problem on it with Sinkhorn iterations, giving the log plan `L` (no
gradient). Its alignment loss multiplies the log plan with the similarity into logits `Zv = s L S^T` (V x V) and
`Za = s L^T S` (A x A) and applies a cross entropy whose targets are the diagonal: each token's similarity profile
must match its own row (column) of the plan better than any other token's, which trains the audio encoder through
`S`. For `ot_att`, each token also attends to the other modality through the plan `P = exp(L)`.
The other fusion types are the rows of the paper's ablations, each computing what the released code computes under
its released name. `FUSIONS`, at the end, is the one table of fusion types (modalities read, OT or not, token
layout, released names) from which every list of them derives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

# The OT settings of the paper, the defaults of `LavCapConfig` and of the fusion modules alike. The initial logit
# scale is ln(1/0.07) to float32 precision (the fp32 parameter holds the same value either way), written as saved
# configs already state it. The upper clamp is the released literal 4.6052, not ln 100 = 4.6051702 (3e-5 apart: the
# fp32 parameter stops at a different value once it reaches the bound).
SINKHORN_EPSILON = 0.1
SINKHORN_ITERATIONS = 50
LOGIT_SCALE_INIT = 2.6592600369262695
LOGIT_SCALE_MAX = 4.6052


def normalize_features(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Scale `x` (..., C) to unit L2 norm along the last dim: `x / max(||x||, eps)`.

    All-zero rows stay zero (the official code divides by the bare norm and yields NaN there).
    Same values and gradients as `F.normalize`, whose autograd graph takes ~3x longer on CPU.
    """
    return _Normalize.apply(x, eps)


class _Normalize(torch.autograd.Function):
    """`x / max(||x||, eps)` along the last dim with a fused backward (4 passes over x instead of ~10)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        inv_norm = norm.clamp_min(eps).reciprocal()
        y = x * inv_norm
        ctx.save_for_backward(y, inv_norm, norm < eps)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        y, inv_norm, clamped = ctx.saved_tensors
        # Above eps: d(x / ||x||) = (g - y <g, y>) / ||x||. Below eps the map is x / eps, linear.
        dot = (grad * y).sum(dim=-1, keepdim=True).masked_fill_(clamped, 0)
        return torch.addcmul(grad, y, dot, value=-1).mul_(inv_norm), None


# Kernels whose spread (max - min of similarity / epsilon within a sample) is at most this use
# `_scaling_potentials`, which iterates on exp(kernel - max) instead of in log space. Its iterates stay within
# exp(+-2 * spread) / (V or A) (see there), inside fp32's normal range (exp(+-87)) with room for large token counts
# and for similarities a little over a bound through rounding. Cosine similarities with epsilon = 0.1 have
# spread <= 20.
_MAX_SCALING_SPREAD = 30.0


@torch.no_grad()
def log_sinkhorn(
    similarity: torch.Tensor,
    epsilon: float,
    num_iterations: int,
    max_abs_similarity: float | None = None,
) -> torch.Tensor:
    """Entropic optimal transport between V visual and A audio tokens, in log space (docs/architecture.md (3)-(8)).

    With `Z = similarity / epsilon`, `u = 0` (B, V), `w = 0` (B, A), iterate
    `u = -log V - logsumexp_a(Z + w)`, `w = -log A - logsumexp_v(Z + u)` and return `Z + u + w`.
    The whole batch is updated at once. When the spread of `Z` is at most `_MAX_SCALING_SPREAD`, the same log plan
    is computed with the multiplicative form (`_scaling_potentials`), which is faster.

    Args:
        similarity: (B, V, A) scores; any float dtype, computed in fp32.
        epsilon: entropic regularisation.
        num_iterations: Sinkhorn iterations (each one row and one column normalisation).
        max_abs_similarity: a bound on `|similarity|` that the caller knows (1 for cosine similarities). With it
            the faster scaling form is chosen from the bound; without it, from the data, at the cost of one
            device-to-host sync.

    Returns:
        (B, V, A) fp32 log transport plan without gradient: `exp` of it has rows summing to 1/V and
        columns summing to 1/A (columns exactly, rows up to convergence).
    """
    if similarity.dim() != 3 or 0 in similarity.shape[1:]:
        raise ValueError(f"similarity must have shape (batch, visual, audio), got {tuple(similarity.shape)}")
    if epsilon <= 0:
        raise ValueError(f"sinkhorn epsilon must be positive, got {epsilon}")
    if num_iterations < 0:
        raise ValueError(f"sinkhorn iterations must be >= 0, got {num_iterations}")
    kernel = similarity.float() / epsilon
    if num_iterations == 0 or kernel.numel() == 0:
        return kernel
    kernel_max = kernel.amax(dim=(1, 2), keepdim=True)
    if max_abs_similarity is not None:
        bounded = 2 * max_abs_similarity / epsilon <= _MAX_SCALING_SPREAD
    else:  # one host sync; the reductions and the comparison are on device
        bounded = bool((kernel_max - kernel.amin(dim=(1, 2), keepdim=True)).max() <= _MAX_SCALING_SPREAD)
    if bounded:
        u, w = _scaling_potentials(kernel, kernel_max, num_iterations)
    else:
        u, w = _logsumexp_potentials(kernel, num_iterations)
    return kernel + u + w


def _logsumexp_potentials(kernel: torch.Tensor, num_iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sinkhorn potentials u (B, V, 1) and w (B, 1, A) of the (B, V, A) kernel, updates as written."""
    batch_size, num_visual, num_audio = kernel.shape
    u = kernel.new_zeros(batch_size, num_visual, 1)
    w = kernel.new_zeros(batch_size, 1, num_audio)
    for _ in range(num_iterations):
        u = -math.log(num_visual) - torch.logsumexp(kernel + w, dim=2, keepdim=True)
        w = -math.log(num_audio) - torch.logsumexp(kernel + u, dim=1, keepdim=True)
    return u, w


def _scaling_potentials(
    kernel: torch.Tensor, kernel_max: torch.Tensor, num_iterations: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The potentials of `_logsumexp_potentials` from Sinkhorn's scaling form, for kernels of bounded spread.

    `kernel` is `Z = similarity / epsilon` (B, V, A) and `kernel_max` its per-sample maximum `M` (B, 1, 1); see
    docs/architecture.md, equations (7), (8) and (8'). With the Gibbs kernel `K = exp(Z - M)`, in [exp(-s), 1]
    for spread s, each iteration sets `a = 1 / (K b)` rescaled so that `a[0] = 1` (rows) and `b = 1 / (K^T a)`
    (columns), starting from `b = 1`. Iteration by iteration, `a` and `b` are proportional to `exp(u)` and
    `exp(w)` of the log-space updates, and the plan after the column step, `a K b / A`, does not depend on the
    scale of `a`, so both forms give the same log plan. The factor `a[0]` costs nothing (`K b` is computed anyway).
    It picks one member of the family `(a c, b / c)` of equivalent scalings and bounds every iterate: `a` in
    [exp(-s), exp(s)], `b` in [exp(-s) / V, exp(2s) / V], and every product of `K`, `a`, `b` likewise. Each
    half-iteration needs three kernels instead of eight. That matters on GPUs, where the iterations are bound by
    launch time, and it helps on CPUs too.
    Returns `u = log a - M - log A` (B, V, 1) and `w = log b` (B, 1, A), so that `Z + u + w` is the log plan.
    """
    batch_size, _, num_audio = kernel.shape
    gibbs_kernel = (kernel - kernel_max).exp()
    b = kernel.new_ones(batch_size, 1, num_audio)
    for _ in range(num_iterations):
        row_sums = (gibbs_kernel * b).sum(dim=2, keepdim=True)
        a = row_sums[:, :1] / row_sums
        b = (gibbs_kernel * a).sum(dim=1, keepdim=True).reciprocal_()
    return a.log_() - (kernel_max + math.log(num_audio)), b.log_()


def ot_alignment_loss(
    similarity: torch.Tensor, log_plan: torch.Tensor, logit_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """OT alignment losses of LAVCap (docs/architecture.md (10)-(12)), computed in fp32.

    `Zv[b,i,j] = s * sum_a L[b,i,a] S[b,j,a]` (B, V, V) and `Za[b,i,j] = s * sum_v L[b,v,i] S[b,v,j]`
    (B, A, A); each loss is the cross entropy with the softmax over the *first* index of every column j
    and target j, averaged over batch and columns (what `cross_entropy` does on a (B, N, N) input).
    The log plan enters as is (no `exp`) and `s` as a plain multiplier, as in the released code.

    Args:
        similarity: (B, V, A) similarity `S`; gradients flow into it.
        log_plan: (B, V, A) log transport plan `L`; treated as a constant.
        logit_scale: scalar tensor `s`; gradients flow into it.

    Returns:
        `(loss_v, loss_a)`, two fp32 scalars.
    """
    if similarity.dim() != 3 or similarity.shape != log_plan.shape:
        raise ValueError(
            "similarity and log_plan must both have shape (batch, visual, audio), got "
            f"{tuple(similarity.shape)} and {tuple(log_plan.shape)}"
        )
    if logit_scale.numel() != 1:
        raise ValueError(f"logit_scale must be a scalar, got shape {tuple(logit_scale.shape)}")
    similarity = similarity.float()
    log_plan = log_plan.detach().float()
    scale = logit_scale.float().reshape(())
    logits_v = scale * torch.bmm(log_plan, similarity.transpose(1, 2))
    logits_a = scale * torch.bmm(log_plan.transpose(1, 2), similarity)
    return _diagonal_cross_entropy(logits_v), _diagonal_cross_entropy(logits_a)


def _diagonal_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Cross entropy of (B, N, N) logits, classes along dim 1, target of column j is j."""
    batch_size, num_tokens, _ = logits.shape
    targets = torch.arange(num_tokens, device=logits.device).expand(batch_size, num_tokens)
    return F.cross_entropy(logits, targets)


@dataclass
class FusionOutput:
    """Output of an `AudioVisualFusion` module.

    Attributes:
        fused: (B, N, output_dim) tokens for the projector, audio-derived tokens first.
        loss_v: visual-side OT alignment loss (fp32 scalar), None for fusion types without OT.
        loss_a: audio-side OT alignment loss (fp32 scalar), None for fusion types without OT.
        log_plan: (B, V, A) fp32 log transport plan, only for OT types when asked for.
    """

    fused: torch.Tensor
    loss_v: torch.Tensor | None = None
    loss_a: torch.Tensor | None = None
    log_plan: torch.Tensor | None = None


class AudioVisualFusion(nn.Module):
    """Base class: fuses audio tokens (B, A, C) and visual tokens (B, V, C) into (B, N, output_dim).

    Subclasses set `fusion_type` and implement `fuse`; which modalities a type reads and how many fused tokens come
    from each is its `FusionSpec` in `FUSIONS`.
    """

    fusion_type: str

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.output_dim = hidden_size

    @property
    def spec(self) -> FusionSpec:
        """This type's row of `FUSIONS`."""
        return FUSIONS[self.fusion_type]

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, output_dim={self.output_dim}"

    def forward(
        self,
        audio_tokens: torch.Tensor | None,
        visual_tokens: torch.Tensor | None,
        output_ot_plan: bool = False,
    ) -> FusionOutput:
        """Fuse audio (B, A, C) and visual (B, V, C) tokens; a modality the type ignores may be None.

        `output_ot_plan=True` returns the (B, V, A) log plan for OT fusion types.
        """
        self._check_inputs(audio_tokens, visual_tokens)
        return self.fuse(audio_tokens, visual_tokens, output_ot_plan)

    def fuse(
        self, audio_tokens: torch.Tensor | None, visual_tokens: torch.Tensor | None, output_ot_plan: bool
    ) -> FusionOutput:
        """Fusion proper, called by `forward` on validated inputs."""
        raise NotImplementedError

    def _check_inputs(self, audio_tokens: torch.Tensor | None, visual_tokens: torch.Tensor | None) -> None:
        """Raise ValueError for a missing modality or inconsistent shapes."""
        given = []
        for name, tokens, needed in (
            ("audio_tokens", audio_tokens, self.spec.uses_audio),
            ("visual_tokens", visual_tokens, self.spec.uses_visual),
        ):
            if not needed:
                continue
            if tokens is None:
                raise ValueError(f"fusion_type={self.fusion_type!r} needs {name}, got None")
            if tokens.dim() != 3 or tokens.shape[-1] != self.hidden_size:
                raise ValueError(
                    f"{name} must have shape (batch, tokens, {self.hidden_size}), got {tuple(tokens.shape)}"
                )
            given.append(tokens)
        if len(given) == 2 and given[0].shape[0] != given[1].shape[0]:
            raise ValueError(
                f"audio_tokens and visual_tokens have different batch sizes: "
                f"{audio_tokens.shape[0]} and {visual_tokens.shape[0]}"
            )


def spread_visual(visual: torch.Tensor, num_audio: int) -> torch.Tensor:
    """Visual tokens (B, V, C) laid over A audio positions for channel concatenation: (B, A, C).

    With `gap = A // V`, visual token i sits at position `i * gap`; every other position (including the last
    `A % V`) is zero, as the released channel concatenation pads them. Requires A >= V.
    """
    batch_size, num_visual, channels = visual.shape
    if num_audio < num_visual:
        raise ValueError(
            f"channel concatenation needs at least as many audio as visual tokens, got {num_audio} and {num_visual}"
        )
    gap, rem = divmod(num_audio, num_visual)
    spread = F.pad(visual.unsqueeze(2), (0, 0, 0, gap - 1))  # (B, V, gap, C)
    return F.pad(spread.reshape(batch_size, num_visual * gap, channels), (0, 0, 0, rem))


def _multihead_attention(hidden_size: int) -> nn.MultiheadAttention:
    """Batch-first attention with 64-wide heads (`hidden_size // 64`, at least 1), as released: 12 heads at 768."""
    num_heads = max(1, hidden_size // 64)
    if hidden_size % num_heads:
        raise ValueError(
            f"cross-attention fusion: hidden_size {hidden_size} is not divisible by its {num_heads} heads of 64"
        )
    return nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)


class OptimalTransportFusion(AudioVisualFusion):
    """Shared OT alignment: normalisation, similarity, Sinkhorn plan and alignment losses (fp32).

    `logit_scale` is clamped in place to [0, logit_scale_max] at every forward, as the released code does,
    so that converted checkpoints behave the same.
    """

    def __init__(
        self,
        hidden_size: int,
        sinkhorn_epsilon: float = SINKHORN_EPSILON,
        sinkhorn_iterations: int = SINKHORN_ITERATIONS,
        logit_scale_init: float = LOGIT_SCALE_INIT,
        logit_scale_max: float = LOGIT_SCALE_MAX,
    ):
        super().__init__(hidden_size)
        self.sinkhorn_epsilon = sinkhorn_epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.logit_scale_max = logit_scale_max
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, sinkhorn_epsilon={self.sinkhorn_epsilon}, "
            f"sinkhorn_iterations={self.sinkhorn_iterations}, logit_scale_max={self.logit_scale_max:.4f}"
        )

    def fuse(
        self, audio_tokens: torch.Tensor, visual_tokens: torch.Tensor, output_ot_plan: bool
    ) -> FusionOutput:
        """Align and fuse; returns fused tokens in the input dtype and fp32 losses (and plan if asked)."""
        out_dtype = torch.promote_types(audio_tokens.dtype, visual_tokens.dtype)
        audio = normalize_features(audio_tokens.float())
        visual = normalize_features(visual_tokens.float())
        similarity = torch.bmm(visual, audio.transpose(1, 2))
        # Cosine similarities: |similarity| <= 1 lets Sinkhorn pick its form without a device sync.
        log_plan = log_sinkhorn(
            similarity, self.sinkhorn_epsilon, self.sinkhorn_iterations, max_abs_similarity=1.0
        )
        # Through .data: under FSDP the parameter is a view of a flat buffer, which autograd forbids changing in place.
        self.logit_scale.data.clamp_(0.0, self.logit_scale_max)
        # A copy, so that the next forward's in-place clamp cannot invalidate this graph before backward.
        loss_v, loss_a = ot_alignment_loss(similarity, log_plan, self.logit_scale.clone())
        fused = self._combine(audio, visual, log_plan).to(out_dtype)
        return FusionOutput(fused, loss_v, loss_a, log_plan if output_ot_plan else None)

    def _combine(self, audio: torch.Tensor, visual: torch.Tensor, log_plan: torch.Tensor) -> torch.Tensor:
        """Fuse normalised fp32 audio (B, A, C) and visual (B, V, C) given the log plan (B, V, A)."""
        raise NotImplementedError


class OTAttentionFusion(OptimalTransportFusion):
    """`ot_att`, the paper's model: OT loss + OT attention, (B, A+V, C).

    `fused = [ha + P^T hv, hv + P ha]` with `P = exp(L)` and normalised features; no gradient through P.
    """

    fusion_type = "ot_att"

    def _combine(self, audio: torch.Tensor, visual: torch.Tensor, log_plan: torch.Tensor) -> torch.Tensor:
        plan = log_plan.exp()
        attended_audio = torch.baddbmm(audio, plan.transpose(1, 2), visual)
        attended_visual = torch.baddbmm(visual, plan, audio)
        return torch.cat([attended_audio, attended_visual], dim=1)


class OTConcatFusion(OptimalTransportFusion):
    """`ot_concat`: OT loss, then the normalised audio and visual tokens concatenated, (B, A+V, C)."""

    fusion_type = "ot_concat"

    def _combine(self, audio: torch.Tensor, visual: torch.Tensor, log_plan: torch.Tensor) -> torch.Tensor:
        return torch.cat([audio, visual], dim=1)


class OTChannelConcatFusion(OptimalTransportFusion):
    """`ot_channel_concat`: OT loss, then normalised audio and `spread_visual` of the normalised visual tokens
    concatenated on channels, (B, A, 2C)."""

    fusion_type = "ot_channel_concat"

    def __init__(self, hidden_size: int, **ot_settings: float):
        super().__init__(hidden_size, **ot_settings)
        self.output_dim = 2 * hidden_size

    def _combine(self, audio: torch.Tensor, visual: torch.Tensor, log_plan: torch.Tensor) -> torch.Tensor:
        return torch.cat([audio, spread_visual(visual, audio.shape[1])], dim=-1)


class OTCrossAttentionFusion(OptimalTransportFusion):
    """`ot_cross_attention`: OT loss, then normalised audio queries attend to the normalised visual tokens, plus the
    normalised audio as residual, (B, A, C). The plan does not enter the fused tokens, only the loss."""

    fusion_type = "ot_cross_attention"

    def __init__(self, hidden_size: int, **ot_settings: float):
        super().__init__(hidden_size, **ot_settings)
        self.cross_attn = _multihead_attention(hidden_size)

    def _combine(self, audio: torch.Tensor, visual: torch.Tensor, log_plan: torch.Tensor) -> torch.Tensor:
        # The normalised features are fp32; the attention runs in its weights' dtype (bf16 in a bf16 model).
        dtype = self.cross_attn.in_proj_weight.dtype
        keys = visual.to(dtype)
        attended, _ = self.cross_attn(audio.to(dtype), keys, keys, need_weights=False)
        return attended.float() + audio


class ConcatFusion(AudioVisualFusion):
    """`concat`: raw audio tokens, then the raw visual tokens twice, (B, A+2V, C); no OT.

    The released `tempcat_bfQF` concatenates the visual tokens before its (optional) Q-Former and, without one,
    once more after it.
    """

    fusion_type = "concat"

    def fuse(
        self, audio_tokens: torch.Tensor | None, visual_tokens: torch.Tensor | None, output_ot_plan: bool
    ) -> FusionOutput:
        return FusionOutput(torch.cat([audio_tokens, visual_tokens, visual_tokens], dim=1))


class ConcatOnceFusion(AudioVisualFusion):
    """`concat_once`: raw audio tokens then raw visual tokens, (B, A+V, C); no OT."""

    fusion_type = "concat_once"

    def fuse(
        self, audio_tokens: torch.Tensor | None, visual_tokens: torch.Tensor | None, output_ot_plan: bool
    ) -> FusionOutput:
        return FusionOutput(torch.cat([audio_tokens, visual_tokens], dim=1))


class ChannelConcatFusion(AudioVisualFusion):
    """`channel_concat`: raw audio and `spread_visual` of the raw visual tokens concatenated on channels, (B, A, 2C);
    no OT. Requires A >= V."""

    fusion_type = "channel_concat"

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size)
        self.output_dim = 2 * hidden_size

    def fuse(
        self, audio_tokens: torch.Tensor | None, visual_tokens: torch.Tensor | None, output_ot_plan: bool
    ) -> FusionOutput:
        spread = spread_visual(visual_tokens, audio_tokens.shape[1])
        return FusionOutput(torch.cat([audio_tokens, spread], dim=-1))


class PlainCrossAttentionFusion(AudioVisualFusion):
    """`plain_cross_attention`: raw audio queries attend to raw visual keys/values, plus an audio residual, (B, A, C);
    no OT loss."""

    fusion_type = "plain_cross_attention"

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size)
        self.cross_attn = _multihead_attention(hidden_size)

    def fuse(
        self, audio_tokens: torch.Tensor | None, visual_tokens: torch.Tensor | None, output_ot_plan: bool
    ) -> FusionOutput:
        attended, _ = self.cross_attn(audio_tokens, visual_tokens, visual_tokens, need_weights=False)
        return FusionOutput(attended + audio_tokens)


class AudioOnlyFusion(AudioVisualFusion):
    """`audio_only`: the audio tokens unchanged, (B, A, C); visual tokens are ignored and may be None."""

    fusion_type = "audio_only"

    def fuse(
        self, audio_tokens: torch.Tensor | None, visual_tokens: torch.Tensor | None, output_ot_plan: bool
    ) -> FusionOutput:
        return FusionOutput(audio_tokens)


class VisualOnlyFusion(AudioVisualFusion):
    """`visual_only`: the visual tokens unchanged, (B, V, C); audio tokens are ignored and may be None."""

    fusion_type = "visual_only"

    def fuse(
        self, audio_tokens: torch.Tensor | None, visual_tokens: torch.Tensor | None, output_ot_plan: bool
    ) -> FusionOutput:
        return FusionOutput(visual_tokens)


# ---------------------------------------------------------------------------------------------------------------
# The table of fusion types

Modality = Literal["audio", "visual"]


@dataclass(frozen=True)
class FusionSpec:
    """One fusion type. Every list of fusion types (here, in the config, the converter, the model card) derives
    from `FUSIONS`.

    Attributes:
        name: the `fusion_type` value.
        module: the `AudioVisualFusion` subclass that computes it.
        token_layout: the fused sequence as modality segments, audio ones first: ("audio", "visual", "visual") is
            A audio-indexed tokens then V visual-indexed tokens twice. A type that keeps the audio positions and
            mixes the frames into them (channel concatenation, cross-attention) is ("audio",). The prompt carries
            one placeholder per fused token, `<|audio|>` for audio segments and `<|video|>` for visual ones.
        description: one line for model cards and docs.
        uses_audio: whether the type reads the audio tokens (the model then has an audio encoder).
        uses_visual: whether it reads the visual tokens.
        released_names: the released code's `fusion_type` values whose forward (without its Q-Former) computes
            this type; empty when no released type does.
        former_names: earlier names of this type in this package; `LavCapConfig` maps them here with a warning.
    """

    name: str
    module: type[AudioVisualFusion]
    token_layout: tuple[Modality, ...]
    description: str
    uses_audio: bool = True
    uses_visual: bool = True
    released_names: tuple[str, ...] = ()
    former_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.module.fusion_type != self.name:
            raise ValueError(
                f"{self.module.__name__} computes {self.module.fusion_type!r}, not {self.name!r}"
            )
        if list(self.token_layout) != sorted(self.token_layout):
            raise ValueError(f"{self.name}: audio segments must come first, got {self.token_layout}")

    @property
    def uses_ot(self) -> bool:
        """Whether the type aligns the modalities with optimal transport (and so has an OT loss and plan)."""
        return issubclass(self.module, OptimalTransportFusion)

    def token_counts(self, num_audio: int, num_visual: int) -> tuple[int, int]:
        """(audio-indexed, visual-indexed) fused tokens for `num_audio` audio and `num_visual` visual input tokens."""
        return num_audio * self.token_layout.count("audio"), num_visual * self.token_layout.count("visual")


FUSIONS: dict[str, FusionSpec] = {
    spec.name: spec
    for spec in (
        FusionSpec(
            "ot_att",
            OTAttentionFusion,
            ("audio", "visual"),
            "optimal-transport alignment loss and OT attention on normalised tokens (the paper's model)",
            released_names=("ot_tempcat_QAV_add",),
        ),
        FusionSpec(
            "ot_concat",
            OTConcatFusion,
            ("audio", "visual"),
            "optimal-transport alignment loss, normalised audio and visual tokens concatenated",
            released_names=("ot_tempcat", "ot_tempcat_bfQF", "ot_tempcat_afQF"),
        ),
        FusionSpec(
            "ot_channel_concat",
            OTChannelConcatFusion,
            ("audio",),
            "optimal-transport alignment loss, normalised visual tokens spread over the audio positions and "
            "concatenated along channels",
            released_names=("ot_chancat", "ot_chancat_bfQF", "ot_chancat_afQF"),
        ),
        FusionSpec(
            "ot_cross_attention",
            OTCrossAttentionFusion,
            ("audio",),
            "optimal-transport alignment loss, normalised audio tokens attend to the normalised visual tokens",
            released_names=("ot_crossattn",),
        ),
        FusionSpec(
            "concat",
            ConcatFusion,
            ("audio", "visual", "visual"),
            "audio tokens, then the visual tokens twice, no OT",
            released_names=("tempcat_bfQF",),
        ),
        FusionSpec(
            "channel_concat",
            ChannelConcatFusion,
            ("audio",),
            "visual tokens spread over the audio positions and concatenated along channels, no OT",
            released_names=("chancat_bfQF",),
        ),
        # The released `crossattn` builds a cross-attention that its forward never calls: it feeds the audio only.
        FusionSpec(
            "audio_only",
            AudioOnlyFusion,
            ("audio",),
            "audio tokens only",
            uses_visual=False,
            released_names=("crossattn",),
        ),
        # The released `vis_embed_only` (and `aud_embed_only`) build no projector without the Q-Former: they never ran.
        FusionSpec("visual_only", VisualOnlyFusion, ("visual",), "visual tokens only", uses_audio=False),
        FusionSpec(
            "concat_once",
            ConcatOnceFusion,
            ("audio", "visual"),
            "audio tokens then the visual tokens once, no OT",
            released_names=("tempcat_afQF",),
        ),
        FusionSpec(
            "plain_cross_attention",
            PlainCrossAttentionFusion,
            ("audio",),
            "raw audio tokens attend to the raw visual tokens, no OT (not a row of the paper or the released code)",
            former_names=("cross_attention",),
        ),
    )
}
"""Every fusion type, by name; "ot_att" is the paper's model."""

FUSION_TYPES = tuple(FUSIONS)
"""The names of `FUSIONS`, in its order."""

OT_FUSION_TYPES = tuple(name for name, spec in FUSIONS.items() if spec.uses_ot)
"""The fusion types with an OT alignment loss and plan."""


def build_fusion(
    fusion_type: str,
    hidden_size: int,
    sinkhorn_epsilon: float = SINKHORN_EPSILON,
    sinkhorn_iterations: int = SINKHORN_ITERATIONS,
    logit_scale_init: float = LOGIT_SCALE_INIT,
    logit_scale_max: float = LOGIT_SCALE_MAX,
) -> AudioVisualFusion:
    """Build the fusion module for `fusion_type` (one of `FUSION_TYPES`) on `hidden_size` channels.

    The Sinkhorn and logit-scale arguments are used by the OT types only; the cross-attention types have
    `hidden_size // 64` heads (at least 1), as released.
    """
    spec = FUSIONS.get(fusion_type)
    if spec is None:
        raise ValueError(f"unknown fusion_type {fusion_type!r}; expected one of {', '.join(FUSION_TYPES)}")
    kwargs: dict[str, int | float] = {}
    if spec.uses_ot:
        kwargs.update(
            sinkhorn_epsilon=sinkhorn_epsilon,
            sinkhorn_iterations=sinkhorn_iterations,
            logit_scale_init=logit_scale_init,
            logit_scale_max=logit_scale_max,
        )
    return spec.module(hidden_size, **kwargs)
