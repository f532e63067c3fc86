"""`LavCapTrainer` (and the GaudiTrainer twin): lm/OT loss logging, the released schedule and decay groups, the best
checkpoint by teacher-forced token accuracy, and generate() evaluation scored with the caption metrics."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import SchedulerType

from ..captioning.generation import decode_captions, generate_caption_ids
from ..data.clips import Clip
from ..data.collator import CAPTION_PREFIX, LavCapDataCollator
from ..data.dataset import EpochShuffleSampler, LavCapDataset
from ..evaluation.metrics import CAPTION_METRICS, score_captions
from ..model.modeling_lavcap import IGNORE_INDEX
from ..model.processing_lavcap import LavCapProcessor
from .fsdp import load_fsdp_adapters, nested_fsdp_units_removed, prepare_for_fsdp
from .schedule import lavcap_lr_scheduler


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
