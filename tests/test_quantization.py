"""The decoder in 4-bit or 8-bit (bitsandbytes' CPU backend): which layers end quantized, captioning through the
pipeline, the CLI and the web demo, QLoRA training (what trains, resume, merge), and a clear error without
bitsandbytes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import BitsAndBytesConfig, pipeline

from lavcap_cli import main
from lavcap_hf import LavCapForConditionalGeneration, LavCapModel, LavCapProcessor
from lavcap_hf.captioning.sharded_run import model_identity
from lavcap_hf.data.media_encoding import write_media
from lavcap_hf.data.synthetic import generate_dataset
from lavcap_hf.lora import apply_lora, load_trained, merge_adapters, merge_checkpoint
from lavcap_hf.model.media_decoding import load_media
from lavcap_hf.quantization import bitsandbytes_config, quantized_module_names
from lavcap_hf.training.run import run_training

TASK = "audio-visual-captioning"
GREEDY = {"num_beams": 1, "max_new_tokens": 6, "do_sample": False}

needs_bitsandbytes = pytest.mark.skipif(
    __import__("importlib").util.find_spec("bitsandbytes") is None,
    reason="bitsandbytes (the quantization extra) is not installed in this environment",
)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    paths = []
    for index in range(2):
        audio = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000) * np.arange(16000) / 16000).astype(np.float32)
        path = folder / f"clip{index}.mp4"
        write_media(path, rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8), 8, audio, 16000)
        paths.append(path)
    return paths


def linear_names(module: nn.Module, prefix: str) -> set[str]:
    return {f"{prefix}{name}" for name, layer in module.named_modules() if isinstance(layer, nn.Linear)}


def inputs_for(processor: LavCapProcessor, paths: list[Path]) -> dict[str, torch.Tensor]:
    media = [load_media(path, num_frames=processor.feature_extractor.num_frames) for path in paths]
    return processor(
        audio=[m.audio for m in media], sampling_rate=media[0].sampling_rate, videos=[m.frames for m in media]
    )


QUANTIZATIONS = {
    "nf4-double": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
    ),
    "fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "8bit": BitsAndBytesConfig(load_in_8bit=True),
}


@needs_bitsandbytes
@pytest.mark.parametrize("name", sorted(QUANTIZATIONS))
def test_only_the_decoders_linear_layers_are_quantized(model_dir, name) -> None:
    full = LavCapForConditionalGeneration.from_pretrained(model_dir)
    model = LavCapForConditionalGeneration.from_pretrained(model_dir, quantization_config=QUANTIZATIONS[name])
    decoder = linear_names(full.model.language_model, "model.language_model.")
    assert set(quantized_module_names(model)) == decoder and len(decoder) == 14
    # Everything else, CED's BatchNorm statistics included, is as stored: same dtype, same values.
    full_state = full.state_dict()
    for key, tensor in model.state_dict().items():
        if key.rsplit(".", 1)[0] in decoder or key.startswith(tuple(f"{layer}." for layer in decoder)):
            continue
        assert tensor.dtype == full_state[key].dtype and torch.equal(tensor, full_state[key]), key
    assert model.model.audio_tower.init_bn.running_var.dtype == torch.float32


@needs_bitsandbytes
def test_the_callers_skip_list_is_kept_and_the_media_modules_are_added_to_it(model_dir) -> None:
    config = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["model.language_model.layers.1"])
    model = LavCapForConditionalGeneration.from_pretrained(model_dir, quantization_config=config)
    assert config.llm_int8_skip_modules == [
        "model.language_model.layers.1"
    ]  # the caller's object is untouched
    quantized = quantized_module_names(model)
    assert quantized and all(name.startswith("model.language_model.layers.0.") for name in quantized)
    assert len(quantized) == 7


@needs_bitsandbytes
def test_clip_is_quantized_on_request_and_the_base_model_leaves_its_media_modules_too(model_dir) -> None:
    full = LavCapForConditionalGeneration.from_pretrained(model_dir)
    model = LavCapForConditionalGeneration.from_pretrained(
        model_dir, quantization_config=QUANTIZATIONS["nf4-double"], quantize_vision_tower=True
    )
    expected = linear_names(full.model.language_model, "model.language_model.")
    expected |= linear_names(full.model.vision_tower, "model.vision_tower.")
    assert set(quantized_module_names(model)) == expected
    # The model without a head, from a dict as a saved config holds it.
    base = LavCapModel.from_pretrained(model_dir, quantization_config={"load_in_4bit": True})
    assert set(quantized_module_names(base)) == linear_names(full.model.language_model, "language_model.")


@needs_bitsandbytes
@pytest.mark.parametrize("name, similarity", [("nf4-double", 0.9), ("8bit", 0.99)])
def test_a_quantized_model_generates_near_the_unquantized_one(model_dir, clips, name, similarity) -> None:
    processor = LavCapProcessor.from_pretrained(model_dir)
    batch = inputs_for(processor, clips)
    full = LavCapForConditionalGeneration.from_pretrained(model_dir).eval()
    model = LavCapForConditionalGeneration.from_pretrained(
        model_dir, quantization_config=QUANTIZATIONS[name]
    ).eval()
    with torch.no_grad():
        logits, expected = model(**batch).logits, full(**batch).logits
        ids = model.generate(**batch, num_beams=2, num_return_sequences=2, max_new_tokens=5)
    cosine = nn.functional.cosine_similarity(logits.flatten(1), expected.flatten(1))
    assert (cosine > similarity).all(), cosine
    assert ids.shape[0] == 4 and ids.shape[1] > batch["input_ids"].shape[1]


@needs_bitsandbytes
def test_four_bit_captions_through_the_pipeline_the_cli_and_the_web_demo(model_dir, clips, tmp_path) -> None:
    processor = LavCapProcessor.from_pretrained(model_dir)
    model = LavCapForConditionalGeneration.from_pretrained(
        model_dir, quantization_config=bitsandbytes_config("4bit")
    )
    batch = inputs_for(processor, clips)
    with torch.no_grad():
        ids = model.eval().generate(**batch, **GREEDY)
    expected = processor.batch_decode(ids, prompt_length=batch["input_ids"].shape[1])

    captioner = pipeline(
        TASK, model=str(model_dir), model_kwargs={"quantization_config": bitsandbytes_config("4bit")}
    )
    assert quantized_module_names(captioner.model) == quantized_module_names(model)
    outputs = captioner([str(path) for path in clips], batch_size=2, **GREEDY)
    assert [output[0]["caption"] for output in outputs] == expected

    output = tmp_path / "captions.jsonl"
    argv = [
        "caption",
        *map(str, clips),
        "--model",
        str(model_dir),
        "--quantize",
        "4bit",
        "--output",
        str(output),
    ]
    argv += ["--num-beams", "1", "--max-new-tokens", "6", "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    assert [json.loads(line)["caption"] for line in output.read_text().splitlines()] == expected
    manifest = tmp_path / "clips.jsonl"
    manifest.write_text(
        "".join(json.dumps({"video_path": str(p), "caption": "a bird chirps"}) + "\n" for p in clips)
    )
    evaluation = tmp_path / "eval"
    argv = ["evaluate", "--model", str(model_dir), "--data", str(manifest), "--output-dir", str(evaluation)]
    assert main(argv + ["--quantize", "4bit", "--num-beams", "1", "--max-new-tokens", "6", "--quiet"]) == 0
    predictions = [
        json.loads(line)["prediction"] for line in (evaluation / "predictions.jsonl").read_text().splitlines()
    ]
    scores = json.loads((evaluation / "scores.json").read_text())
    assert predictions == expected and scores["quantization"]["load_in_4bit"] is True
    # A run's identity tells a quantized model from the unquantized one: an interrupted run of one is never
    # resumed by the other (which would mix two models' captions in one output).
    full = LavCapForConditionalGeneration.from_pretrained(model_dir)
    quantized, unquantized = model_identity(model, processor), model_identity(full, processor)
    assert quantized["config"] != unquantized["config"] and quantized["weights"] != unquantized["weights"]

    from lavcap_hf.apps import web_demo

    app = web_demo.CaptioningApp(str(model_dir), device="cpu", quantize="4bit")
    assert quantized_module_names(app.captioner.model) == quantized_module_names(model)
    view = app.caption(str(clips[0]), num_beams=1, max_new_tokens=6)
    assert view.caption == expected[0] and "| language model | 4bit (bitsandbytes) |" in view.settings


def test_a_quantize_option_without_bitsandbytes_fails_at_once_naming_the_extra(
    model_dir, clips, tmp_path, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    extra = r"quantization extra, pip install \"lavcap-hf\[quantization\]\""
    output = tmp_path / "captions.jsonl"
    for argv in (
        ["caption", str(clips[0]), "--model", str(model_dir), "--quantize", "8bit", "--output", str(output)],
        [
            "evaluate",
            "--model",
            str(model_dir),
            "--data",
            "x.csv",
            "--output-dir",
            str(tmp_path),
            "--quantize",
            "4bit",
        ],
        ["app", "--model", str(tmp_path / "missing"), "--quantize", "4bit"],
    ):
        with pytest.raises(ImportError, match=extra):
            main(argv)
    assert not output.exists() and not (tmp_path / "run.json").exists()
    with pytest.raises(ImportError, match=extra):
        run_training(
            ["--model_name_or_path", str(model_dir), "--quantize", "4bit", "--output_dir", str(tmp_path)]
        )
    result = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['bitsandbytes'] = None; from lavcap_cli import main; "
         f"sys.argv = ['lavcap', 'caption', {str(clips[0])!r}, '--model', {str(model_dir)!r}, '--quantize', '4bit']; "
         "sys.exit(main())"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2 and "lavcap caption: quantized loading needs bitsandbytes" in result.stderr
    assert "Traceback" not in result.stderr


# -- QLoRA ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, model_dir) -> Path:
    """Eight synthesised clips with precomputed visual embeddings (no frame decoding) and the tiny scene model."""
    root = tmp_path_factory.mktemp("qlora")
    generate_dataset(root / "data", num_train=8, num_test=2, seed=0, duration_range=(1.0, 1.25), size=32)
    config = LavCapForConditionalGeneration.from_pretrained(model_dir).config
    rng = np.random.default_rng(0)
    rows = []
    for line in (root / "data" / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        embeds = root / "data" / f"{row['id']}.npy"
        np.save(embeds, rng.standard_normal((config.num_frames, config.visual_embed_dim)).astype(np.float32))
        rows.append(json.dumps({**row, "video_embeds_path": embeds.name}))
    (root / "data" / "train_features.jsonl").write_text("\n".join(rows) + "\n")
    return root


def qlora_args(workspace: Path, model_dir: Path, output: Path, steps: int, save_steps: int) -> list[str]:
    return [
        "--model_name_or_path", str(model_dir),
        "--train_data", str(workspace / "data" / "train_features.jsonl"),
        "--output_dir", str(output),
        "--quantize", "4bit",
        "--use_cpu", "true",
        "--seed", "5",
        "--per_device_train_batch_size", "4",
        "--max_steps", str(steps),
        "--save_steps", str(save_steps),
        "--learning_rate", "1e-2",
        "--logging_steps", "1",
        "--report_to", "none",
        "--disable_tqdm", "true",
    ]  # fmt: skip


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@needs_bitsandbytes
def test_two_qlora_steps_change_only_the_adapters_and_the_trained_parts(
    workspace, model_dir, tmp_path
) -> None:
    from peft import PeftModel

    start: dict[str, torch.Tensor] = {}
    original = PeftModel.__init__

    def record_start(self, *args, **kwargs):
        original(self, *args, **kwargs)
        start.update(snapshot(self))

    PeftModel.__init__ = record_start
    try:
        trainer = run_training(qlora_args(workspace, model_dir, tmp_path / "run", steps=2, save_steps=2))
    finally:
        PeftModel.__init__ = original
    model = trainer.model
    base = model.get_base_model()
    assert len(quantized_module_names(model)) == 14  # the decoder's linear layers, under their adapters
    decoder = base.model.language_model
    assert decoder.gradient_checkpointing and base.model.audio_tower.gradient_checkpointing
    trained = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    kinds = {"lora_A", "lora_B", "multi_modal_projector", "logit_scale"}
    assert all(any(kind in name for kind in kinds) for name in trained)
    assert any("language_model" in name and "lora_B" in name for name in trained)
    assert any("audio_tower" in name and "lora_B" in name for name in trained)
    statistics = "running_mean", "running_var", "num_batches_tracked"
    final = model.state_dict()
    for name, tensor in final.items():
        changed = not torch.equal(tensor, start[name])
        if name in trained or (name.endswith(statistics) and "modules_to_save" in name):
            assert changed, f"{name} did not train"
        else:
            assert not changed, f"frozen {name} changed"  # the 4-bit weights and their block scales included

    # The checkpoint holds the adapters, the projector, the logit scale and CED's BatchNorm: no base weight.
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors")
    assert saved and all(
        "lora_" in key or any(part in key for part in ("multi_modal_projector", "logit_scale", "init_bn"))
        for key in saved
    )


@needs_bitsandbytes
def test_a_resumed_qlora_run_equals_an_uninterrupted_one(workspace, model_dir, tmp_path) -> None:
    uninterrupted = run_training(qlora_args(workspace, model_dir, tmp_path / "full", steps=3, save_steps=2))
    stopped = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full" / "checkpoint-2", stopped / "checkpoint-2")
    resumed = run_training(
        qlora_args(workspace, model_dir, stopped, steps=3, save_steps=2)
        + ["--resume_from_checkpoint", str(stopped / "checkpoint-2")]
    )
    losses = [[e["loss"] for e in run.state.log_history if "loss" in e] for run in (uninterrupted, resumed)]
    assert len(losses[1]) == 3 and losses[1] == losses[0]
    expected, final = uninterrupted.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == final.keys()
    for name, tensor in expected.items():
        assert torch.equal(final[name], tensor), name


@needs_bitsandbytes
def test_qlora_adapters_merge_onto_the_unquantized_model_which_loads_without_bitsandbytes(
    workspace, model_dir, tmp_path
) -> None:
    run = tmp_path / "run"
    run_training(
        qlora_args(workspace, model_dir, run, steps=2, save_steps=2)
        + ["--merged_output_dir", str(tmp_path / "merged")]
    )
    # The run's merge equals the float32 merge of its adapters onto the unquantized model they were trained from.
    expected = load_trained(run, merge=True).state_dict()
    base = LavCapForConditionalGeneration.from_pretrained(model_dir).state_dict()
    assert not torch.equal(expected["model.language_model.layers.0.self_attn.q_proj.weight"],
                           base["model.language_model.layers.0.self_attn.q_proj.weight"])  # fmt: skip
    merged = merge_checkpoint(run / "checkpoint-2", tmp_path / "from_checkpoint")
    assert set(quantized_module_names(merged)) == set()
    code = textwrap.dedent(
        f"""
        import sys, json
        sys.modules["bitsandbytes"] = None
        import lavcap_hf
        from lavcap_hf import LavCapForConditionalGeneration
        for folder in ({str(tmp_path / "merged")!r}, {str(tmp_path / "from_checkpoint")!r}):
            model = LavCapForConditionalGeneration.from_pretrained(folder)
            assert getattr(model.config, "quantization_config", None) is None
            print(json.dumps({{k: [str(t.dtype), t.double().sum().item()] for k, t in model.state_dict().items()}}))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for line in result.stdout.splitlines():
        loaded = json.loads(line)
        assert loaded.keys() == expected.keys()
        for key, tensor in expected.items():
            assert loaded[key] == [str(tensor.dtype), tensor.double().sum().item()], key


