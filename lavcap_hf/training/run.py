"""`run_training`, behind `lavcap train` and `examples/train.py`: the starting model (a LAVCap folder or pretrained
components), the datasets, LoRA, the Trainer (or GaudiTrainer), resuming, and the merged output."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, set_seed
from transformers.utils import logging

from ..convert import build_from_components
from ..data.clips import group_clips, load_clips
from ..data.collator import LavCapDataCollator
from ..data.dataset import LavCapDataset
from ..lora import apply_lora, merge_and_save, merge_checkpoint
from ..model._compat import dtype_kwarg
from ..model.configuration_lavcap import LavCapConfig
from ..model.modeling_lavcap import LavCapForConditionalGeneration
from ..model.processing_lavcap import LavCapProcessor
from ..quantization import prepare_for_kbit_training, quantized_loading_kwargs
from .arguments import DataArguments, LavCapArguments, ModelArguments, parse_arguments
from .compat import processor_kwarg
from .trainer import LavCapTrainer, gaudi_trainer_class

logger = logging.get_logger(__name__)


def load_model_and_processor(
    arguments: ModelArguments, device: str | torch.device = "cpu"
) -> tuple[LavCapForConditionalGeneration, LavCapProcessor]:
    """The starting model and its processor, from a LAVCap folder or from pretrained components.

    With `audio_tower_float32` and a half-precision `dtype`, the CED tower's weights are read in float32 from the
    checkpoint (not cast back up from `dtype`) and recorded in `config.float32_modules`, so that the run's folders
    reload them in float32 too. With `quantize`, a LAVCap folder's decoder is loaded quantized onto `device` (the
    training device: bitsandbytes places the weights as it quantizes them).
    """
    dtype = getattr(torch, arguments.dtype) if arguments.dtype else None
    keep_audio = arguments.audio_tower_float32 and dtype not in (None, torch.float32)
    if arguments.model_name_or_path:
        kwargs = {dtype_kwarg(): dtype} if dtype is not None else {}
        source = arguments.model_name_or_path
        config = LavCapConfig.from_pretrained(source)
        if keep_audio and config.uses_audio:
            kwargs["float32_modules"] = sorted({*config.float32_modules, "audio_tower"})
        kwargs.update(quantized_loading_kwargs(arguments.quantize, device, dtype or torch.float32))
        model = LavCapForConditionalGeneration.from_pretrained(source, **kwargs)
        return model, LavCapProcessor.from_pretrained(source)
    if not arguments.language_model:
        raise ValueError(
            "give --model_name_or_path (a LAVCap folder) or the components, at least --language_model"
        )
    model, tokenizer = build_from_components(
        arguments.audio_encoder,
        arguments.vision_encoder,
        arguments.language_model,
        arguments.tokenizer_name,
        dtype=dtype,
        float32_modules=["audio_tower"] if keep_audio else (),
        fusion_type=arguments.fusion_type,
        num_frames=arguments.num_frames,
        **({"visual_embed_dim": arguments.visual_embed_dim} if arguments.visual_embed_dim else {}),
    )
    return model, LavCapProcessor.from_model_config(model.config, tokenizer)


def save_base_model(
    model: LavCapForConditionalGeneration, processor: LavCapProcessor, folder: Path, write: bool
) -> None:
    """Keep the model a components build starts from, and record it as the adapters' base model.

    The new token rows of a components build are drawn at random (seeded), so checkpoints need this copy to load.
    """
    if write and not (folder / "config.json").is_file():
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    # peft records the instance attribute as the adapters' base model.
    model.name_or_path = model.config._name_or_path = str(folder.resolve())


def build_dataset(
    data: DataArguments, config: LavCapConfig, processor: LavCapProcessor, training: bool, seed: int = 0
) -> LavCapDataset | None:
    """The training dataset (one example per caption) or the evaluation one (one example per clip)."""
    source = data.train_data if training else data.eval_data
    if source is None:
        return None
    clips = load_clips(
        source,
        data.train_split if training else data.eval_split,
        columns={
            "video": data.video_column,
            "audio": data.audio_column,
            "caption": data.caption_column,
            "id": data.id_column,
        },
        visual_features_dir=data.visual_features_dir,
        use_visual_features=data.use_visual_features,
    )
    if not training:
        clips = group_clips(clips)
    limit = data.max_train_samples if training else data.max_eval_samples
    if limit is not None:
        clips = [clips[i] for i in range(min(limit, len(clips)))]
    return LavCapDataset(
        clips,
        sampling_rate=processor.feature_extractor.sampling_rate,
        num_frames=config.num_frames,
        load_audio=config.uses_audio,
        load_visual=config.uses_visual,
        seed=seed,
    )


def build_trainer(
    arguments: LavCapArguments,
    model: nn.Module,
    processor: LavCapProcessor,
    train_dataset: LavCapDataset | None,
    eval_dataset: LavCapDataset | None,
) -> Trainer:
    """`LavCapTrainer`, or its Gaudi twin (`GaudiTrainer` + `GaudiConfig`) with `arguments.gaudi`."""
    data, evaluation = arguments.data, arguments.evaluation
    collator = LavCapDataCollator(
        processor,
        spec_augment=data.spec_augment,
        random_instruction=data.random_instruction,
        max_caption_length=data.max_caption_length,
    )
    eval_collator = LavCapDataCollator(
        processor,
        training=False,
        instruction=evaluation.eval_instruction,
        max_caption_length=data.max_caption_length,
        teacher_forcing=True,
    )
    kwargs: dict[str, Any] = {
        "model": model,
        "args": arguments.training,
        "train_dataset": train_dataset,
        "eval_dataset": eval_dataset,
        "data_collator": collator,
        "eval_data_collator": eval_collator,
        "generation_kwargs": evaluation.generate_settings(),
        "caption_metrics": evaluation.caption_metrics,
        "warmup_start_lr": arguments.schedule.warmup_start_lr,
    }
    if arguments.gaudi:
        from .gaudi import gaudi_config_for

        trainer_class = gaudi_trainer_class()
        kwargs["gaudi_config"] = gaudi_config_for(arguments.training)
    else:
        trainer_class = LavCapTrainer
    kwargs[processor_kwarg(trainer_class)] = processor
    return trainer_class(**kwargs)


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` in `output_dir` that was saved completely, or None.

    The Trainer writes a checkpoint's trainer state last, so a checkpoint whose `trainer_state.json` is missing or
    unreadable was cut off mid-save (a killed job): resuming skips it rather than loading a half-written folder.
    (`transformers.trainer_utils.get_last_checkpoint` returns the newest folder, complete or not.)
    """
    complete = []
    for path in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = path.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-")
        if not (step.isdigit() and path.is_dir()):
            continue
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            logger.warning(
                f"{path} was not saved completely (no readable trainer_state.json); not resuming from it"
            )
            continue
        complete.append((int(step), str(path)))
    return max(complete)[1] if complete else None


