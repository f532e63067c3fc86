"""A checkpoint saved on one supported stack loads on the other with identical logits.

The two stacks (transformers 5.x, and transformers 4.55 pinned by optimum-habana) live in separate virtual
environments; `scripts/test.sh` sets LAVCAP_OTHER_STACK_PYTHON to the other one's interpreter.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from lavcap_hf import LavCapForConditionalGeneration
from lavcap_hf.testing.configs import tiny_lavcap_config

OTHER_PYTHON = os.environ.get("LAVCAP_OTHER_STACK_PYTHON")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.cross_stack,  # both directions from either stack: scripts/test.sh runs them from one
    pytest.mark.skipif(
        not OTHER_PYTHON,
        reason="needs the other stack's interpreter in LAVCAP_OTHER_STACK_PYTHON (scripts/test.sh sets it)",
    ),
]

SAVE_AND_RUN = textwrap.dedent(
    """
    import sys, torch, transformers
    from lavcap_hf import LavCapForConditionalGeneration
    from lavcap_hf.testing.configs import tiny_lavcap_config
    src, out, batch_path = sys.argv[1:4]
    if src == "new":
        torch.manual_seed(1)
        model = LavCapForConditionalGeneration(tiny_lavcap_config("ot_att")).eval()
        model.save_pretrained(out + "/model")
    else:
        model = LavCapForConditionalGeneration.from_pretrained(src).eval()
    with torch.no_grad():
        torch.save(model(**torch.load(batch_path)).logits, out + "/logits.pt")
    print(transformers.__version__)
    """
)


def batch_for(config) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    audio, video = config.placeholder_counts
    ids = torch.cat(
        [
            torch.tensor([[1]]),
            torch.full((1, audio), config.audio_token_id),
            torch.full((1, video), config.video_token_id),
            torch.randint(3, 50, (1, 4), generator=gen),
        ],
        dim=1,
    )
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "input_features": torch.randn(1, config.audio_config.target_length, 64, generator=gen),
        "pixel_values_videos": torch.randn(1, config.num_frames, 3, 32, 32, generator=gen),
    }


def run_other(script: str, *args: str) -> str:
    """Run `script` with `args` on the other stack's interpreter; returns what it printed."""
    result = subprocess.run([OTHER_PYTHON, "-c", script, *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


def test_saved_here_loads_there(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = LavCapForConditionalGeneration(tiny_lavcap_config("ot_att")).eval()
    model.save_pretrained(tmp_path / "model")
    batch = batch_for(model.config)
    torch.save(batch, tmp_path / "batch.pt")
    other_version = run_other(
        SAVE_AND_RUN, str(tmp_path / "model"), str(tmp_path), str(tmp_path / "batch.pt")
    )
    assert other_version.split(".")[0] != transformers.__version__.split(".")[0], (
        "the other stack is the same stack"
    )
    with torch.no_grad():
        expected = model(**batch).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=0)


def test_saved_there_loads_here(tmp_path: Path) -> None:
    batch = batch_for(tiny_lavcap_config("ot_att"))
    torch.save(batch, tmp_path / "batch.pt")
    run_other(SAVE_AND_RUN, "new", str(tmp_path), str(tmp_path / "batch.pt"))
    model = LavCapForConditionalGeneration.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        here = model(**batch).logits
    torch.testing.assert_close(here, torch.load(tmp_path / "logits.pt"), rtol=0, atol=0)


PROCESS_THERE = textwrap.dedent(
    """
    import sys, numpy as np
    from lavcap_hf import LavCapProcessor
    if sys.argv[1] == "new":
        from lavcap_hf.testing.configs import tiny_lavcap_config
        from lavcap_hf.testing.tokenizers import word_level_tokenizer
        processor = LavCapProcessor.from_model_config(tiny_lavcap_config(), word_level_tokenizer(["a bird chirps"]))
        processor.save_pretrained(sys.argv[3])
    else:
        processor = LavCapProcessor.from_pretrained(sys.argv[1])
    out = processor(audio=np.zeros(8000, np.float32), sampling_rate=16000, videos=np.zeros((4, 8, 8, 3), np.uint8),
                    captions="a bird chirps", return_tensors="np")
    np.save(sys.argv[2], out["input_ids"])
    """
)


def process_here(processor) -> np.ndarray:
    """The input ids `processor` gives the clip and caption of PROCESS_THERE."""
    return processor(
        audio=np.zeros(8000, np.float32),
        sampling_rate=16000,
        videos=np.zeros((4, 8, 8, 3), np.uint8),
        captions="a bird chirps",
        return_tensors="np",
    )["input_ids"]


def test_processor_saved_here_loads_there(tmp_path: Path) -> None:
    from lavcap_hf import LavCapProcessor
    from lavcap_hf.testing.tokenizers import word_level_tokenizer

    processor = LavCapProcessor.from_model_config(
        tiny_lavcap_config(), word_level_tokenizer(["a bird chirps"])
    )
    processor.save_pretrained(tmp_path / "processor")
    run_other(PROCESS_THERE, str(tmp_path / "processor"), str(tmp_path / "ids.npy"))
    np.testing.assert_array_equal(np.load(tmp_path / "ids.npy"), process_here(processor))


def test_processor_saved_there_loads_here(tmp_path: Path) -> None:
    from lavcap_hf import LavCapProcessor

    run_other(PROCESS_THERE, "new", str(tmp_path / "ids.npy"), str(tmp_path / "processor"))
    processor = LavCapProcessor.from_pretrained(tmp_path / "processor")
    np.testing.assert_array_equal(process_here(processor), np.load(tmp_path / "ids.npy"))
