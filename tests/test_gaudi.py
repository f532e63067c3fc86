"""The `--gaudi` path: GaudiTrainingArguments, GaudiConfig and the Gaudi trainer that examples/train.py builds.

There is no Gaudi here. optimum-habana 1.21.2 is installed on the transformers 4.55 stack, but `import optimum.habana`
cannot succeed without Habana's SynapseAI software; the recipe check below replaces exactly what needs it (see
`test_gaudi_arguments_config_and_trainer_follow_the_recipe`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lavcap_hf.training.arguments import parse_arguments

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "lavcap_audiocaps.yaml"
HAS_OPTIMUM_HABANA = importlib.util.find_spec("optimum") is not None and (
    importlib.util.find_spec("optimum.habana") is not None
)


def test_gaudi_flag_without_habana_software_is_a_clear_import_error() -> None:
    # On the current stack optimum-habana is not installed; on the 4.55 stack its import fails without SynapseAI.
    with pytest.raises(ImportError, match=r"--gaudi needs optimum-habana .* SynapseAI"):
        parse_arguments(["--config", str(CONFIG), "--gaudi"])


PROBE = """
import json, os, subprocess, sys, types
from unittest import mock

# 1. optimum/habana/__init__.py checks the SynapseAI version by running `pip list | grep habana-torch-plugin`;
#    without Habana software the output is empty and the import dies (IndexError). Only that probe is answered.
real_run = subprocess.run
def answer_synapse_probe(command, *args, **kwargs):
    if isinstance(command, str) and "habana-torch-plugin" in command:
        return subprocess.CompletedProcess(command, 0, stdout="habana-torch-plugin 1.24.0\\n", stderr="")
    return real_run(command, *args, **kwargs)

# 2. GaudiTrainingArguments(use_habana=True) calls optimum.habana.transformers.modeling_utils.
#    adapt_transformers_to_gaudi() while setting up the device; that module imports the HPU kernels of
#    habana_frameworks at import time. A stub module with a no-op adapt_transformers_to_gaudi stands in for it.
stub = types.ModuleType("optimum.habana.transformers.modeling_utils")
stub.adapt_transformers_to_gaudi = lambda: None
sys.modules[stub.__name__] = stub

with mock.patch("subprocess.run", answer_synapse_probe):
    import optimum.habana

from optimum.habana import GaudiTrainer
from lavcap_hf.training.compat import processor_kwarg
from lavcap_hf.training.gaudi import gaudi_config_for
from lavcap_hf.training.trainer import LavCapTrainerMixin, gaudi_trainer_class
from lavcap_hf.training.arguments import parse_arguments

def describe(argv):
    arguments = parse_arguments(argv)
    t = arguments.training
    config = gaudi_config_for(t)
    return {
        "gaudi": arguments.gaudi,
        "class": type(t).__name__,
        "use_habana": t.use_habana,
        "use_lazy_mode": t.use_lazy_mode,
        "bf16": t.bf16,
        "learning_rate": t.learning_rate,
        "weight_decay": t.weight_decay,
        "adam_beta2": t.adam_beta2,
        "warmup_ratio": t.warmup_ratio,
        "lr_scheduler_type": str(t.lr_scheduler_type.value),
        "lr_scheduler_kwargs": t.lr_scheduler_kwargs,
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "num_train_epochs": t.num_train_epochs,
        "remove_unused_columns": t.remove_unused_columns,
        "gaudi_config": {k: getattr(config, k) for k in ("use_fused_adam", "use_fused_clip_norm", "use_torch_autocast")},
        "num_beams": arguments.evaluation.generation_num_beams,
        "max_new_tokens": arguments.evaluation.generation_max_new_tokens,
    }

trainer_class = gaudi_trainer_class()
result = {
    "recipe": describe(["--config", sys.argv[1], "--gaudi", "--output_dir", sys.argv[2]]),
    "overridden": describe(["--config", sys.argv[1], "--gaudi", "--output_dir", sys.argv[2],
                            "--learning_rate", "1e-5", "--gaudi_config_name", sys.argv[3]]),
    "trainer_bases": [cls.__name__ for cls in trainer_class.__mro__],
    "is_gaudi_trainer": issubclass(trainer_class, GaudiTrainer) and issubclass(trainer_class, LavCapTrainerMixin),
    "processor_kwarg": processor_kwarg(trainer_class),
}
print("RESULT " + json.dumps(result))
"""


@pytest.mark.skipif(
    not HAS_OPTIMUM_HABANA, reason="optimum-habana is only installed on the transformers 4.55 stack"
)
def test_gaudi_arguments_config_and_trainer_follow_the_recipe(tmp_path) -> None:
    """Runs in a fresh interpreter, so that the replacements below cannot leak into other tests.

    Replaced, and why:
    1. `subprocess.run` answers only optimum-habana's import-time SynapseAI probe (`pip list | grep
       habana-torch-plugin`), whose empty output otherwise makes `import optimum.habana` fail with IndexError;
    2. the module `optimum.habana.transformers.modeling_utils` is a stub with a no-op `adapt_transformers_to_gaudi`:
       `GaudiTrainingArguments(use_habana=True)` calls it while setting up the device, and the real module imports
       `habana_frameworks.torch.hpex.kernels` (HPU kernels);
    3. `PT_HPU_LAZY_MODE=0` is set as the README's commands set it (eager mode, as the Gaudi release trains).
    Everything else is the real optimum-habana 1.21.2: GaudiTrainingArguments, GaudiConfig, GaudiTrainer.
    """
    own_config = tmp_path / "gaudi_config.json"
    own_config.write_text(json.dumps({"use_fused_adam": False, "use_fused_clip_norm": True}))
    env = {**os.environ, "PT_HPU_LAZY_MODE": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PROBE), str(CONFIG), str(tmp_path / "out"), str(own_config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    recipe = result["recipe"]
    assert recipe["gaudi"] and recipe["class"] == "GaudiTrainingArguments"
    assert recipe["use_habana"] is True and recipe["use_lazy_mode"] is False and recipe["bf16"] is True
    assert recipe["gaudi_config"] == {
        "use_fused_adam": True,
        "use_fused_clip_norm": True,
        "use_torch_autocast": True,
    }
    assert (
        recipe["learning_rate"] == 5e-6 and recipe["weight_decay"] == 1e-6 and recipe["adam_beta2"] == 0.999
    )
    assert recipe["warmup_ratio"] == 0.02 and recipe["num_train_epochs"] == 100
    assert recipe["lr_scheduler_type"] == "cosine_with_min_lr" and recipe["lr_scheduler_kwargs"] == {
        "min_lr": 1e-8
    }
    assert recipe["per_device_train_batch_size"] == 4 and recipe["remove_unused_columns"] is False
    assert recipe["num_beams"] is None and recipe["max_new_tokens"] is None  # the model's generation_config

    overridden = result["overridden"]
    assert overridden["learning_rate"] == 1e-5
    assert overridden["gaudi_config"]["use_fused_adam"] is False  # read from --gaudi_config_name

    assert result["is_gaudi_trainer"] and result["processor_kwarg"] == "processing_class"
    bases = result["trainer_bases"]
    assert bases.index("LavCapTrainerMixin") < bases.index("GaudiTrainer") < bases.index("Trainer")
