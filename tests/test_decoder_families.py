"""Any causal LM of transformers as LAVCap's decoder: the families below, tied or untied, each with its own names for
the embeddings (`embed_tokens`, GPT-2's `wte`, OPT's `decoder.embed_tokens`, GPT-NeoX's `embed_in`) and for the
attention projections (`q_proj`/`v_proj`, GPT-2's `c_attn`, GPT-NeoX's `query_key_value`), build from a tiny config,
caption with beams, train a LoRA step, save and reload, and resize their vocabulary."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from test_modeling_lavcap import make_batch
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from lavcap_hf import LavCapForConditionalGeneration
from lavcap_hf.lora import apply_lora, lavcap_lora_config
from lavcap_hf.testing.configs import tiny_lavcap_config

VOCAB = 96
SPECIAL_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
FAMILIES: dict[str, dict] = {
    "llama": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "tie_word_embeddings": False},
    "qwen2": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "tie_word_embeddings": True},
    "mistral": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "tie_word_embeddings": False},
    "gemma": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": True},
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512, "tie_word_embeddings": True},
    "opt": {"hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "word_embed_proj_dim": 64, "max_position_embeddings": 512, "tie_word_embeddings": True},
    "gpt_neox": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "max_position_embeddings": 512, "tie_word_embeddings": False},
}  # fmt: skip
"""Two-layer decoders of each family; GPT-2 and OPT tie their embeddings under names other than LLaMA's."""


def text_config(family: str) -> PretrainedConfig:
    return AutoConfig.for_model(family, vocab_size=VOCAB, **SPECIAL_IDS, **FAMILIES[family])


def build(family: str, seed: int = 0) -> LavCapForConditionalGeneration:
    torch.manual_seed(seed)
    return LavCapForConditionalGeneration(
        tiny_lavcap_config(vocab_size=VOCAB, text_config=text_config(family))
    )


def is_tied(model: LavCapForConditionalGeneration) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def prompts(model: LavCapForConditionalGeneration) -> dict[str, torch.Tensor]:
    """Two left-padded prompts of different lengths (placeholders, then a caption prefix) and their clips."""
    batch = make_batch(model.config, [2, 4], seed=1)
    return {k: v for k, v in batch.items() if k != "labels"}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_head_is_tied_exactly_when_the_decoder_ties_it(family: str) -> None:
    model = build(family)
    assert is_tied(model) == FAMILIES[family]["tie_word_embeddings"]


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_returns_every_beam_of_every_clip(family: str) -> None:
    """Two clips, two beams each returned: four rows, each starting with its clip's prompt; reading each prompt once
    and repeating the decoder's cache for the beams gives the tokens of reading it once per beam."""
    model = build(family).eval()
    batch = prompts(model)
    settings = {"num_beams": 2, "num_return_sequences": 2, "max_new_tokens": 4, "min_new_tokens": 4}
    with torch.no_grad():
        shared = model.generate(**batch, **settings)
        per_beam = model.generate(**batch, **settings, share_prefill=False)
    assert shared.shape == (4, batch["input_ids"].shape[1] + 4)
    assert torch.equal(
        shared[:, : batch["input_ids"].shape[1]], batch["input_ids"].repeat_interleave(2, dim=0)
    )
    assert torch.equal(shared, per_beam)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_steps_train_the_decoder_and_the_saved_adapters_reload(family: str, tmp_path) -> None:
    """The default adapters reach the decoder's attention whatever its family names it (GPT-2's `c_attn` is a
    transposed `Conv1D`); training them lowers the loss of the batch, and the saved adapters on a fresh copy of the
    base model give the trained model's logits."""
    model = apply_lora(build(family), lavcap_lora_config(lora_dropout=0.0, text_model_type=family)).train()
    batch = make_batch(model.config, [3, 5], seed=2)
    decoder_adapters = {
        name: p for name, p in model.named_parameters() if "language_model" in name and "lora_" in name
    }
    assert decoder_adapters, "no adapter in the decoder"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        if not losses:
            reached = [
                name for name, p in decoder_adapters.items() if p.grad is not None and p.grad.abs().sum() > 0
            ]
            assert reached, "no gradient reaches the decoder's adapters"
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        trained = model(**batch)
    assert trained.loss.item() < losses[0]
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(build(family), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, trained.logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_reload_give_the_same_model(family: str, tmp_path) -> None:
    model = build(family).eval()
    batch = prompts(model)
    model.save_pretrained(tmp_path)
    reloaded = LavCapForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert is_tied(reloaded) == is_tied(model)
    greedy = {"do_sample": False, "max_new_tokens": 4, "min_new_tokens": 4}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
        assert torch.equal(reloaded.generate(**batch, **greedy), model.generate(**batch, **greedy))


@pytest.mark.parametrize("family", FAMILIES)
def test_resizing_the_vocabulary_resizes_the_head_and_keeps_the_tie(family: str) -> None:
    model = build(family).eval()
    model.resize_token_embeddings(VOCAB + 8)
    assert model.get_input_embeddings().weight.shape[0] == VOCAB + 8
    assert model.get_output_embeddings().weight.shape[0] == VOCAB + 8
    assert model.config.text_config.vocab_size == VOCAB + 8
    assert is_tied(model) == FAMILIES[family]["tie_word_embeddings"]
    with torch.no_grad():
        assert model(**prompts(model)).logits.shape[-1] == VOCAB + 8


@pytest.mark.parametrize("family", FAMILIES)
def test_the_head_is_sharded_as_the_decoder_familys_own_causal_lm(family: str) -> None:
    """Tensor parallelism: the head takes the style of the family's causal LM class, and none where that family
    does not shard its head (a tied head must be sharded with its embeddings or not at all)."""
    model = build(family)
    own_plan = getattr(MODEL_FOR_CAUSAL_LM_MAPPING[type(model.config.text_config)], "_tp_plan", None) or {}
    assert (model._tp_plan or {}).get("lm_head") == own_plan.get("lm_head")


def test_targets_that_miss_the_decoder_are_an_error_naming_its_layers() -> None:
    """Phi-3 fuses q, k and v into `qkv_proj`: the paper's q/v targets would leave its decoder without adapters."""
    text = AutoConfig.for_model(
        "phi3", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = LavCapForConditionalGeneration(tiny_lavcap_config(vocab_size=VOCAB, text_config=text))
    with pytest.raises(ValueError, match=r"match no layer of the language model \(phi3\).*qkv_proj"):
        apply_lora(model)
    assert all(p.requires_grad for p in model.parameters()), "the refused model was changed"
    adapted = apply_lora(model, lavcap_lora_config(text_target_modules=["qkv_proj"]))
    assert any("language_model" in name and "lora_" in name for name, _ in adapted.named_parameters())