@needs_bitsandbytes
def test_adapters_on_a_quantized_decoder_are_not_merged_into_it(model_dir) -> None:
    model = LavCapForConditionalGeneration.from_pretrained(
        model_dir, quantization_config=bitsandbytes_config("4bit")
    )
    with pytest.raises(ValueError, match="merge them onto the unquantized model"):
        merge_adapters(apply_lora(model))


@needs_bitsandbytes
def test_the_demo_compares_its_decoder_unquantized_in_8bit_and_in_4bit(tmp_path, capsys) -> None:
    from lavcap_hf.apps.demo import (
        caption_held_out,
        compare_quantized_decoders,
        decode_clips,
        demo_config,
        held_out_scores,
    )
    from lavcap_hf.testing.tokenizers import word_level_tokenizer

    records = generate_dataset(tmp_path / "data", 0, 3, seed=0, duration_range=(1.0, 1.2), size=32)["test"]
    tokenizer = word_level_tokenizer(r["caption"] for r in records)
    torch.manual_seed(0)
    config = demo_config("ot_att", tokenizer)
    LavCapForConditionalGeneration(config).save_pretrained(tmp_path / "model-ot_att")
    LavCapProcessor.from_model_config(config, tokenizer).save_pretrained(tmp_path / "model-ot_att")
    generation = {"num_beams": 1, "max_new_tokens": 4}
    rows = compare_quantized_decoders(str(tmp_path), generation)
    assert [(row.decoder, row.quantized_layers) for row in rows] == [
        ("unquantized", 0),
        ("8bit", 14),
        ("4bit", 14),
    ]
    captions = caption_held_out(
        str(tmp_path / "model-ot_att"), decode_clips(records, "decoding"), **generation
    )
    sound, place, scores = held_out_scores(captions, records)
    assert (rows[0].sound_accuracy, rows[0].place_accuracy, rows[0].scores) == (sound, place, scores)
    table = (tmp_path / "quantization.md").read_text()
    assert table.strip() in capsys.readouterr().out
    assert [line.split(" | ")[0] for line in table.splitlines()[2:]] == ["| unquantized", "| 8bit", "| 4bit"]
