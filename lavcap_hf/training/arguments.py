"""The arguments of `lavcap train`: the model, data, LoRA, evaluation and schedule dataclasses beside the Trainer's own,
read from a YAML config (defaults) and the command line (overrides)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from peft import LoraConfig
from transformers import HfArgumentParser, TrainingArguments

from ..lora import lavcap_lora_config


@dataclass
class ModelArguments:
    """Where the model starts from: a LAVCap folder (model + processor), or the paper's pretrained components."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "LAVCap folder or Hub id holding the model and its processor."}
    )
    audio_encoder: str | None = field(default=None, metadata={"help": "CED weights (components build)."})
    vision_encoder: str | None = field(
        default=None,
        metadata={"help": "CLIP checkpoint; leave unset to train on precomputed visual features."},
    )
    language_model: str | None = field(default=None, metadata={"help": "Causal LM (components build)."})
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer (default: the language model's)."}
    )
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "Dtype of the frozen weights: float32, bfloat16, float16 (trained ones and the BatchNorm stay fp32)."
        },
    )
    audio_tower_float32: bool = field(
        default=False,
        metadata={
            "help": "Keep the CED audio tower in float32 whatever `dtype` is; with `dtype float16` and `fp16` this "
            "is the CUDA release's precision (LLaMA fp16 under fp16 autocast with a grad scaler, CED fp32)."
        },
    )
    fusion_type: str = field(default="ot_att", metadata={"help": "Fusion of a components build."})
    num_frames: int = field(default=20, metadata={"help": "Frames per clip of a components build."})
    visual_embed_dim: int | None = field(
        default=None,
        metadata={"help": "Width of precomputed visual features of a components build without CLIP (768)."},
    )
    merged_output_dir: str | None = field(
        default=None, metadata={"help": "After training, save the merged model and processor here."}
    )
    quantize: str | None = field(
        default=None,
        metadata={
            "help": "QLoRA: load the language model's linear layers in 4bit (NF4, double quantisation) or 8bit with "
            "bitsandbytes (the quantization extra) and train the adapters on top, with activation checkpointing; "
            "checkpoints hold the adapters and trained parts, which merge onto the unquantized model.",
            "choices": ["4bit", "8bit"],
        },
    )


@dataclass
class DataArguments:
    """Training and evaluation data (see `lavcap_hf.data.clips.load_clips` for the accepted sources)."""

    train_data: str | None = field(
        default=None, metadata={"help": "AudioCaps root, saved datasets folder, or CSV/JSONL/JSON manifest."}
    )
    train_split: str = field(default="train", metadata={"help": "Split of an AudioCaps root or DatasetDict."})
    eval_data: str | None = field(default=None, metadata={"help": "Evaluation source (default: none)."})
    eval_split: str = field(default="test", metadata={"help": "Evaluation split."})
    visual_features_dir: str | None = field(
        default=None,
        metadata={"help": "AudioCaps .npy features folder (default <root>/visual_feature/<split>)."},
    )
    use_visual_features: bool = field(
        default=True,
        metadata={"help": "AudioCaps: use the precomputed CLIP features rather than the frames."},
    )
    video_column: str = field(default="video_path")
    audio_column: str = field(default="audio_path")
    caption_column: str = field(default="caption")
    id_column: str = field(default="id")
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    spec_augment: bool = field(default=True, metadata={"help": "SpecAugment on training clips."})
    random_instruction: bool = field(
        default=True, metadata={"help": "Draw one of the 8 instructions per example."}
    )
    max_caption_length: int | None = field(
        default=None,
        metadata={
            "help": "Caption tokens kept in training and in the teacher-forced evaluation (the released max_txt_len; "
            "default: the processor's, 300)."
        },
    )


@dataclass
class LoraArguments:
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    audio_lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    text_lora_targets: list[str] | None = field(
        default=None,
        metadata={
            "help": "LLM layers given adapters (default: the decoder family's, q_proj v_proj for LLaMA)."
        },
    )

    def lora_config(self, text_model_type: str | None = None) -> LoraConfig:
        """The adapters of these arguments; `text_model_type` picks the default LLM targets (`decoder_lora_targets`)."""
        return lavcap_lora_config(
            self.lora_r,
            self.lora_alpha,
            self.lora_dropout,
            self.audio_lora_targets,
            self.text_lora_targets,
            text_model_type,
        )


