"""The one reader of a checkpoint's files (`lavcap_hf/model/checkpoint_files.py`): the converter's tensors and the model's
shape check see the same shards of a saved folder, and a folder it cannot read fails naming what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lavcap_hf import LavCapForConditionalGeneration
from lavcap_hf.convert import load_state_dict
from lavcap_hf.model.checkpoint_files import checkpoint_shapes, folder_weight_files
from lavcap_hf.testing.configs import tiny_lavcap_config


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A tiny model saved in shards of at most 20 kB, so that its index lists several files."""
    folder = tmp_path_factory.mktemp("sharded") / "model"
    torch.manual_seed(0)
    model = LavCapForConditionalGeneration(tiny_lavcap_config("ot_att", with_vision=False))
    model.save_pretrained(folder, max_shard_size="20KB")
    return folder


def test_converter_and_shape_check_read_the_same_shards(sharded: Path) -> None:
    files = folder_weight_files(sharded)
    assert len(files) > 1 and all(path.suffix == ".safetensors" for path in files)
    tensors = load_state_dict(sharded)
    shapes = checkpoint_shapes(sharded, {})
    assert shapes == {key: tuple(tensor.shape) for key, tensor in tensors.items()}
    assert len(tensors) > len(files)


def test_one_file_folder_prefers_safetensors_over_a_pickle(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, str(tmp_path / "weights.safetensors"))
    torch.save({"w": torch.zeros(3)}, tmp_path / "weights.bin")
    assert folder_weight_files(tmp_path) == [tmp_path / "weights.safetensors"]
    assert torch.equal(load_state_dict(tmp_path)["w"], torch.ones(2))


def test_a_folder_with_two_candidates_names_them(tmp_path: Path) -> None:
    for name in ("a.safetensors", "b.safetensors"):
        save_file({"w": torch.ones(1)}, str(tmp_path / name))
    with pytest.raises(ValueError, match=r"2 weight files \(\['a.safetensors', 'b.safetensors'\]\)"):
        folder_weight_files(tmp_path)


def test_a_broken_index_is_named(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match="could not read the shard index .*model.safetensors.index.json"):
        load_state_dict(tmp_path)
