"""The `lavcap` command: caption, demo, train, evaluate, convert, push-to-hub."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from typing import Any


def _add_caption_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths", nargs="+", help="media files, folders (searched recursively) or glob patterns"
    )
    parser.add_argument("--model", required=True, help="model folder or Hub id (model + processor)")
    parser.add_argument("--output", help="write JSONL (.jsonl) or CSV (.csv) here instead of JSONL to stdout")
    parser.add_argument(
        "--format", choices=("jsonl", "csv"), help="output format (default: from --output, else jsonl)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument(
        "--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cuda if present)"
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--plot-ot", metavar="DIR", help="save a picture of each clip's OT plan in DIR")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow a Hub model's own code")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def load_captioning_pipeline(
    model: str, device: str | None = None, dtype: str = "float32", trust_remote_code=False
):
    """An `AudioVisualCaptioningPipeline` for a saved model folder or Hub id (model and processor)."""
    import torch

    from .modeling_lavcap import LavCapForConditionalGeneration
    from .pipeline_lavcap import AudioVisualCaptioningPipeline
    from .processing_lavcap import LavCapProcessor

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    network = LavCapForConditionalGeneration.from_pretrained(model, trust_remote_code=trust_remote_code)
    network = network.to(device=device, dtype=getattr(torch, dtype)).eval()
    processor = LavCapProcessor.from_pretrained(model)
    return AudioVisualCaptioningPipeline(model=network, processor=processor, device=torch.device(device))


def _write_rows(rows: list[dict[str, Any]], output: str | None, fmt: str | None) -> None:
    fmt = fmt or ("csv" if output and output.endswith(".csv") else "jsonl")
    stream = open(output, "w", newline="", encoding="utf-8") if output else sys.stdout
    try:
        if fmt == "csv":
            writer = csv.DictWriter(stream, fieldnames=["path", "caption"])
            writer.writeheader()
            writer.writerows({"path": r["path"], "caption": r["caption"]} for r in rows)
        else:
            for row in rows:
                stream.write(json.dumps({"path": row["path"], "caption": row["caption"]}) + "\n")
    finally:
        if output:
            stream.close()


def run_caption(args: argparse.Namespace) -> int:
    from .batch_captioning import caption_files, expand_media_paths

    paths, failures = expand_media_paths(args.paths)
    report = None
    if paths:
        pipe = load_captioning_pipeline(args.model, args.device, args.dtype, args.trust_remote_code)
        report = caption_files(
            pipe,
            paths,
            batch_size=args.batch_size,
            return_ot_plan=bool(args.plot_ot),
            progress=not args.quiet,
            num_beams=args.num_beams,
            max_new_tokens=args.max_new_tokens,
        )
        failures += report.failures
        _write_rows(report.captions, args.output, args.format)
        if args.plot_ot:
            _plot_plans(report.captions, args.plot_ot)
    captioned = len(report.captions) if report else 0
    if failures:
        print(f"\n{len(failures)} file(s) could not be captioned:", file=sys.stderr)
        for path, reason in failures:
            print(f"  {path}: {reason.removeprefix(path + ': ')}", file=sys.stderr)
    print(f"captioned {captioned} of {captioned + len(failures)} file(s)", file=sys.stderr)
    return 0 if captioned else 1


def _plot_plans(rows: list[dict[str, Any]], folder: str) -> None:
    from .plotting import plot_ot_plan

    os.makedirs(folder, exist_ok=True)
    for row in rows:
        name = os.path.splitext(os.path.basename(row["path"]))[0]
        plot_ot_plan(row["ot_plan"], os.path.join(folder, f"{name}.png"), title=row["caption"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lavcap", description="LAVCap audio-visual captioning")
    commands = parser.add_subparsers(dest="command", required=True)
    caption = commands.add_parser("caption", help="caption media files with a trained model")
    _add_caption_arguments(caption)
    caption.set_defaults(run=run_caption)

    from .convert import add_convert_arguments
    from .demo import add_demo_arguments
    from .evaluation import add_evaluate_arguments
    from .hub import add_push_arguments

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
    push = commands.add_parser("push-to-hub", help="upload a model folder with its code and a model card")
    add_push_arguments(push)
    push.set_defaults(run=_run_push)
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo_command

    return run_demo_command(args)


def _run_train(args: argparse.Namespace) -> int:
    from .training import run_training

    run_training(args.arguments)
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import run_evaluate

    run_evaluate(args)
    return 0


def _run_convert(args: argparse.Namespace) -> int:
    from .convert import run_convert

    run_convert(args)
    return 0


def _run_push(args: argparse.Namespace) -> int:
    from .hub import run_push

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
    args = parse_command_line(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
