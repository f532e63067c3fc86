"""CED's input BatchNorm keeps float32 running statistics and affine weights whatever the model's dtype.

The released code keeps CED in float32 and updates the BatchNorm statistics throughout training (training mode,
momentum 0.01). In bf16 such updates mostly round away, so with `dtype: bfloat16` (the example config) the
statistics must stay float32: through `from_pretrained(dtype=...)`, `model.to(dtype)`, LoRA's `modules_to_save`
copy, the Trainer, saved checkpoints and merged models. Where nothing in CED trains (plain peft on the decoder), its
statistics stay as they were.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import save_scene_model
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from test_modeling_lavcap import make_batch
from torch import nn

from lavcap_hf import LavCapForConditionalGeneration
from lavcap_hf.data.synthetic import generate_dataset
from lavcap_hf.lora import apply_lora, load_trained, merge_and_save
from lavcap_hf.model._compat import dtype_kwarg
from lavcap_hf.model.modeling_ced import Float32BatchNorm2d
from lavcap_hf.testing.configs import tiny_lavcap_config
from lavcap_hf.training.run import run_training

STEPS = 200
MEAN, STD = -4.165, 4.3
"""Features fed to the BatchNorm: after 200 updates with momentum 0.01 from 0, the running mean of every mel bin
is about MEAN * (1 - 0.99 ** 200) = -3.607."""
BN = "model.audio_tower.init_bn"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("running_stats") / "model"
    torch.manual_seed(0)
    LavCapForConditionalGeneration(tiny_lavcap_config()).save_pretrained(folder)
    return folder


def batch_of_features(step: int) -> torch.Tensor:
    """float32 fbank (2, 128, 64) as the processor gives it, drawn for `step`."""
    generator = torch.Generator().manual_seed(step)
    return MEAN + STD * torch.randn(2, 128, 64, generator=generator)


def active_norm(model: nn.Module) -> nn.BatchNorm2d:
    """The BatchNorm that runs: LoRA's trained copy (`modules_to_save`) when there is one."""
    norms = {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    trained = [m for name, m in norms.items() if name.endswith("modules_to_save.default")]
    return trained[0] if trained else next(iter(norms.values()))


def statistics(norm: nn.BatchNorm2d) -> dict[str, torch.Tensor]:
    return {"running_mean": norm.running_mean, "running_var": norm.running_var, "weight": norm.weight}


def assert_float32_and_equal(norm: nn.BatchNorm2d, expected: dict[str, torch.Tensor]) -> None:
    for name, tensor in statistics(norm).items():
        torch.testing.assert_close(
            tensor.float(),
            expected[name],
            rtol=0,
            atol=0,
            msg=lambda message, name=name: f"{name}: {message}",
        )
        assert tensor.dtype == torch.float32, f"{name} is {tensor.dtype}"


def trained_with_lora(folder: Path, dtype: torch.dtype | None) -> nn.Module:
    """The model `run_training` trains (from_pretrained in `dtype`, then LoRA), its BatchNorm driven STEPS times."""
    kwargs = {dtype_kwarg(): dtype} if dtype is not None else {}
    model = apply_lora(LavCapForConditionalGeneration.from_pretrained(folder, **kwargs)).train()
    audio_tower = model.base_model.model.model.audio_tower
    with torch.no_grad():
        for step in range(STEPS):
            audio_tower(batch_of_features(step))
    return model


@pytest.fixture(scope="module")
def driven(model_folder) -> dict[str, nn.Module]:
    return {
        "float32": trained_with_lora(model_folder, None),
        "bfloat16": trained_with_lora(model_folder, torch.bfloat16),
    }


def test_bf16_model_updates_running_statistics_as_the_float32_model(driven) -> None:
    reference = statistics(active_norm(driven["float32"]))
    bf16 = driven["bfloat16"]
    assert bf16.base_model.model.lm_head.weight.dtype == torch.bfloat16
    # The BatchNorm sees the float32 features in both models, so the statistics are the same bits.
    assert_float32_and_equal(active_norm(bf16), reference)
    expected = MEAN * (1 - 0.99**STEPS)
    assert abs(reference["running_mean"].mean().item() - expected) < 0.05


def test_checkpoint_and_merged_model_keep_float32_statistics(driven, model_folder, tmp_path) -> None:
    model = driven["bfloat16"]
    expected = {name: tensor.clone() for name, tensor in statistics(active_norm(model)).items()}
    model.save_pretrained(tmp_path / "checkpoint")
    with safe_open(str(tmp_path / "checkpoint" / "adapter_model.safetensors"), framework="pt") as saved:
        stored = {key: saved.get_tensor(key) for key in saved.keys() if "init_bn" in key}
    assert stored and {tensor.dtype for name, tensor in stored.items() if "num_batches" not in name} == {
        torch.float32
    }

    reloaded = load_trained(tmp_path / "checkpoint", model_folder, **{dtype_kwarg(): torch.bfloat16})
    assert_float32_and_equal(active_norm(reloaded), expected)

    merged = merge_and_save(reloaded, tmp_path / "merged")
    assert_float32_and_equal(merged.get_submodule(BN), expected)
    assert merged.lm_head.weight.dtype == torch.bfloat16
    for dtype in (torch.bfloat16, torch.float16):
        loaded = LavCapForConditionalGeneration.from_pretrained(tmp_path / "merged", **{dtype_kwarg(): dtype})
        assert_float32_and_equal(loaded.get_submodule(BN), expected)
        assert loaded.model.audio_tower.patch_embed.proj.weight.dtype == dtype


def test_dtype_casts_leave_the_batch_norm_in_float32(model_folder) -> None:
    model = LavCapForConditionalGeneration.from_pretrained(model_folder)
    norm = model.get_submodule(BN)
    assert isinstance(norm, Float32BatchNorm2d)
    with torch.no_grad():
        norm.running_mean.copy_(torch.linspace(-4.123457, -3.765432, norm.num_features))
    expected = {name: tensor.clone() for name, tensor in statistics(norm).items()}
    model.to(torch.bfloat16)  # as build_from_components casts the front end
    assert_float32_and_equal(model.get_submodule(BN), expected)
    model.half()
    assert_float32_and_equal(model.get_submodule(BN), expected)
    assert model.model.audio_tower.patch_embed.proj.weight.dtype == torch.float16


def test_batch_norm_takes_half_precision_input_with_float32_statistics() -> None:
    norm = Float32BatchNorm2d(8, momentum=0.01)
    reference = nn.BatchNorm2d(8, momentum=0.01)
    features = (MEAN + STD * torch.randn(4, 8, 1, 16)).bfloat16()
    for module in (norm, reference):
        module.train()
    out = norm(features)
    assert out.dtype == torch.bfloat16 and norm.running_mean.dtype == torch.float32
    torch.testing.assert_close(out, reference(features.float()).bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(norm.running_mean, reference.running_mean, rtol=0, atol=0)


def test_bf16_trainer_run_trains_and_saves_float32_statistics(model_folder, tmp_path, monkeypatch) -> None:
    """`--dtype bfloat16 --bf16 true` as the example config, for 3 steps of the real Trainer on synthetic clips."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # bf16=True exports it with transformers 4.x
    generate_dataset(tmp_path / "data", num_train=12, num_test=0, seed=0, duration_range=(1.0, 1.25), size=32)
    save_scene_model(tmp_path / "model")
    initial = LavCapForConditionalGeneration.from_pretrained(tmp_path / "model").get_submodule(BN)
    output = tmp_path / "run"
    trainer = run_training([
        "--model_name_or_path", str(tmp_path / "model"), "--dtype", "bfloat16", "--bf16", "true",
        "--train_data", str(tmp_path / "data" / "train.jsonl"), "--output_dir", str(output),
        "--use_cpu", "true", "--per_device_train_batch_size", "4", "--max_steps", "3", "--save_steps", "3",
        "--learning_rate", "1e-3", "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true",
        "--merged_output_dir", str(tmp_path / "merged"),
    ])  # fmt: skip
    model = trainer.model
    assert model.base_model.model.lm_head.weight.dtype == torch.bfloat16
    norm = active_norm(model)
    assert int(norm.num_batches_tracked) == 3
    assert not torch.equal(norm.running_mean, initial.running_mean)
    expected = {name: tensor.detach().clone() for name, tensor in statistics(norm).items()}
    assert {t.dtype for t in expected.values()} == {torch.float32}
    assert json.loads((output / "adapter_config.json").read_text())["modules_to_save"]
    reloaded = load_trained(output / "checkpoint-3", **{dtype_kwarg(): torch.bfloat16})
    assert_float32_and_equal(active_norm(reloaded), expected)
    merged = LavCapForConditionalGeneration.from_pretrained(
        tmp_path / "merged", **{dtype_kwarg(): torch.bfloat16}
    )
    assert_float32_and_equal(merged.get_submodule(BN), expected)
    assert np.isfinite([e["loss"] for e in trainer.state.log_history if "loss" in e]).all()


@pytest.mark.parametrize("mode_set", ["after the freeze", "before the freeze"])
def test_plain_peft_on_the_decoder_leaves_the_frozen_audio_tower_as_it_was(
    model_folder, tmp_path, mode_set
) -> None:
    """Decoder-only LoRA with plain peft: nothing in CED trains, so a training step leaves its BatchNorm statistics
    as they were (whether `train()` came before or after peft froze it), and the saved adapters on the base model
    give the trained model's logits."""
    model = LavCapForConditionalGeneration.from_pretrained(model_folder)
    if mode_set == "before the freeze":
        model.train()
    adapters = LoraConfig(r=8, lora_alpha=32, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    peft_model = get_peft_model(model, adapters)
    if mode_set == "after the freeze":
        peft_model.train()
    assert peft_model.training
    initial = {name: tensor.clone() for name, tensor in statistics(model.get_submodule(BN)).items()}
    batch = make_batch(model.config, [3, 5], seed=4)
    batch["input_features"] = MEAN + STD * batch["input_features"]
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model(**batch).loss.backward()
    optimizer.step()
    assert_float32_and_equal(model.get_submodule(BN), initial)
    peft_model.save_pretrained(tmp_path / "adapters")
    reloaded = PeftModel.from_pretrained(
        LavCapForConditionalGeneration.from_pretrained(model_folder), tmp_path / "adapters"
    )
    with torch.no_grad():
        trained = peft_model.eval()(**batch).logits
        torch.testing.assert_close(reloaded.eval()(**batch).logits, trained, rtol=0, atol=0)


def test_the_packages_lora_set_up_updates_the_statistics_in_a_training_step(model_folder) -> None:
    """CED's adapters train, so its BatchNorm runs in training mode through the whole model, as in the released
    recipe."""
    model = apply_lora(LavCapForConditionalGeneration.from_pretrained(model_folder)).train()
    initial = active_norm(model).running_mean.clone()
    batch = make_batch(model.config, [3, 5], seed=4)
    batch["input_features"] = MEAN + STD * batch["input_features"]
    model(**batch).loss.backward()
    assert int(active_norm(model).num_batches_tracked) == 1
    assert not torch.equal(active_norm(model).running_mean, initial)
