"""Evaluate a LAVCap model on a captioned split (AudioCaps test by default), as `lavcap evaluate` does.

    python examples/evaluate_model.py --model path/to/lavcap --data dataset/audiocaps --output-dir exp/eval [--modality-test]

Writes predictions (JSONL), scores (JSON, for the model card) and a markdown table to --output-dir; rerunning the same
command resumes an interrupted run. Every option is described by `--help`. The logic lives in
`lavcap_hf.evaluation.run`.
"""

import argparse

from lavcap_cli import add_evaluate_arguments
from lavcap_hf.evaluation.run import run_evaluate

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_evaluate_arguments(parser)
    run_evaluate(parser.parse_args())
