"""Reading a checkpoint from wherever it is: a state dict, a weights file, a saved folder or a Hub repository."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..model.checkpoint_files import WEIGHT_SUFFIXES, folder_weight_files

StateDictSource = str | os.PathLike | Mapping[str, torch.Tensor]
"""A state dict, a weights file (.safetensors, or .pt/.pth/.bin/.ckpt read with `weights_only=True`), a folder holding
one (sharded checkpoints included), or a Hub repository id."""


def read_checkpoint(source: StateDictSource) -> Mapping[str, Any]:
    """The mapping stored at `source` (see `StateDictSource`): a state dict, or a training checkpoint holding one."""
    if isinstance(source, Mapping):
        return source
    path = Path(source)
    if not path.exists():
        if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(source)) or str(source).endswith(WEIGHT_SUFFIXES):
            raise ValueError(f"checkpoint {source}: no such file or folder, and not a Hub repository id")
        path = _download(str(source))
    return _read_folder(path) if path.is_dir() else _read_file(path)


def load_state_dict(source: StateDictSource) -> dict[str, torch.Tensor]:
    """The state dict at `source`; `{"model": ...}` / `{"state_dict": ...}` training checkpoints are unwrapped."""
    return state_dict_of(read_checkpoint(source))


def state_dict_of(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """`checkpoint` itself when it maps names to tensors, else its `model` or `state_dict` entry."""
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return dict(checkpoint)
    for key in ("model", "state_dict"):
        if isinstance(checkpoint.get(key), Mapping):
            return state_dict_of(checkpoint[key])
    raise ValueError(
        f"the checkpoint holds no state dict: expected a mapping of names to tensors, or one under 'model' or "
        f"'state_dict'; its keys are {sorted(checkpoint)[:10]}"
    )


def _download(repo_id: str) -> Path:
    """Snapshot of a Hub repository's configs and weights (safetensors when it has them)."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"]))
        if not any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir()):
            folder = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.bin", "*.pt", "*.pth"]))
    except Exception as error:  # the Hub client raises many unrelated types (HTTP, validation, offline mode)
        raise ValueError(
            f"checkpoint {repo_id!r} is not a local file or folder, and downloading it from the Hub failed: {error}"
        ) from error
    return folder


def _read_folder(folder: Path) -> Mapping[str, Any]:
    """The weights of a saved model folder: its shards merged, or what its one weights file holds."""
    files = folder_weight_files(folder)
    if len(files) == 1:
        return _read_file(files[0])
    merged: dict[str, torch.Tensor] = {}
    for shard in files:
        merged.update(_read_file(shard))
    return merged


def _read_file(path: Path) -> Mapping[str, Any]:
    """What one weights file holds; pickles are read with `weights_only=True`."""
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and safetensors failures share no base class
        raise ValueError(f"could not read checkpoint {path}: {error}") from error
