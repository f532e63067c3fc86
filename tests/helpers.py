"""Test helpers shared by several test modules (imported as `helpers`; pytest puts tests/ on sys.path)."""

from __future__ import annotations

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
    from lavcap_hf.synthetic import PLACES, SOUNDS, make_caption
    from lavcap_hf.testing_utils import tiny_lavcap_config, word_level_tokenizer

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
