"""The `lavcap` command: caption, demo, train, evaluate, convert, app, fetch-corenlp, push-to-hub.

Parsing imports neither torch nor transformers, so `lavcap --help` (and any subcommand's `--help`) answers at
once; a subcommand imports `lavcap_hf` only when it runs. The choices the parsers offer (`choices.py`) are written
from `lavcap_hf` by scripts/write_cli_choices.py (`tests/test_cli.py` checks that the file is up to date).
"""

from __future__ import annotations

import argparse
import sys

from .choices import DEFAULT_COLUMNS, FUSION_TYPES, QUANTIZE_CHOICES


def add_quantize_argument(parser: argparse.ArgumentParser) -> None:
    """`--quantize`: load the decoder's linear layers in 4-bit or 8-bit (bitsandbytes, the `quantization` extra)."""
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        help="load the language model's linear layers in 4-bit (NF4, double quantisation) or 8-bit with "
        "bitsandbytes (the quantization extra); the encoders, fusion, projector and head keep their dtype",
    )


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """Decoding options that override the model's `generation_config` when given."""
    parser.add_argument(
        "--num-beams", type=int, help="beams of the beam search (default: the model's generation_config)"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, help="most tokens per caption (default: the model's generation_config)"
    )


def add_caption_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths", nargs="+", help="media files, folders (searched recursively) or glob patterns"
    )
    parser.add_argument("--model", required=True, help="model folder or Hub id (model + processor)")
    parser.add_argument(
        "--output",
        help="write JSONL (.jsonl) or CSV (.csv) here instead of JSONL to stdout; needed under `accelerate launch`: "
        "each process writes OUTPUT.part-R-of-N, merged into OUTPUT at the end; a rerun resumes from the parts",
    )
    parser.add_argument(
        "--format", choices=("jsonl", "csv"), help="output format (default: from --output, else jsonl)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    add_decoding_arguments(parser)
    parser.add_argument(
        "--num-workers",
        type=int,
        default=0,
        help="DataLoader processes decoding and featurising media (0: none)",
    )
    parser.add_argument(
        "--no-resume", action="store_true", help="start afresh: delete the part files an interrupted run left"
    )
    parser.add_argument(
        "--device",
        default=None,
        help="torch device, e.g. cpu or cuda:0 (default: this process's GPU under accelerate launch, else cuda "
        "if present)",
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    add_quantize_argument(parser)
    parser.add_argument("--plot-ot", metavar="DIR", help="save a picture of each clip's OT plan in DIR")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow a Hub model's own code")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="lavcap_demo", help="folder for data, models and the report")
    parser.add_argument("--num-train", type=int, default=150)
    parser.add_argument("--num-test", type=int, default=60)
    parser.add_argument(
        "--steps",
        type=int,
        default=3000,
        help="most training steps per model, a safety cap: each stops once its validation loss stops improving "
        "(the learning rate halves on each plateau first)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-valid", type=int, default=30, help="validation clips for the early stopping")
    parser.add_argument("--eval-every", type=int, default=50, help="steps between validation losses")
    parser.add_argument(
        "--patience", type=int, default=4, help="validation losses without a new best before training stops"
    )
    parser.add_argument(
        "--num-beams",
        type=int,
        help="beams when captioning the held-out clips (default: the model's generation_config)",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, help="new tokens per caption (default: the model's generation_config)"
    )
    parser.add_argument(
        "--compare-quantization",
        action="store_true",
        help="caption the held-out clips with the trained OT model's decoder unquantized, in 8-bit and in 4-bit "
        "(bitsandbytes, the quantization extra) and write the table to OUTPUT/quantization.md (trains first if "
        "OUTPUT holds no model)",
    )


def add_app_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `lavcap app`."""
    parser.add_argument(
        "--model",
        help="model folder or Hub id (default: lavcap_demo/model-ot_att, trained by `lavcap demo` if missing)",
    )
    parser.add_argument(
        "--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)"
    )
    parser.add_argument("--port", type=int, help="port (default 7860, or the next free one)")
    parser.add_argument("--share", action="store_true", help="also open a temporary public gradio.live link")
    parser.add_argument("--device", help="torch device, e.g. cpu or cuda:0 (default: cuda if present)")
    add_quantize_argument(parser)
    parser.add_argument(
        "--model-decoding",
        action="store_true",
        help="start the decoding controls at the model's generation_config also on a CPU (default there: 1 beam)",
    )


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `lavcap evaluate` and `examples/evaluate_model.py`."""
    parser.add_argument("--model", required=True, help="model folder or Hub id (model + processor)")
    parser.add_argument(
        "--data",
        required=True,
        help="AudioCaps root (with <split>.json), folder saved by datasets' save_to_disk, or CSV/JSONL/JSON manifest",
    )
    parser.add_argument(
        "--split", default="test", help="split of an AudioCaps root or DatasetDict (default: test)"
    )
    parser.add_argument("--output-dir", required=True, help="folder for predictions, scores and run settings")
    parser.add_argument(
        "--visual-features-dir", help="AudioCaps .npy CLIP features (default <root>/visual_feature/<split>)"
    )
    parser.add_argument(
        "--use-frames", action="store_true", help="AudioCaps: decode the frames instead of the .npy features"
    )
    for role, name in DEFAULT_COLUMNS.items():
        parser.add_argument(
            f"--{role.replace('_', '-')}-column", default=name, help=f"manifest/dataset column of the {role}"
        )
    parser.add_argument("--batch-size", type=int, default=8)
    add_decoding_arguments(parser)
    parser.add_argument("--instruction", help="prompt instruction (default: 'Please describe the audio.')")
    parser.add_argument(
        "--modality-test",
        action="store_true",
        help="also evaluate with the visual input zeroed, shuffled across clips, and with the audio silenced",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffled-visual derangement")
    parser.add_argument(
        "--no-resume", action="store_true", help="start afresh: delete this run's predictions in --output-dir"
    )
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader processes decoding media")
    parser.add_argument(
        "--device",
        help="torch device, e.g. cpu or cuda:0 (default: this process's GPU under accelerate launch, else cuda "
        "if present)",
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    add_quantize_argument(parser)
    parser.add_argument("--trust-remote-code", action="store_true", help="allow a Hub model's own code")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `lavcap convert`."""
    parser.add_argument(
        "--audio",
        help="CED weights: the original release .pt, mispeech/ced-base (Hub id or folder) or this package's format",
    )
    parser.add_argument(
        "--vision",
        help="CLIP checkpoint (Hub id or folder), e.g. openai/clip-vit-large-patch14; omit for a model that takes "
        "precomputed video_embeds",
    )
    parser.add_argument(
        "--text", required=True, help="causal LM (Hub id or folder), e.g. meta-llama/Llama-2-7b-chat-hf"
    )
    parser.add_argument("--tokenizer", help="tokenizer to extend (default: the --text checkpoint's)")
    parser.add_argument(
        "--checkpoint", help="released LAVCap training checkpoint (e.g. checkpoint_best.pth) to apply on top"
    )
    parser.add_argument(
        "--adapters",
        action="store_true",
        help="keep the checkpoint's LoRA as peft adapters in OUTPUT_DIR/adapter instead of merging it",
    )
    parser.add_argument(
        "--lora-alpha", type=float, help="LoRA alpha of the checkpoint (default: its config, else 32)"
    )
    parser.add_argument("--fusion-type", choices=FUSION_TYPES, help="default: the checkpoint's, else ot_att")
    parser.add_argument("--num-frames", type=int, default=20, help="frames per clip (default 20)")
    parser.add_argument(
        "--visual-embed-dim",
        type=int,
        help="width of the precomputed video_embeds when there is no --vision (default 768, CLIP ViT-L/14)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        help="dtype of the saved language model and CLIP (default: the language model's stored dtype); the LoRA "
        "update is merged in float32 and rounded once to it",
    )
    parser.add_argument(
        "--cast-all",
        action="store_true",
        help="also cast CED, the fusion (OT logit scale) and the projector to --dtype (default: they stay float32, as "
        "the release ran them; CED's BatchNorm stays float32 either way)",
    )
    parser.add_argument("--output-dir", required=True, help="folder to save the model and tokenizer to")


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `lavcap push-to-hub`."""
    parser.add_argument("model", help="folder of a saved LAVCap model (e.g. the output of `lavcap convert`)")
    parser.add_argument("repo_id", help="Hub repository, e.g. your-name/lavcap-audiocaps")
    parser.add_argument(
        "--eval-results", help="JSON file of caption metrics (the output of `lavcap evaluate`)"
    )
    parser.add_argument(
        "--training-data",
        help="what the model was trained on, in words, for the card's Training data section (default: the model's "
        "recorded `training_data`, else the card says it is not stated)",
    )
    parser.add_argument(
        "--eval-dataset",
        "--dataset-name",
        dest="eval_dataset",
        help="dataset the --eval-results were computed on (default: the model's recorded `eval_dataset`, else "
        "the card says it is not stated)",
    )
    parser.add_argument(
        "--eval-split", "--dataset-split", dest="eval_split", help="split of --eval-dataset, e.g. test"
    )
    parser.add_argument(
        "--base-model", action="append", dest="base_models", help="Hub id of a pretrained part (repeatable)"
    )
    parser.add_argument("--license", help="Hub license id, e.g. llama2")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--token", help="Hub token (default: the logged-in one)")
    parser.add_argument("--commit-message", default="Upload LAVCap model")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lavcap", description="LAVCap audio-visual captioning")
    commands = parser.add_subparsers(dest="command", required=True)
    caption = commands.add_parser("caption", help="caption media files with a trained model")
    add_caption_arguments(caption)
    caption.set_defaults(run=_run_caption)
    demo = commands.add_parser(
        "demo", help="train a small LAVCap on synthesised scenes and caption held-out clips"
    )
    add_demo_arguments(demo)
    demo.set_defaults(run=_run_demo)
    train = commands.add_parser(
        "train",
        add_help=False,
        help="fine-tune with the Trainer (examples/train.py's options: --config YAML, --gaudi, any override)",
    )
    train.set_defaults(run=_run_train)
    evaluate = commands.add_parser(
        "evaluate", help="caption a split and score it (BLEU, METEOR, ROUGE-L, CIDEr-D, ...)"
    )
    add_evaluate_arguments(evaluate)
    evaluate.set_defaults(run=_run_evaluate)
    convert = commands.add_parser(
        "convert", help="official CED / CLIP / LLaMA / LAVCap checkpoints -> model folder"
    )
    add_convert_arguments(convert)
    convert.set_defaults(run=_run_convert)
    app = commands.add_parser(
        "app", help="serve a web page (Gradio) that captions uploaded or recorded clips"
    )
    add_app_arguments(app)
    app.set_defaults(run=_run_app)
    corenlp = commands.add_parser(
        "fetch-corenlp",
        help="download Stanford CoreNLP 3.6.0 for SPICE / SPIDEr (about 390 MB; never done without this command)",
    )
    corenlp.add_argument(
        "--lib-dir", help="where SPICE looks for its jars (default: pycocoevalcap's spice/lib)"
    )
    corenlp.add_argument("--url", help="the CoreNLP 3.6.0 zip, e.g. a mirror (default: nlp.stanford.edu)")
    corenlp.set_defaults(run=_run_fetch_corenlp)
    push = commands.add_parser("push-to-hub", help="upload a model folder with its code and a model card")
    add_push_arguments(push)
    push.set_defaults(run=_run_push)
    return parser


# Each subcommand imports the package (torch, transformers) only when it runs.


def _run_caption(args: argparse.Namespace) -> int:
    if args.output:  # through per-process part files: resumable, any number of processes (accelerate launch)
        from lavcap_hf.captioning.corpus import caption_corpus

        return caption_corpus(args)
    from lavcap_hf.captioning.files import run_caption

    return run_caption(args)


def _run_demo(args: argparse.Namespace) -> int:
    from lavcap_hf.apps.demo import run_demo_command

    return run_demo_command(args)


def _run_train(args: argparse.Namespace) -> int:
    from lavcap_hf.training.run import run_training

    run_training(args.arguments)
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from lavcap_hf.evaluation.run import run_evaluate

    run_evaluate(args)
    return 0


def _run_convert(args: argparse.Namespace) -> int:
    from lavcap_hf.convert import run_convert

    run_convert(args)
    return 0


def _run_app(args: argparse.Namespace) -> int:
    from lavcap_hf.apps.web_demo import run_app_command

    return run_app_command(args)


def _run_fetch_corenlp(args: argparse.Namespace) -> int:
    from lavcap_hf.evaluation.corenlp import run_fetch_corenlp

    return run_fetch_corenlp(args.lib_dir, args.url)


def _run_push(args: argparse.Namespace) -> int:
    from lavcap_hf.hub.push import run_push

    run_push(args)
    return 0


def parse_command_line(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse `lavcap ...`; the options of `lavcap train` are left in `args.arguments` for the training parser."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "train":
        args.arguments = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run `lavcap ...`; returns the exit status.

    Run as the program (`argv` None: the `lavcap` script, `python -m lavcap_hf`, each process of
    `accelerate launch`), a run that stops with a message for its user (`lavcap_hf.captioning.sharded_run.RunError`: refused
    settings, an output in use by another run) prints it once, from the main process, and exits with status 2 on
    every process; so does a `--quantize` without bitsandbytes installed, before anything is loaded. As the program,
    the process group a command ran in is destroyed once it ends (`leave_process_group`). A caller that passes `argv`
    gets the exception, and keeps its process group.
    """
    args = parse_command_line(argv)
    if getattr(args, "quantize", None) or getattr(args, "compare_quantization", False):
        try:  # before any model or media is read (`lavcap app` would train the demo's model first)
            from lavcap_hf.quantization import require_bitsandbytes

            require_bitsandbytes()
        except ImportError as error:
            if argv is not None:
                raise
            print(f"lavcap {args.command}: {error}", file=sys.stderr)
            return 2
    if argv is not None:
        return args.run(args)
    from lavcap_hf.captioning.sharded_run import RunError

    try:
        status = args.run(args)
    except RunError as error:  # raised on every process, past the last collective call
        if error.main_process:
            print(f"lavcap {args.command}: {error}", file=sys.stderr)
        status = 2
    leave_process_group()
    return status


def leave_process_group() -> None:
    """Destroy the process group a command ran in (each process of `accelerate launch`), while the interpreter is
    whole. Left to interpreter exit, gloo's worker threads can still hold tensors then, and the process aborts after a
    run that finished ("terminate called without an active exception", SIGABRT; pytorch/pytorch#190489). Only after a
    command that ended on every process: after an exception the others may still wait in a collective call."""
    torch = sys.modules.get("torch")  # never imported here: a command that used no torch has no group
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
