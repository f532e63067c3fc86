"""Fine-tune LAVCap with the Transformers Trainer (or optimum-habana's GaudiTrainer with --gaudi).

    python examples/train.py --config examples/configs/lavcap_audiocaps.yaml [--name value ...]

Every argument is described by `--help`; see examples/README.md for multi-GPU and Gaudi launches. The logic lives in
`lavcap_hf.training.run.run_training`, shared with `lavcap train`.
"""

import sys

from lavcap_cli import leave_process_group
from lavcap_hf.training.run import run_training

if __name__ == "__main__":
    run_training(sys.argv[1:])
    leave_process_group()  # under `accelerate launch`, as `lavcap train` does
