"""Training on Intel Gaudi with optimum-habana: `GaudiTrainer`, `GaudiTrainingArguments`, `GaudiConfig`.

Imported only on the `--gaudi` path: `import optimum.habana` fails on a machine without Habana's SynapseAI software
(its import probes the installed `habana-torch-plugin`). The recipe follows the Gaudi release of LAVCap
(NAVER-INTEL-Co-Lab/gaudi-lavcap): eager mode (`PT_HPU_LAZY_MODE=0`, `use_lazy_mode=False`), bf16 autocast, Habana's
fused AdamW and fused gradient clipping; 8 HPUs are launched with optimum-habana's `gaudi_spawn.py --use_mpi`.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

GAUDI_ARGUMENT_DEFAULTS = {"use_habana": True, "use_lazy_mode": False, "bf16": True}
"""`GaudiTrainingArguments` defaults of the `--gaudi` path; the YAML config and the command line override them."""

GAUDI_CONFIG = {"use_fused_adam": True, "use_fused_clip_norm": True, "use_torch_autocast": True}
"""The `GaudiConfig` used unless `--gaudi_config_name` names one."""


def import_optimum_habana() -> ModuleType:
    """`optimum.habana`, or an ImportError that says what is missing."""
    try:
        return importlib.import_module("optimum.habana")
    except Exception as error:  # the import fails with IndexError / ImportError without SynapseAI
        raise ImportError(
            "--gaudi needs optimum-habana (pip install optimum-habana==1.21.2) on a machine with Habana's "
            f"SynapseAI software; importing optimum.habana failed: {type(error).__name__}: {error}"
        ) from error


def gaudi_training_arguments_class() -> type:
    return import_optimum_habana().GaudiTrainingArguments


def gaudi_config_for(training_arguments: Any) -> Any:
    """The run's `GaudiConfig`: the one `gaudi_config_name` names, else `GAUDI_CONFIG`."""
    habana = import_optimum_habana()
    name = getattr(training_arguments, "gaudi_config_name", None)
    if name:
        return habana.GaudiConfig.from_pretrained(name)
    return habana.GaudiConfig(**GAUDI_CONFIG)
