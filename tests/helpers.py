"""Test helpers shared by several test modules (imported as `helpers`; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap

BLOCK_PACKAGE = textwrap.dedent(
    """
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "lavcap_hf" or name.startswith("lavcap_hf."):
                raise ImportError("lavcap_hf is blocked in this process")
    sys.meta_path.insert(0, _Block())
    """
)


def run_without_package(code: str, tmp_path) -> str:
    """Run `code` in a fresh interpreter in which `import lavcap_hf` fails; returns stdout."""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_PACKAGE + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def save_scene_model(folder, seed: int = 0, **config_kwargs):
    """Save a tiny random LavCap model and its processor to `folder`, with a word-level tokenizer over the
    synthetic scenes' captions; returns the config."""
    import torch

    from lavcap_hf import LavCapForConditionalGeneration, LavCapProcessor
    from lavcap_hf.data.synthetic import PLACES, SOUNDS, make_caption
    from lavcap_hf.testing.configs import tiny_lavcap_config
    from lavcap_hf.testing.tokenizers import word_level_tokenizer

    tokenizer = word_level_tokenizer([make_caption(s, p) for s in SOUNDS for p in PLACES])
    config = tiny_lavcap_config(
        vocab_size=len(tokenizer),
        audio_token_id=tokenizer.convert_tokens_to_ids("<|audio|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video|>"),
        **config_kwargs,
    )
    torch.manual_seed(seed)
    LavCapForConditionalGeneration(config).save_pretrained(folder)
    LavCapProcessor.from_model_config(config, tokenizer).save_pretrained(folder)
    return config


def save_component_parts(folder):
    """A tiny causal LM folder (with the scenes' word-level tokenizer) and a tiny CED `.pt` state dict under
    `folder`, the parts a components build starts from; returns (llm folder, ced file)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lavcap_hf import CedConfig, CedModel
    from lavcap_hf.data.synthetic import PLACES, SOUNDS, make_caption
    from lavcap_hf.testing.tokenizers import word_level_tokenizer

    tokenizer = word_level_tokenizer([make_caption(s, p) for s in SOUNDS for p in PLACES])
    text = LlamaConfig(
        vocab_size=len(tokenizer) - 2, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    LlamaForCausalLM(text).save_pretrained(folder / "llm")
    tokenizer.save_pretrained(folder / "llm")
    ced = CedModel(CedConfig(target_length=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2))
    torch.save(ced.state_dict(), folder / "ced.pt")
    return folder / "llm", folder / "ced.pt"


def record_generation_settings(monkeypatch) -> list[dict]:
    """Make every `generate()` of `LavCapForConditionalGeneration` log the beams and new tokens it decodes with (its
    generation_config, or the one passed, updated with the call's generation arguments, as `generate()` merges
    them), then run as usual; returns the log."""
    import copy

    from lavcap_hf import LavCapForConditionalGeneration

    settings: list[dict] = []
    original = LavCapForConditionalGeneration.generate

    def generate(self, *args, **kwargs):
        config = copy.deepcopy(kwargs.get("generation_config") or self.generation_config)
        config.update(**{k: v for k, v in kwargs.items() if k != "generation_config"})
        settings.append({"num_beams": config.num_beams, "max_new_tokens": config.max_new_tokens})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LavCapForConditionalGeneration, "generate", generate)
    return settings


@contextlib.contextmanager
def recorded_decoding(model):
    """Within the block, the generation config each `model.generate()` decodes with (its settings resolved from the
    arguments, a passed `generation_config` and the model's) is appended to the list it yields; read where the
    library resolves them (`_prepare_generation_config`, on every supported release)."""
    used = []
    prepare = model._prepare_generation_config

    def record(*args, **kwargs):
        config, model_kwargs = prepare(*args, **kwargs)
        used.append(config)
        return config, model_kwargs

    model._prepare_generation_config = record
    try:
        yield used
    finally:
        del model._prepare_generation_config
