"""Fine-tuning LAVCap: LoRA set-up (peft), data collator, Trainer with lm/ot loss logging and generate() evaluation,
checkpoint merging, and the reusable `run_training` behind `examples/train.py` and `lavcap train`.

The paper's recipe (configs/config_best.yaml of the release): LoRA r 8 / alpha 32 / dropout 0.1 on the q/v projections
of CED and of the LLM, projector and OT logit scale trained, CLIP and base weights frozen; AdamW (betas 0.9, 0.999),
weight decay 1e-6 on matrices, lr 5e-6 reached by a linear warm-up from 2e-9 over 2 epochs, then a cosine, computed
over the whole run (100 epochs), down to 1e-8 (`lavcap_lr_scheduler`); batch 4 per device, captions cut to 300
tokens, SpecAugment (48 mel bins, 192 frames) on training clips only, one of 8 instructions drawn per example;
CED's input BatchNorm statistics updated in training, in float32; the kept checkpoint is the one with the best
teacher-forced token accuracy on the evaluation split; evaluation captions decoded as the model's
`generation_config` says (the released beam search, `lavcap_hf.configuration_lavcap.RELEASED_DECODING`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, PeftModel
from peft.utils import ModulesToSaveWrapper
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import SchedulerType, set_seed
from transformers.utils import logging

from ._compat import dtype_kwarg, processor_kwarg
from .caption_generation import decode_captions, generate_caption_ids
from .collator import CAPTION_PREFIX, LavCapDataCollator
from .configuration_lavcap import LavCapConfig
from .convert import build_from_components
from .data import Clip, EpochShuffleSampler, LavCapDataset, group_clips, load_clips
from .lora import apply_lora, lavcap_lora_config, merge_and_save, merge_checkpoint
from .metrics import CAPTION_METRICS, score_captions
from .modeling_lavcap import IGNORE_INDEX, LavCapForConditionalGeneration
from .processing_lavcap import LavCapProcessor
from .quantization import prepare_for_kbit_training, quantized_loading_kwargs

logger = logging.get_logger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Learning-rate schedule and token accuracy


def lavcap_lr_factor(
    step: int, *, warmup_steps: int, total_steps: int, start_factor: float, min_factor: float
) -> float:
    """Multiple of the peak lr at optimizer step `step` (0-based) in the released schedule (optims.py).

    Linear warm-up from `start_factor` to 1 over `warmup_steps` steps, then a cosine from 1 to `min_factor` whose
    phase runs over the whole run, `pi * step / total_steps`, not over the steps after the warm-up.
    """
    if step < warmup_steps:
        return start_factor + (1.0 - start_factor) * step / warmup_steps
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))


def lavcap_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    num_training_steps: int,
    num_warmup_steps: int,
    warmup_start_lr: float = 0.0,
    min_lr: float | None = None,
    min_lr_rate: float | None = None,
) -> LambdaLR:
    """The released LAVCap schedule as a `LambdaLR` over the optimizer's lr (the peak, 5e-6 in the paper).

    Step `s` of `num_training_steps` runs at `warmup_start_lr + (lr - warmup_start_lr) * s / num_warmup_steps` during
    the warm-up, then at `min_lr + (lr - min_lr) * (1 + cos(pi * s / num_training_steps)) / 2`. `min_lr` (absolute)
    or `min_lr_rate` (fraction of lr) as for Transformers' `cosine_with_min_lr`.
    """
    if (min_lr is None) == (min_lr_rate is None):
        raise ValueError("the LAVCap schedule needs one of min_lr and min_lr_rate in lr_scheduler_kwargs")
    peak = optimizer.defaults["lr"]
    factor = functools.partial(
        lavcap_lr_factor,
        warmup_steps=num_warmup_steps,
        total_steps=num_training_steps,
        start_factor=warmup_start_lr / peak,
        min_factor=min_lr / peak if min_lr is not None else min_lr_rate,
    )
    return LambdaLR(optimizer, factor)


def token_accuracy_counts(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Teacher-forced next-token accuracy counts, as the released validation measures them.

    Args:
        logits: (B, L, V) logits of the full sequences (prompt + caption).
        labels: (B, L), -100 everywhere but the caption tokens and EOS.
    Returns:
        (B, 2) int64 [correct, scored] per row: positions t whose label t + 1 is not -100, and among them those
        where the argmax of logits t is that label.
    """
    predicted = logits[:, :-1].argmax(dim=-1)
    targets = labels[:, 1:].to(predicted.device)
    scored = targets != IGNORE_INDEX
    correct = (predicted == targets) & scored
    return torch.stack([correct.sum(dim=1), scored.sum(dim=1)], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Trainer


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


class _StartDatasetEpoch(TrainerCallback):
    """Tells the training dataset which epoch starts: its example order and random choices change per epoch."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_epoch_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        dataset = self.trainer.train_dataset
        if isinstance(dataset, LavCapDataset):
            # state.epoch is fractional when resuming mid-epoch.
            dataset.start_epoch(math.floor(state.epoch + 1e-6))


class LavCapTrainerMixin:
    """LAVCap training on top of a Transformers `Trainer` (or optimum-habana's `GaudiTrainer`).

    - logs `lm_loss` and `ot_loss` next to `loss`, each averaged over the logging interval and the processes;
    - evaluates as the release validates: teacher-forced loss (`eval_loss`) and token accuracy (`eval_token_accuracy`,
      correct argmax next tokens over all caption tokens of the split) on each clip's caption (that of its first
      entry, with the evaluation instruction), one forward pass per batch. With `caption_metrics` (and always in
      `predict`) it also generates captions (the model's `generation_config`, overridden by `generation_kwargs`,
      any `generate()` argument) and, when the
      clips have references, scores them with `score_captions` (on the main process; the scores are
      broadcast). The captions of the last generation are in
      `last_eval_predictions` and are written to `<output_dir>/captions-step<N>.jsonl`. The kept checkpoint is
      chosen by the Trainer's `metric_for_best_model` (`token_accuracy` as released, or e.g. `CIDEr`);
    - uses [`LavCapDataCollator`] for training and its `training=False, teacher_forcing=True` twin for evaluation
      unless given; `dataloader_drop_last` applies to training only (evaluation scores every clip);
    - weight decay on matrices only (not on biases, norms or the logit scale), as the released optimiser;
    - with `warmup_start_lr`, `lr_scheduler_type="cosine_with_min_lr"` runs the released schedule
      ([`lavcap_lr_scheduler`]): the Trainer's warm-up steps and `lr_scheduler_kwargs` (`min_lr`), a warm-up that
      starts at `warmup_start_lr` and a cosine whose phase spans the whole run;
    - orders a [`LavCapDataset`] with [`EpochShuffleSampler`] and starts each of its epochs, so that a resumed run
      replays exactly the batches and augmentations of an uninterrupted one.

    Pass everything as keywords. `args.remove_unused_columns` must be False: the collator reads raw clip fields.
    """

    def __init__(
        self,
        *,
        eval_data_collator: LavCapDataCollator | None = None,
        generation_kwargs: dict[str, Any] | None = None,
        caption_metrics: bool = True,
        warmup_start_lr: float | None = None,
        **kwargs: Any,
    ) -> None:
        processor = kwargs.get("processing_class", kwargs.get("tokenizer"))
        if kwargs.get("data_collator") is None and isinstance(processor, LavCapProcessor):
            kwargs["data_collator"] = LavCapDataCollator(processor)
        super().__init__(**kwargs)
        if self.args.remove_unused_columns:
            raise ValueError(
                "LAVCap training needs remove_unused_columns=False: its collator reads the raw audio, frames and captions"
            )
        # lm_loss and ot_loss are means over the batch: the Trainer must divide them for gradient accumulation.
        self.model_accepts_loss_kwargs = False
        self.eval_data_collator = eval_data_collator
        if eval_data_collator is None and isinstance(self.data_collator, LavCapDataCollator):
            self.eval_data_collator = dataclasses.replace(
                self.data_collator, training=False, teacher_forcing=True
            )
        self.generation_kwargs = dict(generation_kwargs or {})
        self.caption_metrics = caption_metrics
        self.warmup_start_lr = warmup_start_lr
        self._check_best_metric()
        if self.compute_metrics is None:
            self.compute_metrics = self._evaluation_metrics
        self.last_eval_predictions: list[dict[str, Any]] = []
        self._loss_sums: dict[str, torch.Tensor] = {}
        self._loss_batches = 0
        self._scored_dataset: Any = None
        self._generate_captions = True
        self.add_callback(_StartDatasetEpoch(self))
        if getattr(self, "is_fsdp_enabled", False):
            prepare_for_fsdp(self.model)
        # FSDP shows its parameters as flat 1-D shards: the decay groups follow the shapes before wrapping.
        self._vector_parameter_ids = {id(p) for p in self.model.parameters() if p.ndim < 2}

    def _check_best_metric(self) -> None:
        metric = (self.args.metric_for_best_model or "").removeprefix("eval_")
        if metric in CAPTION_METRICS and not self.caption_metrics:
            raise ValueError(
                f"metric_for_best_model={metric!r} is a caption metric: it needs caption_metrics=True (evaluation then "
                "generates captions); token_accuracy needs no generation"
            )

    @property
    def processor(self) -> LavCapProcessor | None:
        return getattr(self, "processing_class", None) or getattr(self, "tokenizer", None)

    # -- losses --------------------------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        if model.training:
            self._check_padding_is_attended(model, inputs)
        outputs = model(**inputs)
        if model.training:
            for name in ("lm_loss", "ot_loss"):
                value = getattr(outputs, name, None)
                if value is not None:
                    previous = self._loss_sums.get(name)
                    value = value.detach().float()
                    self._loss_sums[name] = value if previous is None else previous + value
            self._loss_batches += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def _check_padding_is_attended(self, model: nn.Module, inputs: dict[str, Any]) -> None:
        """Refuse a batch padded before its last real token under flash attention.

        Training batches are padded between prompt and caption when their clips draw instructions of different
        lengths (`LavCapDataCollator._align_captions`, as released). The release predicts the first caption token
        from the last padding position, which attends to the prompt; flash attention drops padded positions and would
        predict it from a zero vector instead.
        """
        text_config = getattr(self.accelerator.unwrap_model(model).config, "text_config", None)
        implementation = str(getattr(text_config, "_attn_implementation", None) or "")
        mask = inputs.get("attention_mask")
        if "flash" not in implementation or mask is None:
            return
        if bool((mask[:, 1:] > mask[:, :-1]).any()):
            raise ValueError(
                "this training batch is padded between prompts and captions (its clips have instructions of "
                f"different lengths, padded as the released code pads them), which {implementation} does not "
                "attend as the release does: train with attn_implementation='sdpa' or 'eager', or with one "
                "instruction per batch (random_instruction=False)"
            )

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._loss_batches:
            for name, total in sorted(self._loss_sums.items()):
                mean = self.accelerator.reduce(total / self._loss_batches, reduction="mean")
                logs[name] = round(mean.item(), 4)
            self._loss_sums, self._loss_batches = {}, 0
        super().log(logs, *args, **kwargs)

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if isinstance(dataset, LavCapDataset):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return EpochShuffleSampler(dataset, seed)
        return super()._get_train_sampler(train_dataset)

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """The Trainer's save, and the model's generation config next to adapters (peft writes none), so that every
        checkpoint and output folder carries the decoding it was trained for (see `lavcap_hf.lora.load_trained`)."""
        unnested = nested_fsdp_units_removed(self.model) if getattr(self, "is_fsdp_enabled", False) else None
        with unnested or contextlib.nullcontext():
            super()._save(output_dir, state_dict)
        model = self.accelerator.unwrap_model(self.model)
        if isinstance(model, PeftModel) and self.args.should_save:
            model.get_base_model().generation_config.save_pretrained(output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if getattr(self, "is_fsdp_enabled", False) and isinstance(
            self.accelerator.unwrap_model(self.model), PeftModel
        ):
            load_fsdp_adapters(self.model if model is None else model, resume_from_checkpoint)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        parameters = dict(model.named_parameters())
        return [
            name
            for name in super().get_decay_parameter_names(model)
            if id(parameters[name]) not in self._vector_parameter_ids
        ]

    # -- learning-rate schedule ----------------------------------------------------------------------------------

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> Any:
        if self.lr_scheduler is not None or self.warmup_start_lr is None:
            return super().create_scheduler(num_training_steps, optimizer)
        if SchedulerType(self.args.lr_scheduler_type) != SchedulerType.COSINE_WITH_MIN_LR:
            raise ValueError(
                "warmup_start_lr selects the released LAVCap schedule, a variant of cosine_with_min_lr: set "
                f"lr_scheduler_type=cosine_with_min_lr (got {self.args.lr_scheduler_type})"
            )
        self.lr_scheduler = lavcap_lr_scheduler(
            optimizer if optimizer is not None else self.optimizer,
            num_training_steps,
            self.args.get_warmup_steps(num_training_steps),
            self.warmup_start_lr,
            **(self.args.lr_scheduler_kwargs or {}),
        )
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # -- evaluation ----------------------------------------------------------------------------------------------

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        return self._with_eval_collator(super().get_eval_dataloader, eval_dataset)

    def get_test_dataloader(self, test_dataset: Any) -> Any:
        return self._with_eval_collator(super().get_test_dataloader, test_dataset)

    def _with_eval_collator(self, build: Any, dataset: Any) -> Any:
        """`build(dataset)` with the evaluation collator, keeping every clip: `dataloader_drop_last` is the
        training recipe's (the release drops the last partial batch in training only)."""
        training_collator, drop_last = self.data_collator, self.args.dataloader_drop_last
        self.data_collator = self.eval_data_collator or training_collator
        self.args.dataloader_drop_last = False
        try:
            return build(dataset)
        finally:
            self.data_collator, self.args.dataloader_drop_last = training_collator, drop_last

    def evaluate(self, eval_dataset: Any = None, *args: Any, **kwargs: Any) -> dict[str, float]:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, str):
            dataset = self.eval_dataset[dataset]
        with self._scoring(dataset, generate=self.caption_metrics):
            return super().evaluate(eval_dataset, *args, **kwargs)

    def predict(self, test_dataset: Any, *args: Any, **kwargs: Any) -> Any:
        with self._scoring(test_dataset, generate=True):
            return super().predict(test_dataset, *args, **kwargs)

    @contextlib.contextmanager
    def _scoring(self, dataset: Any, generate: bool) -> Iterator[None]:
        """The dataset whose references the metrics use, and whether its evaluation generates captions."""
        self._scored_dataset, self._generate_captions = dataset, generate
        try:
            yield
        finally:
            self._generate_captions = True

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, tuple[torch.Tensor, ...] | None, torch.Tensor | None]:
        """Teacher-forced loss and token counts on the clips' captions, and the generated captions when asked.

        Returns:
            (loss, or None when the batch has no captions; predictions; dataset indices of the clips (B,)), where
            predictions are `(token_counts,)` or, when generating, `(sequences, token_counts)`: sequences (B, T) the
            new token ids (first, where a generic `compute_metrics` looks for them), token_counts (B, 2) [correct,
            scored] (zeros without captions). A tuple, not a dict: optimum-habana's evaluation loop converts tuples
            of predictions only.
        """
        if "clip_index" not in inputs:
            raise ValueError(
                "evaluation batches must come from LavCapDataCollator(training=False) (they carry clip_index)"
            )
        inputs = self._prepare_inputs(inputs)
        clip_index = inputs.pop("clip_index")
        forced = {
            key.removeprefix(CAPTION_PREFIX): inputs.pop(key)
            for key in list(inputs)
            if key.startswith(CAPTION_PREFIX)
        }
        loss, counts = None, torch.zeros(len(clip_index), 2, dtype=torch.long, device=clip_index.device)
        if forced:
            loss, counts = self._teacher_forced(model, inputs, forced)
        if prediction_loss_only:
            return loss, None, None
        predictions = (self._generate(model, inputs), counts) if self._generate_captions else (counts,)
        return loss, predictions, clip_index

    def _teacher_forced(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], forced: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss (lm + OT, as in training) and token counts (B, 2) of one forward pass over prompt + caption."""
        media = {key: value for key, value in inputs.items() if key not in ("input_ids", "attention_mask")}
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, {**media, **forced}, return_outputs=True)
        return loss.detach(), token_accuracy_counts(outputs.logits, forced["labels"])

    def _generate(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """New token ids (B, T) generated from the left-padded prompts of `inputs`, with the model's generation
        config under `generation_kwargs`."""
        processor = self.processor
        generation = dict(self.generation_kwargs)
        if processor is not None:
            generation.setdefault("eos_token_id", processor.tokenizer.eos_token_id)
            generation.setdefault("pad_token_id", processor.tokenizer.pad_token_id)
        with self.autocast_smart_context_manager():
            return generate_caption_ids(self.accelerator.unwrap_model(model), inputs, **generation)

    def _evaluation_metrics(self, prediction: Any) -> dict[str, float]:
        """compute_metrics: token accuracy from the summed counts (over all caption tokens of the split, as the
        release's correct / n_token), and caption scores when captions were generated."""
        *sequences, counts = prediction.predictions
        metrics: dict[str, float] = {}
        correct, scored = np.asarray(counts, dtype=np.int64).sum(axis=0)
        if scored > 0:
            metrics["token_accuracy"] = float(correct / scored)
        if sequences:
            metrics.update(self._score_captions(sequences[0], prediction.label_ids))
        return metrics

    def _score_captions(self, token_ids: Any, clip_indices: Any) -> dict[str, float]:
        """Decode the generated ids (N, T), pair them with the clips' references, score them."""
        captions = decode_captions(self.processor, token_ids)
        clips: Sequence[Clip] = getattr(self._scored_dataset, "clips", None) or []
        indices = np.asarray(clip_indices).reshape(-1).tolist()
        references = [list(clips[i].references) if clips else [] for i in indices]
        self.last_eval_predictions = [
            {"id": clips[i].id if clips else str(i), "caption": caption, "references": refs}
            for i, caption, refs in zip(indices, captions, references, strict=True)
        ]
        metrics: dict[str, float] = {"num_clips": len(captions)}
        if self.caption_metrics and references and all(references):
            metrics.update(self._main_process_scores(captions, references))
        if self.args.should_save:
            os.makedirs(self.args.output_dir, exist_ok=True)
            path = Path(self.args.output_dir) / f"captions-step{self.state.global_step}.jsonl"
            path.write_text("".join(json.dumps(row) + "\n" for row in self.last_eval_predictions))
        return metrics

    def _main_process_scores(self, captions: list[str], references: list[list[str]]) -> dict[str, float]:
        """Caption metrics computed once (METEOR starts a JVM) and shared with the other processes."""
        from accelerate.utils import broadcast_object_list

        scores = [None]
        if self.is_world_process_zero():
            result = score_captions(
                captions, references
            )  # the `evaluate` metric module, as `lavcap evaluate`
            scores = [{name: result[name] for name in CAPTION_METRICS if result[name] is not None}]
        if self.args.world_size > 1:
            broadcast_object_list(scores, from_process=0)
        return scores[0]


class LavCapTrainer(LavCapTrainerMixin, Trainer):
    """Transformers `Trainer` for LAVCap; see [`LavCapTrainerMixin`]."""


def gaudi_trainer_class() -> type:
    """`LavCapTrainerMixin` on top of optimum-habana's `GaudiTrainer` (imported only here)."""
    from .gaudi import import_optimum_habana

    gaudi_trainer = import_optimum_habana().GaudiTrainer
    return type("LavCapGaudiTrainer", (LavCapTrainerMixin, gaudi_trainer), {"__module__": __name__})


# ----------------------------------------------------------------------------------------------------------------
# Arguments and run


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
    """Training and evaluation data (see `lavcap_hf.data.load_clips` for the accepted sources)."""

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
    """
    complete = []
    for path in Path(output_dir).glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
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
