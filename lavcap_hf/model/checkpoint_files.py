"""Which files hold a checkpoint's weights: the one reader of shard indexes, for the model and the converter.

A saved folder holds either one weights file or shards listed by an index (`*.index.json`, whose `weight_map` maps each
tensor name to the shard file holding it). Part of the model set: it imports nothing from this package's tooling, so a
saved model folder carries it beside `modeling_lavcap.py`.
"""

import json
import os
from pathlib import Path
from typing import Any

from safetensors import safe_open
from transformers.utils import cached_file

SAFETENSORS_INDEX = "model.safetensors.index.json"
SHARD_INDEXES = (SAFETENSORS_INDEX, "pytorch_model.bin.index.json")
"""Index file names, safetensors first: a folder saved with both is read from its safetensors shards."""
SAFETENSORS_WEIGHTS = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")

_HUB_OPTIONS = (
    "cache_dir",
    "force_download",
    "proxies",
    "revision",
    "subfolder",
    "token",
    "local_files_only",
)


def hub_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The options among `from_pretrained`'s `kwargs` that say where and how to fetch a folder's files."""
    return {k: kwargs[k] for k in _HUB_OPTIONS if k in kwargs}


def shard_names(index_file: str | os.PathLike) -> list[str]:
    """The shard file names an index lists (sorted, each once); ValueError naming the index when it is unreadable."""
    try:
        weight_map = json.loads(Path(index_file).read_text(encoding="utf-8"))["weight_map"]
        return sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"could not read the shard index {index_file}: {error!r}") from error


def folder_weight_files(folder: Path) -> list[Path]:
    """The weights files of a local folder: the shards of its index, else its one weights file (safetensors
    preferred over pickles); ValueError when the folder holds several candidates or none."""
    for index_name in SHARD_INDEXES:
        index = folder / index_name
        if index.exists():
            return [folder / name for name in shard_names(index)]
    files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    preferred = [p for p in files if p.suffix == ".safetensors"] or files
    if len(preferred) != 1:
        raise ValueError(
            f"{folder} holds {len(preferred)} weight files ({[p.name for p in preferred]}); pass the file to use"
        )
    return preferred


def checkpoint_shapes(source: str | os.PathLike, hub_kwargs: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the safetensors weights (sharded or not) of a folder or Hub repository, read from the
    file headers without loading a tensor; `hub_kwargs` are `from_pretrained`'s (revision, token, ...)."""
    options = hub_options(hub_kwargs)

    def resolve(filename: str) -> str | None:
        return cached_file(source, filename, _raise_exceptions_for_missing_entries=False, **options)

    index = resolve(SAFETENSORS_INDEX)
    names = shard_names(index) if index is not None else [SAFETENSORS_WEIGHTS]
    shapes: dict[str, tuple[int, ...]] = {}
    for file in filter(None, map(resolve, names)):
        with safe_open(file, framework="pt") as handle:
            shapes.update({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()})
    return shapes
