"""Numerics of the OT fusion inside the full model in bf16 and fp16 (both run on CPU with torch 2.13).

Degenerate inputs (silent audio, constant frames, identical audio tokens, all-zero audio or visual features) and
very large feature norms go through `forward` (with backward) and `generate()`. The OT plan, OT loss and logits
must stay finite and the plan keep its marginals (rows 1/V, columns 1/A). References are computed here:
- when one modality's tokens are all equal (or all zero), every row of S is the same (or every column), so the
  plan is uniform, 1/(V*A), and each softmax of the alignment loss is uniform: ot_loss = log V + log A;
- otherwise a float64 Sinkhorn and alignment loss on the model's own (low-precision) audio and visual tokens.
All-zero features are the case where the released code's `x / ||x||` gives NaN.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from lavcap_hf import LavCapForConditionalGeneration, LavCapProcessor
from lavcap_hf.testing.configs import tiny_lavcap_config
from lavcap_hf.testing.tokenizers import word_level_tokenizer

RATE = 16000
NUM_FRAMES = 4
CAPTION = "a dog barks"
DTYPES = [torch.bfloat16, torch.float16]
# Entries this large make the sum of squares overflow the dtype itself (fp16 max 65504; bf16 squares of 1e15 stay
# within fp32, which the fusion normalises in): the norm must not be taken in the model's dtype.
LARGE = {torch.float16: 2e3, torch.bfloat16: 1e15}
DEGENERATE = ["constant_frames", "identical_audio_tokens", "zero_audio", "zero_visual"]
CASES = ["silent_audio", "large_norms", *DEGENERATE]


@pytest.fixture(scope="module")
def tokenizer():
    return word_level_tokenizer([CAPTION])


@pytest.fixture(scope="module")
def base_model(tokenizer) -> LavCapForConditionalGeneration:
    config = tiny_lavcap_config("ot_att", vocab_size=len(tokenizer), num_frames=NUM_FRAMES)
    torch.manual_seed(0)
    return LavCapForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def processor(base_model, tokenizer) -> LavCapProcessor:
    return LavCapProcessor.from_model_config(base_model.config, tokenizer)


def build_case(
    case: str, dtype: torch.dtype, base_model, processor, caption: str | None = CAPTION
) -> tuple[LavCapForConditionalGeneration, dict]:
    """A copy of the tiny model in `dtype`, edited for the case, and its inputs (prompt, plus `caption` as labels)."""
    model = copy.deepcopy(base_model).to(dtype)
    rng = np.random.default_rng(0)
    audio = 0.3 * rng.standard_normal(RATE).astype(np.float32)
    frames = rng.integers(0, 256, (NUM_FRAMES, 32, 32, 3), dtype=np.uint8)
    media: dict = {"videos": frames}
    final_norm = model.model.audio_tower.norm
    with torch.no_grad():
        if case == "silent_audio":
            audio = np.zeros(RATE, np.float32)
        elif case == "constant_frames":
            media = {"videos": np.full((NUM_FRAMES, 32, 32, 3), 90, np.uint8)}
        elif case == "identical_audio_tokens":
            # The encoder's last LayerNorm with zero gain emits its bias for every token.
            final_norm.weight.zero_()
            final_norm.bias.copy_(torch.randn(final_norm.bias.shape))
        elif case == "zero_audio":
            final_norm.weight.zero_()
            final_norm.bias.zero_()
        elif case == "zero_visual":
            media = {"video_embeds": np.zeros((NUM_FRAMES, model.config.visual_embed_dim), np.float32)}
        elif case == "large_norms":
            final_norm.weight.mul_(LARGE[dtype])
            embeds = LARGE[dtype] * rng.standard_normal((NUM_FRAMES, model.config.visual_embed_dim))
            media = {"video_embeds": embeds.astype(np.float32)}
    inputs = processor(audio=audio, sampling_rate=RATE, captions=caption, **media)
    for key in ("input_features", "pixel_values_videos", "video_embeds"):
        if key in inputs:
            inputs[key] = inputs[key].to(dtype)
    return model, inputs


def reference_ot(
    audio: torch.Tensor, visual: torch.Tensor, epsilon: float, iterations: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 plan (B, V, A) and ot_loss of docs/architecture.md, equations (1)-(13), eps-guarded."""
    audio, visual = audio.double(), visual.double()
    audio = audio / audio.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    visual = visual / visual.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    similarity = visual @ audio.transpose(1, 2)
    kernel = similarity / epsilon
    num_visual, num_audio = kernel.shape[1:]
    u = torch.zeros_like(kernel[:, :, :1])
    w = torch.zeros_like(kernel[:, :1, :])
    for _ in range(iterations):
        u = -math.log(num_visual) - torch.logsumexp(kernel + w, dim=2, keepdim=True)
        w = -math.log(num_audio) - torch.logsumexp(kernel + u, dim=1, keepdim=True)
    log_plan = kernel + u + w
    loss = 0.0
    for logits in (
        scale * log_plan @ similarity.transpose(1, 2),
        scale * log_plan.transpose(1, 2) @ similarity,
    ):
        # Softmax over the first index of each column j, target j.
        log_probs = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        loss = loss - torch.diagonal(log_probs, dim1=1, dim2=2).mean()
    return log_plan.exp(), loss


