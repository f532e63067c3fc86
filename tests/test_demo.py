"""A shortened `lavcap demo`: end to end, and the trained models beat an untrained one on held-out clips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import GenerationMixin

from lavcap_cli import parse_command_line
from lavcap_hf import LavCapForConditionalGeneration, LavCapProcessor
from lavcap_hf.apps.demo import caption_held_out, decode_clips, demo_config, run_demo
from lavcap_hf.data.synthetic import generate_dataset, score_caption
from lavcap_hf.model.configuration_lavcap import RELEASED_DECODING
from lavcap_hf.testing.tokenizers import word_level_tokenizer


@pytest.mark.integration
def test_short_demo_trains_models_that_beat_an_untrained_one(tmp_path, capsys) -> None:
    cap, every, patience = 100, 20, 2
    rows = run_demo(
        str(tmp_path), 60, 15, cap, batch_size=12, seed=1, num_valid=12, eval_every=every, patience=patience
    )
    printed = capsys.readouterr().out
    assert "| ot_att |" in printed and "| audio_only |" in printed
    assert (tmp_path / "ot_plan.png").stat().st_size > 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["fusion_type"] for r in results] == ["ot_att", "audio_only"]
    for row, result in zip(rows, results, strict=True):
        run = row.training
        assert result["training"]["steps"] == run.steps and f"| {run.best_step} |" in printed
        # The kept weights are those of an evaluation; early stopping ends `patience` evaluations after the best.
        assert run.best_step % every == 0 and 0 < run.best_step <= run.steps <= cap
        assert run.steps - run.best_step == patience * every if run.converged else run.steps == cap
        assert not (tmp_path / f"model-{row.fusion_type}" / "checkpoints").exists()
        written = json.loads((tmp_path / f"model-{row.fusion_type}" / "generation_config.json").read_text())
        assert {name: written[name] for name in RELEASED_DECODING} == RELEASED_DECODING

    records = [json.loads(line) for line in (tmp_path / "data" / "test.jsonl").read_text().splitlines()]
    for record in records:
        record["video_path"] = str(tmp_path / "data" / record["video_path"])
    clips = decode_clips(records, "decoding")
    tokenizer = word_level_tokenizer(r["caption"] for r in records)
    torch.manual_seed(0)
    config = demo_config("ot_att", tokenizer)
    untrained = tmp_path / "untrained"
    LavCapForConditionalGeneration(config).save_pretrained(untrained)
    LavCapProcessor.from_model_config(config, tokenizer).save_pretrained(untrained)
    judged = [
        score_caption(c, r["sound"], r["place"])
        for c, r in zip(caption_held_out(str(untrained), clips), records, strict=True)
    ]
    untrained_sound = np.mean([j["sound_correct"] for j in judged])
    for row in rows:
        assert row.sound_accuracy > untrained_sound + 0.2, (
            row.fusion_type,
            row.sound_accuracy,
            untrained_sound,
        )
        assert row.scores["BLEU_1"] > 0.3


def test_demo_captions_decode_as_the_model_says_unless_told_otherwise(tmp_path, monkeypatch) -> None:
    """The held-out captions use the saved model's generation config (the released decoding); `generate()`
    settings, which `lavcap demo --num-beams/--max-new-tokens` give, replace it."""
    records = generate_dataset(tmp_path / "data", 0, 2, seed=0, duration_range=(1.0, 1.2), size=32)["test"]
    clips = decode_clips(records, "decoding")
    tokenizer = word_level_tokenizer(r["caption"] for r in records)
    torch.manual_seed(0)
    config = demo_config("ot_att", tokenizer)
    LavCapForConditionalGeneration(config).save_pretrained(tmp_path / "model")
    LavCapProcessor.from_model_config(config, tokenizer).save_pretrained(tmp_path / "model")
    used = []
    prepare = GenerationMixin._prepare_generation_config

    def record(self, *args, **kwargs):
        config, model_kwargs = prepare(self, *args, **kwargs)
        used.append({name: getattr(config, name) for name in RELEASED_DECODING})
        return config, model_kwargs

    # On the library's class: the pipeline may load the folder's own copy of the model code (4.x).
    monkeypatch.setattr(GenerationMixin, "_prepare_generation_config", record)
    # (4.55's pipeline also resolves the model's settings once when it is built: the last entry is generate()'s.)
    assert len(caption_held_out(str(tmp_path / "model"), clips)) == 2
    assert used and all(settings == RELEASED_DECODING for settings in used)
    caption_held_out(str(tmp_path / "model"), clips, num_beams=1, max_new_tokens=3)
    assert used[-1] == {**RELEASED_DECODING, "num_beams": 1, "max_new_tokens": 3}
    default, chosen = (parse_command_line(["demo", *flags]) for flags in ([], ["--num-beams", "2"]))
    assert (default.num_beams, default.max_new_tokens, chosen.num_beams) == (None, None, 2)
