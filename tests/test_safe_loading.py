"""Safe loading: model folders are safetensors, pickles are read with weights_only=True, and a folder that does
not fit the model (another model_type, tensors of other shapes) fails with an error naming what is wrong."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from helpers import run_without_package
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM

from lavcap_hf import CedConfig, LavCapConfig, LavCapForConditionalGeneration
from lavcap_hf.convert import load_state_dict, read_checkpoint
from lavcap_hf.model.modeling_lavcap import KEY_RENAMES_FROM_SEPARATE_LM
from lavcap_hf.testing.configs import tiny_lavcap_config

PROJECTOR = "model.multi_modal_projector.weight"


def model_key(stored: str) -> str:
    """The model's name for a stored tensor: 5.x saves the decoder under the older layout's names."""
    for pattern, replacement in KEY_RENAMES_FROM_SEPARATE_LM.items():
        stored = re.sub(pattern, replacement, stored)
    return stored


class Payload:
    """Pickles as a call to os.makedirs(marker): unpickling it without weights_only creates the folder."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A tiny ot_att model (no vision tower) saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("safe") / "model"
    torch.manual_seed(0)
    LavCapForConditionalGeneration(tiny_lavcap_config("ot_att", with_vision=False)).save_pretrained(folder)
    return folder


def copy_folder(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_saved_folder_is_safetensors_and_loads_without_pickle(saved, monkeypatch) -> None:
    names = sorted(os.listdir(saved))
    assert "model.safetensors" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called while loading a safetensors folder")

    monkeypatch.setattr(torch, "load", refuse)
    model = LavCapForConditionalGeneration.from_pretrained(saved)
    stored = {model_key(k): v for k, v in load_file(saved / "model.safetensors").items()}
    state = model.state_dict()
    assert set(stored) <= set(state)
    for key, tensor in stored.items():
        assert torch.equal(state[key], tensor), key
    model, info = LavCapForConditionalGeneration.from_pretrained(saved, output_loading_info=True)
    assert not info["mismatched_keys"] and not info["missing_keys"]


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pth", ".ckpt"])
def test_convert_loader_refuses_a_pickled_object(suffix: str, tmp_path) -> None:
    marker = tmp_path / "payload_ran"
    path = tmp_path / f"checkpoint{suffix}"
    torch.save({"model": {"weight": torch.ones(2)}, "extra": Payload(marker)}, path)
    # The file is a real exploit: a full unpickle runs the payload.
    torch.load(path, weights_only=False)
    assert marker.is_dir()
    marker.rmdir()
    for read in (load_state_dict, read_checkpoint):
        with pytest.raises(ValueError, match=re.escape(str(path))):
            read(path)
        with pytest.raises(ValueError, match=re.escape(str(path))):
            read(tmp_path)  # a folder holding the file
        assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_convert_loader_reads_plain_tensor_pickles(suffix: str, tmp_path) -> None:
    weights = {"blocks.0.attn.qkv.weight": torch.randn(6, 2), "norm.bias": torch.zeros(2)}
    path = tmp_path / f"checkpoint{suffix}"
    torch.save({"model": weights, "epoch": 3, "config": {"fusion": "ot"}}, path)
    loaded = load_state_dict(path)
    assert sorted(loaded) == sorted(weights)
    for key in weights:
        assert torch.equal(loaded[key], weights[key])


@pytest.mark.parametrize(
    ("declared", "write_config"),
    [
        ("llama", lambda folder: edit_config(folder, model_type="llama")),
        ("ced", lambda folder: CedConfig(hidden_size=32, num_attention_heads=2).save_pretrained(folder)),
    ],
)
def test_a_config_of_another_model_type_is_refused(declared: str, write_config, saved, tmp_path) -> None:
    folder = copy_folder(saved, tmp_path / "other")
    write_config(folder)
    message = rf"{re.escape(str(folder))}: its config declares model_type='{declared}', not 'lavcap'"
    for load in (LavCapConfig.from_pretrained, LavCapForConditionalGeneration.from_pretrained):
        with pytest.raises(ValueError, match=message):
            load(folder)


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def reshape_tensors(folder: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[tuple, tuple]]:
    """Rewrite the folder's safetensors with the given tensors (model names) at new shapes; returns
    {model name: (checkpoint shape, model shape)}."""
    changed = {}
    files = sorted(folder.glob("*.safetensors"))
    for file in files:
        tensors = load_file(file)
        for stored in list(tensors):
            key = model_key(stored)
            if key in shapes:
                changed[key] = (shapes[key], tuple(tensors[stored].shape))
                tensors[stored] = torch.zeros(shapes[key], dtype=tensors[stored].dtype)
        save_file(tensors, file, metadata={"format": "pt"})
    assert sorted(changed) == sorted(shapes)
    return changed


def mismatch_pattern(key: str, checkpoint: tuple, model: tuple) -> str:
    return re.escape(f"{key}: checkpoint {checkpoint} vs model {model}")


@pytest.mark.parametrize("sharded", [False, True], ids=["single-file", "sharded"])
def test_tensors_of_other_shapes_raise_naming_key_and_shapes(sharded: bool, saved, tmp_path) -> None:
    folder = tmp_path / "reshaped"
    if sharded:
        LavCapForConditionalGeneration.from_pretrained(saved).save_pretrained(folder, max_shard_size="20KB")
        assert (folder / "model.safetensors.index.json").exists()
    else:
        copy_folder(saved, folder)
    changed = reshape_tensors(
        folder,
        {
            PROJECTOR: (64, 35),
            "model.language_model.embed_tokens.weight": (100, 64),  # another vocabulary size
            "model.audio_tower.time_pos_embed": (1, 32, 1, 4),  # a shorter audio window
        },
    )
    for load in (LavCapForConditionalGeneration.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError) as raised:
            load(folder)
        message = str(raised.value)
        assert message.startswith(str(folder))
        for key, (checkpoint, model) in changed.items():
            assert re.search(mismatch_pattern(key, checkpoint, model), message), message
    # Asking for the re-initialisation explicitly still gets it.
    model = LavCapForConditionalGeneration.from_pretrained(folder, ignore_mismatched_sizes=True)
    assert tuple(model.state_dict()[PROJECTOR].shape) == changed[PROJECTOR][1]


@pytest.mark.integration
def test_remote_code_checks_shapes_too(saved, tmp_path) -> None:
    """The model code saved next to the weights (trust_remote_code, package not installed) raises the same error."""
    folder = copy_folder(saved, tmp_path / "remote")
    (checkpoint, model) = reshape_tensors(folder, {PROJECTOR: (64, 35)})[PROJECTOR]
    script = f"""
from transformers import AutoModel
try:
    AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
    print("LOADED")
except ValueError as error:
    print("VALUEERROR", error)
"""
    output = run_without_package(script, tmp_path)
    assert "VALUEERROR" in output, output
    assert re.search(mismatch_pattern(PROJECTOR, checkpoint, model), output), output


def test_every_auto_class_of_the_library_loads_the_generation_class(saved) -> None:
    """AutoModel, AutoModelForCausalLM and, where the library has it (5.x), its multimodal-generation auto class."""
    import transformers

    auto_classes = [AutoModel, AutoModelForCausalLM]
    if hasattr(transformers, "AutoModelForMultimodalLM"):
        auto_classes.append(transformers.AutoModelForMultimodalLM)
    assert len(auto_classes) == (3 if transformers.__version__.startswith("5.") else 2)
    for auto_class in auto_classes:
        assert type(auto_class.from_pretrained(saved)) is LavCapForConditionalGeneration, auto_class


def test_auto_model_with_the_package_checks_shapes(saved, tmp_path) -> None:
    folder = copy_folder(saved, tmp_path / "auto")
    checkpoint, model = reshape_tensors(folder, {PROJECTOR: (64, 35)})[PROJECTOR]
    with pytest.raises(ValueError, match=mismatch_pattern(PROJECTOR, checkpoint, model)):
        AutoModel.from_pretrained(folder)
