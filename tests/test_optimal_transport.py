"""Tests of lavcap_hf.model.optimal_transport against per-sample references of docs/architecture.md, equations (1)-(14)."""

import math

import pytest
import torch

from lavcap_hf.model import optimal_transport
from lavcap_hf.model.optimal_transport import (
    FUSION_TYPES,
    FUSIONS,
    OT_FUSION_TYPES,
    AudioVisualFusion,
    OptimalTransportFusion,
    build_fusion,
    log_sinkhorn,
    normalize_features,
    ot_alignment_loss,
)

# No function of a package the stacks pin differently runs here (held to it, tests/conftest.py): one stack is enough.
pytestmark = pytest.mark.stack_independent

HIDDEN = 32
OT_TYPES = OT_FUSION_TYPES


def _features(batch, num_audio, num_visual, hidden=HIDDEN, seed=0):
    generator = torch.Generator().manual_seed(seed)
    audio = torch.randn(batch, num_audio, hidden, generator=generator)
    visual = torch.randn(batch, num_visual, hidden, generator=generator)
    return audio, visual


# ---------------------------------------------------------------- reference (float64, one sample at a time)


def _reference_logsumexp(x, dim):
    peak = x.max(dim=dim, keepdim=True).values
    return (peak + (x - peak).exp().sum(dim=dim, keepdim=True).log()).squeeze(dim)


def _reference_sinkhorn(sim, epsilon, iterations):
    """Section 4 step 3 for one (V, A) similarity, with explicit u / w vectors."""
    z = sim.double() / epsilon
    num_visual, num_audio = z.shape
    u = torch.zeros(num_visual, dtype=torch.float64)
    w = torch.zeros(num_audio, dtype=torch.float64)
    for _ in range(iterations):
        u = -math.log(num_visual) - _reference_logsumexp(z + w[None, :], dim=1)
        w = -math.log(num_audio) - _reference_logsumexp(z + u[:, None], dim=0)
    return z + u[:, None] + w[None, :]


def _reference_column_cross_entropy(logits):
    """mean_j (logsumexp_i logits[i, j] - logits[j, j]) for one (N, N) matrix."""
    return (_reference_logsumexp(logits, dim=0) - logits.diagonal()).mean()


def _reference_ot(audio, visual, scale, epsilon=0.1, iterations=50):
    """Per-sample section-4 pipeline; returns plan, loss_v, loss_a, ot_att fused, ot_concat fused."""
    plans, losses_v, losses_a, attended, concatenated = [], [], [], [], []
    for ha, hv in zip(audio.double(), visual.double(), strict=True):
        ha = ha / ha.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        hv = hv / hv.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        sim = hv @ ha.T
        plan = _reference_sinkhorn(sim, epsilon, iterations)
        losses_v.append(_reference_column_cross_entropy(scale * plan @ sim.T))
        losses_a.append(_reference_column_cross_entropy(scale * plan.T @ sim))
        transport = plan.exp()
        attended.append(torch.cat([ha + transport.T @ hv, hv + transport @ ha]))
        concatenated.append(torch.cat([ha, hv]))
        plans.append(plan)
    stacked = (torch.stack(values) for values in (plans, losses_v, losses_a, attended, concatenated))
    plan, loss_v, loss_a, attended, concatenated = stacked
    return plan, loss_v.mean(), loss_a.mean(), attended, concatenated


