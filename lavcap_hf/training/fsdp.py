"""Training under FSDP: shapes taken before wrapping (weight-decay groups, the 0-d logit scale), LoRA keys kept when
adapters are saved from sharded units, and adapters restored from a checkpoint when an FSDP run resumes."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from peft.utils import ModulesToSaveWrapper
from torch import nn


def prepare_for_fsdp(model: nn.Module) -> None:
    """Adapt a LAVCap peft model, in place, to FSDP (before wrapping); its checkpoints stay those of other runs.

    - FSDP rejects 0-d parameters: the OT logit scale becomes (1,), while the module's state dict keeps () (and
      accepts it on loading);
    - peft lists the keys of a `modules_to_save` copy with the copy's `state_dict()`, which gathers the FSDP units
      inside it (a collective) and finds nothing on the processes that a rank-0 state dict leaves empty: the keys
      are taken from the state dict that peft is given instead;
    - the adapters are saved from the gathered state dict with the nested FSDP units set aside
      ([`nested_fsdp_units_removed`], see `LavCapTrainerMixin._save`).
    """
    for module in model.modules():
        names = [name for name, parameter in module.named_parameters(recurse=False) if parameter.ndim == 0]
        for name in names:
            scalar = module._parameters[name]
            module._parameters[name] = nn.Parameter(
                scalar.detach().reshape(1), requires_grad=scalar.requires_grad
            )
        if names:
            module.register_state_dict_post_hook(functools.partial(_reshape_state, names=names, shape=()))
            module.register_load_state_dict_pre_hook(
                functools.partial(_reshape_state, names=names, shape=(1,))
            )
        if isinstance(module, ModulesToSaveWrapper):
            module.adapter_state_dict = functools.partial(_modules_to_save_state, module)


def _reshape_state(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    *args: Any,
    names: list[str],
    shape: tuple[int, ...],
) -> None:
    """State-dict hook (post-save, or pre-load): reshape the entries of `names` to `shape`."""
    for name in names:
        # numel 0: a rank's empty FSDP shard.
        if prefix + name in state_dict and state_dict[prefix + name].numel() == 1:
            state_dict[prefix + name] = state_dict[prefix + name].reshape(shape)


def _modules_to_save_state(
    wrapper: ModulesToSaveWrapper, adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """`ModulesToSaveWrapper.adapter_state_dict` reading the keys from `state_dict` (the wrapper's entries)."""
    if adapter_name not in wrapper._adapters:
        return {}
    prefix = f"modules_to_save.{adapter_name}."
    return {key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)}


@contextlib.contextmanager
def nested_fsdp_units_removed(model: nn.Module) -> Iterator[None]:
    """Inside, the modules that FSDP wrapped below `model` (its root unit) sit in their parents again.

    For saving peft adapters from an FSDP model's gathered state dict: peft (0.21) finds the LoRA keys by module
    name, and FSDP inserts `_fsdp_wrapped_module` into the names, so they would be dropped.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    replaced = []
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, FullyShardedDataParallel):
                parent._modules[name] = child.module
                replaced.append((parent, name, child))
    try:
        yield
    finally:
        for parent, name, child in reversed(replaced):
            parent._modules[name] = child


def load_fsdp_adapters(model: nn.Module, checkpoint: str | os.PathLike) -> None:
    """Load `checkpoint`'s adapters file into `model`, a peft model wrapped by FSDP (FSDP1): every process reads it
    and keeps its shard.

    The Trainer would restore the model from the checkpoint's `pytorch_model_fsdp.bin`, which peft (0.21) writes
    and reads by module names that FSDP changed (see [`nested_fsdp_units_removed`]): it lacks the LoRA weights, and
    loading it fails or loads nothing. The adapters file, saved by `LavCapTrainerMixin._save`, holds all of them.
    """
    from safetensors.torch import load_file
    from torch.distributed.fsdp import FullyShardedDataParallel, StateDictType

    path = Path(checkpoint) / "adapter_model.safetensors"
    saved = load_file(path)
    adapter = model.active_adapter
    # The adapters file names an entry without its adapter: `...lora_A.default.weight` is `...lora_A.weight`, and
    # `...modules_to_save.default.weight` is `...weight`.
    model_keys = {}
    for name, _ in [*model.named_parameters(), *model.named_buffers()]:
        name = name.replace("_fsdp_wrapped_module.", "")
        module, _, entry = name.rpartition(".")
        if f".modules_to_save.{adapter}." in name:
            model_keys[name.replace(f".modules_to_save.{adapter}.", ".")] = name
        elif module.endswith(f".{adapter}"):
            model_keys[f"{module.removesuffix(f'.{adapter}')}.{entry}"] = name
    missing = [key for key in saved if key not in model_keys]
    if missing:
        raise ValueError(f"{path}: {missing[0]} names no adapter weight of the FSDP model")
    with FullyShardedDataParallel.state_dict_type(model, StateDictType.FULL_STATE_DICT):
        unexpected = model.load_state_dict(
            {model_keys[k]: v for k, v in saved.items()}, strict=False
        ).unexpected_keys
    if unexpected:
        raise ValueError(f"{path}: the FSDP model did not take {unexpected[0]}")
