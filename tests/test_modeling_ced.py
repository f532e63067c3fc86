"""CED's attention on transformers' `AttentionInterface`: eager, sdpa (and flash where installed) agree, and the
implementation follows `config._attn_implementation`, `set_attn_implementation` and `attn_implementation=`."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.utils import is_flash_attn_2_available

from lavcap_hf import CedConfig, CedModel


def tiny_ced(attn_implementation: str | None = None, seed: int = 0) -> CedModel:
    config = CedConfig(target_length=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(seed)
    model = (
        CedModel(config)
        if attn_implementation is None
        else CedModel._from_config(config, attn_implementation=attn_implementation)
    )
    return model.eval()


def features(batch: int = 2, frames: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, frames, 64, generator=torch.Generator().manual_seed(seed))


def test_sdpa_is_the_default_and_matches_eager_in_float32() -> None:
    model = tiny_ced()
    assert model.config._attn_implementation == "sdpa"
    inputs = features()
    with torch.no_grad():
        sdpa = model(inputs, output_hidden_states=True)
        model.set_attn_implementation("eager")
        eager = model(inputs, output_hidden_states=True)
    torch.testing.assert_close(sdpa.last_hidden_state, eager.last_hidden_state, atol=1e-5, rtol=0)
    for a, b in zip(sdpa.hidden_states, eager.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_only_eager_returns_attention_weights() -> None:
    model = tiny_ced("eager")
    with torch.no_grad():
        out = model(features(batch=3, frames=32), output_attentions=True)
    tokens = (64 // 16) * (32 // 16)
    assert len(out.attentions) == model.config.num_hidden_layers
    for weights in out.attentions:
        assert weights.shape == (3, model.config.num_attention_heads, tokens, tokens)
        torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4, tokens))
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        assert model(features(), output_attentions=True).attentions == (None, None)


def test_from_pretrained_takes_attn_implementation(tmp_path) -> None:
    tiny_ced().save_pretrained(tmp_path)
    inputs = features()
    loaded = {
        name: CedModel.from_pretrained(tmp_path, attn_implementation=name).eval()
        for name in ("eager", "sdpa")
    }
    assert {name: model.config._attn_implementation for name, model in loaded.items()} == {
        "eager": "eager",
        "sdpa": "sdpa",
    }
    with torch.no_grad():
        eager, sdpa = (loaded[name](inputs, output_attentions=True) for name in ("eager", "sdpa"))
    assert eager.attentions[0] is not None and sdpa.attentions[0] is None  # each ran its own implementation
    torch.testing.assert_close(eager.last_hidden_state, sdpa.last_hidden_state, atol=1e-5, rtol=0)


def test_a_registered_attention_function_is_dispatched_to() -> None:
    calls = []

    def counting_sdpa(module, query, key, value, attention_mask, **kwargs):
        calls.append(query.shape)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("lavcap_test_counting_sdpa", counting_sdpa)
    model = tiny_ced()
    with torch.no_grad():
        expected = model(features()).last_hidden_state
        model.set_attn_implementation("lavcap_test_counting_sdpa")
        got = model(features()).last_hidden_state
    assert calls == [(2, 4, 16, 8)] * model.config.num_hidden_layers  # (B, heads, tokens, head_dim) per block
    torch.testing.assert_close(got, expected)


def test_an_unknown_attention_implementation_is_refused() -> None:
    model = tiny_ced()
    try:  # 5.x raises; 4.55 logs a warning
        model.set_attn_implementation("no_such_attention")
    except (ValueError, KeyError) as error:
        assert "no_such_attention" in str(error)
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        model(features())


@pytest.mark.skipif(
    not (torch.cuda.is_available() and is_flash_attn_2_available()),
    reason="flash-attn needs CUDA and flash_attn",
)
def test_flash_attention_matches_sdpa_in_half_precision() -> None:
    model = tiny_ced().to("cuda", torch.bfloat16)
    inputs = features().to("cuda")
    with torch.no_grad():
        sdpa = model(inputs).last_hidden_state
        model.set_attn_implementation("flash_attention_2")
        flash = model(inputs).last_hidden_state
    torch.testing.assert_close(flash, sdpa, atol=2e-2, rtol=2e-2)