def _reference_attention(query, key, mha):
    """`mha(query, key, key)` for one sample, query (N, C) and key (M, C), in float64 and written out."""
    heads = mha.num_heads
    w_q, w_k, w_v = mha.in_proj_weight.double().chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.double().chunk(3)

    def split(x):  # (N, C) -> (heads, N, C / heads)
        return x.unflatten(-1, (heads, -1)).transpose(0, 1)

    q, k, v = split(query @ w_q.T + b_q), split(key @ w_k.T + b_k), split(key @ w_v.T + b_v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    attended = (weights @ v).transpose(0, 1).flatten(1)
    return attended @ mha.out_proj.weight.double().T + mha.out_proj.bias.double()


def _released_spread(hv, num_audio):
    """The released channel concatenation's padding of one sample's visual tokens (V, C) to (A, C), loop as written."""
    num_visual = hv.shape[0]
    gap, rem = num_audio // num_visual, num_audio % num_visual
    rows = []
    for i in range(num_visual):
        rows += [hv[i]] + [torch.zeros_like(hv[i])] * (gap - 1)
    rows += [torch.zeros_like(hv[0])] * rem
    return torch.stack(rows)


def _released_ot_fusion(audio, visual, scale, combine):
    """The released OT branch, one sample at a time in float64: bare-norm normalisation, Sinkhorn plan, losses, then
    `combine(ha, hv)` of the normalised tokens. Returns plan, loss_v, loss_a, fused."""
    plans, losses_v, losses_a, fused = [], [], [], []
    for ha, hv in zip(audio.double(), visual.double(), strict=True):
        ha, hv = ha / ha.norm(dim=-1, keepdim=True), hv / hv.norm(dim=-1, keepdim=True)
        sim = hv @ ha.T
        plan = _reference_sinkhorn(sim, 0.1, 50)
        losses_v.append(_reference_column_cross_entropy(scale * plan @ sim.T))
        losses_a.append(_reference_column_cross_entropy(scale * plan.T @ sim))
        plans.append(plan)
        fused.append(combine(ha, hv))
    return torch.stack(plans), torch.stack(losses_v).mean(), torch.stack(losses_a).mean(), torch.stack(fused)


def _randomize(module, seed=3):
    """Random values for every parameter but the logit scale (attention biases start at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name != "logit_scale":
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return module


# ---------------------------------------------------------------- normalize_features


def _normalize_rows():
    """float64 (2, 6, 8) rows: ordinary, all-zero, far below eps, just above eps, huge."""
    x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x[0, 1] = 0
    x[0, 2] *= 1e-9
    x[1, 3] *= 1e-5
    x[1, 4] *= 1e12
    return x


def test_normalize_features_matches_autograd_of_the_formula():
    x = _normalize_rows().requires_grad_()
    reference = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    grad = torch.randn_like(x)
    torch.testing.assert_close(normalize_features(x), reference)
    expected = torch.autograd.grad(reference, x, grad)[0]
    torch.testing.assert_close(torch.autograd.grad(normalize_features(x), x, grad)[0], expected)
    assert torch.equal(normalize_features(x)[0, 1], torch.zeros(8, dtype=torch.float64))


def test_normalize_features_gradcheck():
    x = _normalize_rows()[:, :4].requires_grad_()  # rows whose finite differences stay off the eps kink
    assert torch.autograd.gradcheck(lambda t: normalize_features(t, 1e-6), (x,), eps=1e-10, atol=1e-6)


# ---------------------------------------------------------------- log_sinkhorn


@pytest.mark.parametrize("shape", [(3, 20, 64), (2, 7, 5), (4, 1, 9), (1, 64, 20), (2, 16, 16)])
@pytest.mark.parametrize("kind", ["cosine", "uniform"])
def test_sinkhorn_marginals(shape, kind):
    """Cosine similarities (the paper's input) converge in the paper's 50 iterations; the sharper
    uniform [-1, 1] scores (kernel range 20) can need more, which tests the fixed point itself."""
    batch, num_visual, num_audio = shape
    generator = torch.Generator().manual_seed(1)
    if kind == "cosine":
        visual = normalize_features(torch.randn(batch, num_visual, 768, generator=generator))
        audio = normalize_features(torch.randn(batch, num_audio, 768, generator=generator))
        sim = visual @ audio.transpose(1, 2)
    else:
        sim = torch.rand(shape, generator=generator) * 2 - 1
    plan = log_sinkhorn(sim, 0.1, 50 if kind == "cosine" else 200).exp()
    assert plan.shape == shape
    torch.testing.assert_close(
        plan.sum(2), torch.full((batch, num_visual), 1 / num_visual), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(plan.sum(1), torch.full((batch, num_audio), 1 / num_audio), atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", [(3, 20, 64), (2, 5, 11)])
@pytest.mark.parametrize("epsilon, atol", [(0.1, 1e-5), (0.05, 5e-5), (0.02, 1e-4), (0.005, 1e-3)])
def test_sinkhorn_matches_per_sample_reference(shape, epsilon, atol):
    """Kernel spreads 20 to 400 cover both the bounded-spread fast path and the general path.

    Log-plan entries grow like 1 / epsilon and so does their fp32 rounding: atol follows.
    """
    sim = torch.rand(shape, generator=torch.Generator().manual_seed(2)) * 2 - 1
    plan = log_sinkhorn(sim, epsilon, 50)
    expected = torch.stack([_reference_sinkhorn(s, epsilon, 50) for s in sim])
    assert torch.isfinite(plan).all()
    torch.testing.assert_close(plan.double(), expected, atol=atol, rtol=0)


@pytest.mark.parametrize("pattern", ["one_peak", "one_column", "one_row", "diagonal", "signs"])
def test_sinkhorn_scaling_form_at_its_spread_limit(pattern, monkeypatch):
    """Scores of +-1 shaped to push the scaling form's iterates to their bounds, at a kernel spread just inside
    its limit: the scaling form alone runs (the log-space form is made to fail) and matches the float64
    log-space reference."""

    def general_path(*args):
        raise AssertionError("the log-space form ran")

    monkeypatch.setattr(optimal_transport, "_logsumexp_potentials", general_path)
    num_visual, num_audio = 20, 64
    sim = -torch.ones(2, num_visual, num_audio)
    if pattern == "one_peak":
        sim[:, 0, 0] = 1
    elif pattern == "one_column":
        sim[:, :, 0] = 1
    elif pattern == "one_row":
        sim[:, 0, :] = 1
    elif pattern == "diagonal":
        sim[:, torch.arange(num_visual), torch.arange(num_visual)] = 1
    else:
        sim = torch.randint(0, 2, sim.shape, generator=torch.Generator().manual_seed(5)).float() * 2 - 1
    epsilon = 2 / (optimal_transport._MAX_SCALING_SPREAD - 0.01)
    plan = log_sinkhorn(sim, epsilon, 50)
    expected = torch.stack([_reference_sinkhorn(s, epsilon, 50) for s in sim])
    torch.testing.assert_close(plan.double(), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(
        plan.exp().sum(1), torch.full((2, num_audio), 1 / num_audio), atol=1e-6, rtol=0
    )


def test_ot_modules_never_read_device_data():
    """No host-device sync in the OT path: on the meta device, which holds no data, any read of a value (`.item()`,
    `bool(tensor)`) raises. Sinkhorn picks its form from the cosine bound, not from the similarities."""
    audio = torch.empty(2, 8, HIDDEN, device="meta", requires_grad=True)
    visual = torch.empty(2, 3, HIDDEN, device="meta", requires_grad=True)
    for fusion_type in OT_TYPES:
        out = build_fusion(fusion_type, HIDDEN).to("meta")(audio, visual, output_ot_plan=True)
        assert out.log_plan.shape == (2, 3, 8) and out.log_plan.device.type == "meta"
        (out.loss_v + out.loss_a + out.fused.sum()).backward()
    similarity = torch.empty(2, 3, 8, device="meta")
    assert log_sinkhorn(similarity, 0.1, 5, max_abs_similarity=1.0).shape == (2, 3, 8)
    with pytest.raises((RuntimeError, NotImplementedError)):  # without a bound the data decide: a sync
        log_sinkhorn(similarity, 0.1, 5)


@pytest.mark.parametrize("epsilon", [0.1, 0.05])
def test_sinkhorn_with_a_bound_matches_sinkhorn_without(epsilon):
    """The bound only chooses the form (scaling at epsilon 0.1, log space at 0.05); the plan is the same."""
    generator = torch.Generator().manual_seed(6)
    visual = normalize_features(torch.randn(3, 20, 768, generator=generator))
    audio = normalize_features(torch.randn(3, 64, 768, generator=generator))
    similarity = visual @ audio.transpose(1, 2)
    torch.testing.assert_close(
        log_sinkhorn(similarity, epsilon, 50, max_abs_similarity=1.0),
        log_sinkhorn(similarity, epsilon, 50),
        atol=2e-5,
        rtol=0,
    )


def test_sinkhorn_is_fp32_and_has_no_gradient():
    sim = torch.rand(2, 4, 6, dtype=torch.bfloat16, requires_grad=True)
    plan = log_sinkhorn(sim, 0.1, 10)
    assert plan.dtype == torch.float32
    assert not plan.requires_grad


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"similarity": torch.rand(4, 6), "epsilon": 0.1, "num_iterations": 5}, "shape"),
        ({"similarity": torch.rand(1, 4, 6), "epsilon": 0.0, "num_iterations": 5}, "epsilon"),
        ({"similarity": torch.rand(1, 4, 6), "epsilon": 0.1, "num_iterations": -1}, "iterations"),
    ],
)
def test_sinkhorn_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        log_sinkhorn(**kwargs)


# ---------------------------------------------------------------- alignment loss


def test_alignment_loss_matches_reference_and_gradients():
    generator = torch.Generator().manual_seed(3)
    sim = (torch.rand(3, 6, 10, generator=generator) * 2 - 1).requires_grad_()
    log_plan = log_sinkhorn(sim, 0.1, 50).requires_grad_()
    scale = torch.tensor(2.5, requires_grad=True)
    loss_v, loss_a = ot_alignment_loss(sim, log_plan, scale)

    expected_v = torch.stack(
        [_reference_column_cross_entropy(2.5 * p @ s.T) for p, s in zip(log_plan, sim, strict=True)]
    )
    expected_a = torch.stack(
        [_reference_column_cross_entropy(2.5 * p.T @ s) for p, s in zip(log_plan, sim, strict=True)]
    )
    torch.testing.assert_close(loss_v, expected_v.mean().detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_a, expected_a.mean().detach(), atol=1e-5, rtol=1e-5)

    (loss_v + loss_a).backward()
    assert sim.grad is not None and sim.grad.abs().sum() > 0
    assert scale.grad is not None and scale.grad != 0
    assert log_plan.grad is None


def test_alignment_loss_is_fp32_for_half_inputs():
    sim = torch.rand(2, 4, 6) * 2 - 1
    log_plan = log_sinkhorn(sim, 0.1, 50)
    scale = torch.tensor(3.0)
    reference = ot_alignment_loss(sim.bfloat16().float(), log_plan, scale)
    for loss, expected in zip(
        ot_alignment_loss(sim.bfloat16(), log_plan, scale.bfloat16()), reference, strict=True
    ):
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, expected)


# ---------------------------------------------------------------- OT fusion modules


@pytest.mark.parametrize("num_audio, num_visual", [(64, 20), (9, 4)])
def test_ot_fusions_match_per_sample_reference(num_audio, num_visual):
    audio, visual = _features(3, num_audio, num_visual)
    scale = math.log(1 / 0.07)
    plan, loss_v, loss_a, attended, concatenated = _reference_ot(audio, visual, scale)
    for fusion_type, expected_fused in (("ot_att", attended), ("ot_concat", concatenated)):
        out = build_fusion(fusion_type, HIDDEN)(audio, visual, output_ot_plan=True)
        torch.testing.assert_close(out.log_plan.double(), plan, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(out.loss_v.double(), loss_v, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(out.loss_a.double(), loss_a, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(out.fused.double(), expected_fused, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("num_audio, num_visual", [(64, 20), (9, 4)])
def test_ot_cross_attention_matches_the_released_computation(num_audio, num_visual):
    """Released `ot_crossattn`: `cross_attn(ha, hv, hv) + ha` on the normalised tokens, with the OT loss."""
    hidden = 128  # 2 heads, hidden // 64 as released
    audio, visual = _features(3, num_audio, num_visual, hidden=hidden)
    fusion = _randomize(build_fusion("ot_cross_attention", hidden))
    assert fusion.cross_attn.num_heads == 2
    plan, loss_v, loss_a, fused = _released_ot_fusion(
        audio, visual, math.log(1 / 0.07), lambda ha, hv: _reference_attention(ha, hv, fusion.cross_attn) + ha
    )
    out = fusion(audio, visual, output_ot_plan=True)
    assert out.fused.shape == (3, num_audio, hidden)
    torch.testing.assert_close(out.log_plan.double(), plan, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out.loss_v.double(), loss_v, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out.loss_a.double(), loss_a, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out.fused.double(), fused, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_audio, num_visual", [(64, 20), (9, 4), (6, 6)])
def test_ot_channel_concat_matches_the_released_computation(num_audio, num_visual):
    """Released `ot_chancat`: the normalised audio tokens with the padded normalised visual tokens on channels."""
    audio, visual = _features(3, num_audio, num_visual)
    plan, loss_v, loss_a, fused = _released_ot_fusion(
        audio,
        visual,
        math.log(1 / 0.07),
        lambda ha, hv: torch.cat([ha, _released_spread(hv, len(ha))], dim=-1),
    )
    out = build_fusion("ot_channel_concat", HIDDEN)(audio, visual, output_ot_plan=True)
    assert out.fused.shape == (3, num_audio, 2 * HIDDEN)
    torch.testing.assert_close(out.log_plan.double(), plan, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out.loss_v.double(), loss_v, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out.loss_a.double(), loss_a, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out.fused.double(), fused, atol=1e-6, rtol=1e-6)


def test_ot_cross_attention_in_a_bf16_model():
    """A bf16 model: the attention runs in bf16 on the fp32 normalised tokens, the fused tokens come out in bf16."""
    audio, visual = _features(2, 12, 5, hidden=128)
    fusion = _randomize(build_fusion("ot_cross_attention", 128))
    full = fusion(audio, visual).fused
    half = fusion.to(torch.bfloat16)(audio.bfloat16(), visual.bfloat16())
    assert half.fused.dtype == torch.bfloat16 and half.loss_v.dtype == torch.float32
    torch.testing.assert_close(half.fused.float(), full, atol=5e-2, rtol=5e-2)


def test_ot_hyperparameters_are_used():
    audio, visual = _features(2, 12, 5)
    plan, loss_v, _, _, _ = _reference_ot(audio, visual, scale=1.5, epsilon=0.3, iterations=7)
    fusion = build_fusion("ot_att", HIDDEN, sinkhorn_epsilon=0.3, sinkhorn_iterations=7, logit_scale_init=1.5)
    out = fusion(audio, visual, output_ot_plan=True)
    torch.testing.assert_close(out.log_plan.double(), plan, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out.loss_v.double(), loss_v, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("fusion_type", OT_TYPES)
def test_ot_gradients(fusion_type):
    audio, visual = _features(2, 12, 5)
    audio.requires_grad_()
    visual.requires_grad_()
    fusion = build_fusion(fusion_type, HIDDEN)
    out = fusion(audio, visual, output_ot_plan=True)
    assert not out.log_plan.requires_grad
    out.loss_a.backward()
    assert audio.grad.abs().sum() > 0 and visual.grad.abs().sum() > 0
    assert fusion.logit_scale.grad != 0


def test_two_forwards_before_one_backward():
    """The in-place clamp of a later forward must not break the graph of an earlier one."""
    audio, visual = _features(2, 12, 5)
    fusion = build_fusion("ot_att", HIDDEN)
    first, second = fusion(audio, visual), fusion(audio, visual)
    (first.loss_v + second.loss_v).backward()
    assert torch.isfinite(fusion.logit_scale.grad)


# models/lavcaps.py of the release: `self.logit_scale.clamp_(0, 4.6052)` (ln 100 = 4.6051702 rounded up).
RELEASED_LOGIT_SCALE_MAX = 4.6052


@pytest.mark.parametrize("initial, clamped", [(10.0, RELEASED_LOGIT_SCALE_MAX), (-1.0, 0.0), (1.0, 1.0)])
def test_logit_scale_is_clamped_in_place(initial, clamped):
    audio, visual = _features(2, 12, 5)
    fusion = build_fusion("ot_att", HIDDEN)
    with torch.no_grad():
        fusion.logit_scale.fill_(initial)
    out = fusion(audio, visual, output_ot_plan=True)
    # Bit for bit what the release's fp32 parameter holds after its clamp.
    assert fusion.logit_scale.item() == torch.tensor(clamped, dtype=torch.float32).item()
    sim = normalize_features(visual) @ normalize_features(audio).transpose(1, 2)
    expected_v, _ = ot_alignment_loss(sim, out.log_plan, torch.tensor(clamped))
    torch.testing.assert_close(out.loss_v, expected_v)


def test_ot_fusion_runs_under_inference_mode():
    audio, visual = _features(2, 12, 5)
    fusion = build_fusion("ot_att", HIDDEN)
    with torch.no_grad():
        fusion.logit_scale.fill_(9.0)
    with torch.inference_mode():
        out = fusion(audio, visual)
    assert torch.isfinite(out.loss_v)
    assert fusion.logit_scale.item() == torch.tensor(RELEASED_LOGIT_SCALE_MAX, dtype=torch.float32).item()


def test_logit_scale_is_a_scalar_parameter():
    fusion = build_fusion("ot_att", HIDDEN)
    assert dict(fusion.named_parameters()).keys() == {"logit_scale"}
    assert fusion.logit_scale.shape == () and fusion.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


@pytest.mark.parametrize("fusion_type", OT_TYPES)
@pytest.mark.parametrize("zero", ["audio", "visual", "both", "one_row"])
def test_zero_features_stay_finite(fusion_type, zero):
    audio, visual = _features(2, 12, 5)
    if zero in ("audio", "both"):
        audio.zero_()
    if zero in ("visual", "both"):
        visual.zero_()
    if zero == "one_row":
        audio[0, 3] = 0
    audio.requires_grad_()
    out = build_fusion(fusion_type, HIDDEN)(audio, visual, output_ot_plan=True)
    for tensor in (out.fused, out.loss_v, out.loss_a, out.log_plan):
        assert torch.isfinite(tensor).all()
    (out.loss_v + out.loss_a + out.fused.sum()).backward()
    assert torch.isfinite(audio.grad).all()


@pytest.mark.parametrize("fusion_type", OT_TYPES)
def test_large_norms_match_unit_scale(fusion_type):
    audio, visual = _features(2, 12, 5)
    fusion = build_fusion(fusion_type, HIDDEN)
    small = fusion(audio, visual, output_ot_plan=True)
    large = fusion(audio * 1e15, visual * 1e6, output_ot_plan=True)
    for a, b in zip(
        (small.fused, small.loss_v, small.loss_a), (large.fused, large.loss_v, large.loss_a), strict=True
    ):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fusion_type", OT_TYPES)
def test_half_precision_inputs(fusion_type, dtype):
    audio, visual = _features(2, 64, 20)
    fusion = build_fusion(fusion_type, HIDDEN)
    half = fusion(audio.to(dtype), visual.to(dtype), output_ot_plan=True)
    upcast = fusion(audio.to(dtype).float(), visual.to(dtype).float(), output_ot_plan=True)
    full = fusion(audio, visual, output_ot_plan=True)
    assert half.fused.dtype == dtype
    assert half.loss_v.dtype == half.loss_a.dtype == half.log_plan.dtype == torch.float32
    # Internals run in fp32: identical to fp32 on the rounded inputs up to the final cast of `fused`.
    torch.testing.assert_close(half.loss_v, upcast.loss_v)
    torch.testing.assert_close(half.log_plan, upcast.log_plan)
    torch.testing.assert_close(half.fused, upcast.fused.to(dtype))
    # Close to the fp32 result on the unrounded inputs (loss and plan move with the input rounding).
    torch.testing.assert_close(half.loss_v, full.loss_v, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(half.loss_a, full.loss_a, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(half.fused.float(), full.fused, atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------- all fusion types


@pytest.mark.parametrize("fusion_type", FUSION_TYPES)
def test_output_shape_and_token_count(fusion_type):
    num_audio, num_visual = 64, 20
    audio, visual = _features(2, num_audio, num_visual, hidden=128)
    fusion = build_fusion(fusion_type, 128)
    assert isinstance(fusion, AudioVisualFusion) and fusion.fusion_type == fusion_type
    out = fusion(audio, visual, output_ot_plan=True)
    tokens = {"ot_att": 84, "ot_concat": 84, "concat": 104, "concat_once": 84, "visual_only": 20}.get(
        fusion_type, 64
    )
    assert out.fused.shape == (2, tokens, fusion.output_dim)
    assert fusion.output_dim == (256 if fusion_type in ("channel_concat", "ot_channel_concat") else 128)
    if fusion_type in OT_TYPES:
        assert out.log_plan.shape == (2, num_visual, num_audio)
        assert out.loss_v.shape == out.loss_a.shape == ()
        assert fusion(audio, visual).log_plan is None
    else:
        assert out.loss_v is None and out.loss_a is None and out.log_plan is None


def test_raw_feature_fusions():
    audio, visual = _features(2, 12, 5)
    torch.testing.assert_close(
        build_fusion("concat", HIDDEN)(audio, visual).fused, torch.cat([audio, visual, visual], 1)
    )
    torch.testing.assert_close(
        build_fusion("concat_once", HIDDEN)(audio, visual).fused, torch.cat([audio, visual], 1)
    )
    assert build_fusion("audio_only", HIDDEN)(audio, None).fused is audio
    assert build_fusion("visual_only", HIDDEN)(None, visual).fused is visual


def test_concat_is_the_released_tempcat_bfQF():
    """Released `tempcat_bfQF` without Q-Former: [ha, hv] before the (skipped) Q-Former, hv once more after it."""
    audio, visual = _features(2, 64, 20)
    fused = build_fusion("concat", HIDDEN)(audio, visual).fused
    assert fused.shape == (2, 104, HIDDEN)
    for start, stop, expected in ((0, 64, audio), (64, 84, visual), (84, 104, visual)):
        torch.testing.assert_close(fused[:, start:stop], expected, rtol=0, atol=0)


@pytest.mark.parametrize("num_audio, num_visual", [(64, 20), (12, 5), (6, 6), (7, 1)])
def test_channel_concat_placement(num_audio, num_visual):
    audio, visual = _features(2, num_audio, num_visual)
    fused = build_fusion("channel_concat", HIDDEN)(audio, visual).fused
    gap = num_audio // num_visual
    expected_visual = torch.zeros_like(audio)
    for i in range(num_visual):
        expected_visual[:, i * gap] = visual[:, i]
    torch.testing.assert_close(fused, torch.cat([audio, expected_visual], dim=-1))


@pytest.mark.parametrize("fusion_type", ["channel_concat", "ot_channel_concat"])
def test_channel_concat_needs_enough_audio_tokens(fusion_type):
    audio, visual = _features(1, 3, 5)
    with pytest.raises(ValueError, match="at least as many audio"):
        build_fusion(fusion_type, HIDDEN)(audio, visual)


def test_plain_cross_attention_matches_manual_attention():
    """Raw tokens, no normalisation and no OT: `cross_attn(ha, hv, hv) + ha`."""
    hidden = 128
    audio, visual = _features(2, 12, 5, hidden=hidden)
    fusion = _randomize(build_fusion("plain_cross_attention", hidden))
    assert fusion.cross_attn.num_heads == 2  # hidden // 64
    expected = torch.stack(
        [
            _reference_attention(ha, hv, fusion.cross_attn) + ha
            for ha, hv in zip(audio.double(), visual.double(), strict=True)
        ]
    )
    out = fusion(audio, visual)
    assert out.loss_v is None
    torch.testing.assert_close(out.fused.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fusion_type", ["plain_cross_attention", "ot_cross_attention"])
def test_cross_attention_heads(fusion_type):
    assert build_fusion(fusion_type, 32).cross_attn.num_heads == 1
    assert build_fusion(fusion_type, 768).cross_attn.num_heads == 12
    assert build_fusion(fusion_type, 192).cross_attn.num_heads == 3
    with pytest.raises(ValueError, match="hidden_size 200 is not divisible by its 3 heads"):
        build_fusion(fusion_type, 200)


@pytest.mark.parametrize("fusion_type", [t for t in FUSION_TYPES if t != "visual_only"])
def test_missing_audio_is_rejected(fusion_type):
    _, visual = _features(1, 12, 5)
    with pytest.raises(ValueError, match="audio_tokens"):
        build_fusion(fusion_type, HIDDEN)(None, visual)


@pytest.mark.parametrize("fusion_type", [t for t in FUSION_TYPES if t != "audio_only"])
def test_missing_visual_is_rejected(fusion_type):
    audio, _ = _features(1, 12, 5)
    with pytest.raises(ValueError, match="visual_tokens"):
        build_fusion(fusion_type, HIDDEN)(audio, None)


def test_inconsistent_inputs_are_rejected():
    audio, visual = _features(2, 12, 5)
    fusion = build_fusion("ot_att", HIDDEN)
    with pytest.raises(ValueError, match="batch sizes"):
        fusion(audio, visual[:1])
    with pytest.raises(ValueError, match="visual_tokens must have shape"):
        fusion(audio, visual[..., :-1])
    with pytest.raises(ValueError, match="unknown fusion_type"):
        build_fusion("ot_tempcat", HIDDEN)


# Each fusion type as stated here, independently of `FUSIONS`: the fused sequence's length at the paper's sizes (64
# audio tokens, 20 visual), whether it trains with the OT alignment loss, which modalities it reads, and the
# `fusion_type` values of the released code that compute it, spelled as there (models/lavcaps.py, the comments
# beside its projections and configs/config_best.yaml; "ot_crossattn" is its OT branch's `"crossattn" in fusion_type`).
FUSION_FACTS = {
    # fusion type: (fused tokens at A=64, V=20; OT loss; reads audio; reads frames; released fusion_type values)
    "ot_att": (84, True, True, True, ("ot_tempcat_QAV_add",)),
    "ot_concat": (84, True, True, True, ("ot_tempcat", "ot_tempcat_bfQF", "ot_tempcat_afQF")),
    "ot_channel_concat": (64, True, True, True, ("ot_chancat", "ot_chancat_bfQF", "ot_chancat_afQF")),
    "ot_cross_attention": (64, True, True, True, ("ot_crossattn",)),
    "concat": (104, False, True, True, ("tempcat_bfQF",)),
    "channel_concat": (64, False, True, True, ("chancat_bfQF",)),
    "audio_only": (64, False, True, False, ("crossattn",)),
    "visual_only": (20, False, False, True, ()),
    "concat_once": (84, False, True, True, ("tempcat_afQF",)),
    "plain_cross_attention": (64, False, True, True, ()),
}


@pytest.mark.parametrize("fusion_type", FUSION_TYPES)
def test_the_table_describes_what_each_module_does(fusion_type):
    """`FUSIONS` and the module it builds against `FUSION_FACTS`: fused length at the paper's sizes, OT or not,
    modalities read."""
    fused_tokens, ot_loss, reads_audio, reads_visual, _ = FUSION_FACTS[fusion_type]
    spec = FUSIONS[fusion_type]
    fusion = build_fusion(fusion_type, HIDDEN)
    assert fusion.fusion_type == fusion_type
    assert (spec.uses_ot, spec.uses_audio, spec.uses_visual) == (ot_loss, reads_audio, reads_visual)
    assert isinstance(fusion, OptimalTransportFusion) == ot_loss
    assert sum(spec.token_counts(64, 20)) == fused_tokens
    audio, visual = _features(2, 64, 20)
    out = fusion(audio if reads_audio else None, visual if reads_visual else None)
    assert out.fused.shape == (2, fused_tokens, fusion.output_dim)
    assert (out.loss_v is not None) == (out.loss_a is not None) == ot_loss


def test_fusion_type_lists_derive_from_the_table():
    # Every type, in the order stated above (the paper's model first).
    assert FUSION_TYPES == tuple(FUSION_FACTS)
    assert OT_FUSION_TYPES == ("ot_att", "ot_concat", "ot_channel_concat", "ot_cross_attention")
    assert {name: spec.released_names for name, spec in FUSIONS.items()} == {
        name: facts[-1] for name, facts in FUSION_FACTS.items()
    }
    released = [name for spec in FUSIONS.values() for name in spec.released_names]
    assert len(released) == len(set(released)), "a released name maps to two fusion types"