@dataclass
class EvaluationArguments:
    generation_num_beams: int | None = field(
        default=None,
        metadata={
            "help": "Beams when generating evaluation captions (default: the model's generation_config)."
        },
    )
    generation_max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "New tokens per evaluation caption (default: the model's generation_config)."},
    )
    generation_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Any other generate() settings of the evaluation captions, as a JSON object (a mapping in a YAML "
            "config), e.g. '{\"length_penalty\": 1.2}'; each replaces the model's generation_config setting."
        },
    )
    caption_metrics: bool = field(
        default=True,
        metadata={
            "help": "Generate evaluation captions and score them (BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE); without it "
            "evaluation is the teacher-forced loss and token accuracy only (one forward pass per batch)."
        },
    )
    eval_instruction: str | None = field(default=None, metadata={"help": "Evaluation prompt instruction."})

    def generate_settings(self) -> dict[str, Any]:
        """The `generate()` settings that replace the model's generation config's in evaluation: `generation_kwargs`
        and the two named ones that are set."""
        settings = self.generation_kwargs or {}
        settings = json.loads(settings) if isinstance(settings, str) else dict(settings)
        named = {"num_beams": self.generation_num_beams, "max_new_tokens": self.generation_max_new_tokens}
        return {**settings, **{name: value for name, value in named.items() if value is not None}}


@dataclass
class ScheduleArguments:
    """The released learning-rate schedule, a variant of TrainingArguments' `cosine_with_min_lr`."""

    warmup_start_lr: float | None = field(
        default=None,
        metadata={
            "help": "Run the released schedule (with lr_scheduler_type cosine_with_min_lr): linear warm-up from this lr "
            "(2e-9 in the paper) over the warm-up steps, then a cosine to min_lr whose phase spans the whole run."
        },
    )


@dataclass
class LavCapArguments:
    """Everything a training run takes; `training` is a `TrainingArguments` (or `GaudiTrainingArguments`)."""

    model: ModelArguments
    data: DataArguments
    lora: LoraArguments
    evaluation: EvaluationArguments
    training: TrainingArguments
    gaudi: bool = False
    schedule: ScheduleArguments = field(default_factory=ScheduleArguments)


def parse_arguments(argv: Sequence[str] | None = None) -> LavCapArguments:
    """Parse `[--config file.yaml] [--gaudi] [--name value ...]`: the YAML's values are defaults, the command line
    overrides any of them. `--gaudi` parses `GaudiTrainingArguments` (optimum-habana, imported only then)."""
    pre = argparse.ArgumentParser(add_help=False)
    _add_run_options(pre)
    known, rest = pre.parse_known_args(argv)
    if known.gaudi:
        from .gaudi import GAUDI_ARGUMENT_DEFAULTS, gaudi_training_arguments_class

        training_class, defaults = gaudi_training_arguments_class(), dict(GAUDI_ARGUMENT_DEFAULTS)
    else:
        training_class, defaults = TrainingArguments, {}
    classes = (
        ModelArguments,
        DataArguments,
        LoraArguments,
        EvaluationArguments,
        ScheduleArguments,
        training_class,
    )
    parser = HfArgumentParser(classes)
    _add_run_options(parser)
    defaults["remove_unused_columns"] = False
    if known.config:
        defaults.update(_read_config(known.config, classes))
    parser.set_defaults(**defaults)
    model, data, lora, evaluation, schedule, training, _ = parser.parse_args_into_dataclasses(rest)
    return LavCapArguments(model, data, lora, evaluation, training, gaudi=known.gaudi, schedule=schedule)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of argument values (defaults for the command line)")
    parser.add_argument(
        "--gaudi", action="store_true", help="train on Intel Gaudi with optimum-habana's GaudiTrainer"
    )


def _read_config(path: str | os.PathLike, classes: Sequence[type]) -> dict[str, Any]:
    """Values of a YAML config, checked against the argument dataclasses.

    `warmup_ratio` becomes a fractional `warmup_steps` where TrainingArguments dropped the former (5.x).
    """
    import yaml

    with open(path, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of argument names to values")
    names = {f.name for cls in classes for f in dataclasses.fields(cls)}
    if "warmup_ratio" in values and "warmup_ratio" not in names:
        values["warmup_steps"] = float(values.pop("warmup_ratio"))
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{path}: unknown argument(s) {unknown}")
    return values