def check_plan_marginals(plan: torch.Tensor) -> None:
    num_visual, num_audio = plan.shape[1:]
    assert torch.isfinite(plan).all() and (plan >= 0).all()
    torch.testing.assert_close(plan.sum(2), torch.full_like(plan.sum(2), 1 / num_visual), atol=1e-5, rtol=0)
    torch.testing.assert_close(plan.sum(1), torch.full_like(plan.sum(1), 1 / num_audio), atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_keeps_ot_and_logits_finite(case: str, dtype: torch.dtype, base_model, processor) -> None:
    model, inputs = build_case(case, dtype, base_model, processor)
    config = model.config
    out = model(**inputs, output_ot_plan=True)
    assert out.logits.dtype == dtype and torch.isfinite(out.logits).all()
    assert torch.isfinite(out.loss) and torch.isfinite(out.lm_loss) and torch.isfinite(out.ot_loss)
    torch.testing.assert_close(out.loss, out.lm_loss + out.ot_loss)
    plan = out.ot_plan
    assert plan.dtype == torch.float32 and plan.shape == (1, NUM_FRAMES, config.num_audio_tokens)
    check_plan_marginals(plan)
    if case in DEGENERATE:
        num_visual, num_audio = plan.shape[1:]
        torch.testing.assert_close(
            plan, torch.full_like(plan, 1 / (num_visual * num_audio)), atol=1e-6, rtol=0
        )
        expected_loss = config.ot_loss_weight * (math.log(num_visual) + math.log(num_audio))
        assert out.ot_loss.item() == pytest.approx(expected_loss, rel=1e-5)
    else:
        media = {
            k: inputs[k] for k in ("input_features", "pixel_values_videos", "video_embeds") if k in inputs
        }
        with torch.no_grad():
            front = model.get_multimodal_features(**media)
        scale = min(max(config.logit_scale_init, 0.0), config.logit_scale_max)
        expected_plan, expected_loss = reference_ot(
            front.audio_embeds, front.video_embeds, config.sinkhorn_epsilon, config.sinkhorn_iterations, scale
        )
        torch.testing.assert_close(plan.double(), expected_plan, atol=1e-6, rtol=1e-4)
        assert out.ot_loss.item() == pytest.approx(expected_loss.item(), rel=1e-4)
    if dtype == torch.float16 and case == "zero_audio":
        # Known limit: the lm-loss gradient through x / max(||x||, eps) at x = 0 has gain 1/eps = 1e6, which
        # overflows fp16 inside the audio tower (inf, then inf * 0 = NaN in its zero-gain LayerNorm). bf16 and
        # fp32 are fine, and so are the OT loss's own gradients, checked here.
        out.ot_loss.backward()
    else:
        out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(model.model.fusion.logit_scale.grad)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_generate_gives_finite_scores(case: str, dtype: torch.dtype, base_model, processor) -> None:
    model, prompt = build_case(case, dtype, base_model, processor, caption=None)
    with torch.no_grad():
        generated = model.generate(
            **prompt,
            max_new_tokens=3,
            min_new_tokens=3,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    length = prompt["input_ids"].shape[1]
    assert torch.equal(generated.sequences[:, :length], prompt["input_ids"])
    assert generated.sequences.shape[1] == length + 3
    # Raw logits: the processed scores hold -inf for EOS while min_new_tokens forbids it.
    assert len(generated.logits) == 3 and all(torch.isfinite(step).all() for step in generated.logits)