def resume_target(value: str | None, output_dir: str | os.PathLike) -> str | None:
    """`--resume_from_checkpoint`: a checkpoint folder, or `true` / `last` for the newest complete one in output_dir."""
    if value is None or value.lower() in ("", "false", "none"):
        return None
    if value.lower() not in ("true", "last", "latest"):
        return value
    checkpoint = last_complete_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    if checkpoint is None:
        raise ValueError(f"--resume_from_checkpoint {value}: no complete checkpoint in {output_dir}")
    return checkpoint


def run_training(arguments: LavCapArguments | Sequence[str] | None = None) -> Trainer:
    """Fine-tune LAVCap as `arguments` (or a command line for `parse_arguments`) say; returns the trainer.

    The adapters, projector, logit scale, running statistics and processor are saved to `output_dir` (and in every
    checkpoint); `--merged_output_dir` also writes a merged plain model folder.
    """
    if not isinstance(arguments, LavCapArguments):
        arguments = parse_arguments(arguments)
    training = arguments.training
    set_seed(training.seed)
    model, processor = load_model_and_processor(arguments.model, training.device)
    if not arguments.model.model_name_or_path:
        base_folder = Path(training.output_dir) / "base_model"
        with training.main_process_first(desc="saving the base model"):
            save_base_model(model, processor, base_folder, training.should_save)
        if arguments.model.quantize:
            # A components build is quantized as it is read back from its saved folder.
            quantized = dataclasses.replace(arguments.model, model_name_or_path=str(base_folder.resolve()))
            del model  # the unquantized build leaves memory before the quantized one is read
            model, processor = load_model_and_processor(quantized, training.device)
    if arguments.model.quantize:
        model = prepare_for_kbit_training(model)
    model = apply_lora(model, arguments.lora.lora_config(model.config.text_config.model_type))
    train_dataset = build_dataset(arguments.data, model.config, processor, training=True, seed=training.seed)
    if train_dataset is None:
        raise ValueError("give the training data: --train_data")
    eval_dataset = build_dataset(arguments.data, model.config, processor, training=False)
    trainer = build_trainer(arguments, model, processor, train_dataset, eval_dataset)
    trainer.train(resume_from_checkpoint=resume_target(training.resume_from_checkpoint, training.output_dir))
    trainer.save_model()
    if arguments.model.merged_output_dir and trainer.is_world_process_zero():
        if arguments.model.quantize:
            # Onto the unquantized model, read again, never into the quantized weights.
            merge_checkpoint(training.output_dir, arguments.model.merged_output_dir)
        else:
            merge_and_save(
                trainer.accelerator.unwrap_model(trainer.model), arguments.model.merged_output_dir, processor
            )
    return trainer
