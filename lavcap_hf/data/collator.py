"""`LavCapDataCollator`: turns [`LavCapDataset`] items into model inputs, for training and for evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..model.modeling_lavcap import IGNORE_INDEX
from ..model.processing_lavcap import LavCapProcessor, draw_training_instructions

CAPTION_PREFIX = "caption_"
"""Evaluation batches carry the teacher-forced rows (prompt + caption) under `caption_input_ids`,
`caption_attention_mask` and `caption_labels`, next to the prompts `input_ids` / `attention_mask` that generate."""


@dataclass
class LavCapDataCollator:
    """Turns [`LavCapDataset`] items into model inputs with the processor (in the DataLoader workers).

    Training batches: `prompt + caption + EOS` rows, `labels` on caption + EOS, one of the paper's 8 instructions
    per example and SpecAugment on the fbank. As in the release, the captions of a batch start at one column: a
    shorter prompt is padded (attention mask 0) between its instruction and its caption, and the rows are
    right-padded after their EOS (see `_align_captions`). Evaluation batches (`training=False`): left-padded
    prompts with `instruction` (the processor's default when None), no augmentation, and `clip_index` (B,), the
    dataset indices the trainer uses to find each clip's references. With `teacher_forcing`, when every clip of the
    batch has a caption, they also hold the right-padded `prompt + caption + EOS` rows and their labels under
    `caption_input_ids`, `caption_attention_mask`, `caption_labels` (B, L), for the teacher-forced loss and token
    accuracy; the prompts are cut from these rows, so featurisation runs once.

    Random choices come from a generator seeded with the items' `seed`s, so batches are reproducible.

    Returns:
        `input_ids`, `attention_mask` (B, L), `input_features` (B, frames, mel) unless `visual_only`,
        `pixel_values_videos` (B, V, 3, H, W) or `video_embeds` (B, V, D) unless `audio_only`, and `labels` (B, L) or
        `clip_index` (B,) (and the `caption_*` rows).
    """

    processor: LavCapProcessor
    training: bool = True
    spec_augment: bool = True
    random_instruction: bool = True
    instruction: str | None = None
    max_caption_length: int | None = None
    teacher_forcing: bool = False

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([item["seed"] for item in items])
        audio = [item["audio"] for item in items] if "audio" in items[0] else None
        sampling_rate = items[0]["sampling_rate"]
        frames = self._stack(items, "frames")
        embeds = self._stack(items, "video_embeds")
        captions = None
        instruction: str | list[str] | None = self.instruction
        if self.training:
            captions = [item["caption"] for item in items]
            missing = [item["id"] for item in items if not item["caption"]]
            if missing:
                raise ValueError(f"training clips need a caption; clips {missing} have none")
            if self.random_instruction:
                # Drawn here, before the processor draws the SpecAugment masks from the same generator.
                instruction = draw_training_instructions(rng, len(items))
        elif self.teacher_forcing and all(item["caption"] for item in items):
            captions = [item["caption"] for item in items]
        batch = self.processor(
            audio=audio,
            videos=frames,
            video_embeds=embeds,
            captions=captions,
            sampling_rate=sampling_rate,
            instruction=instruction,
            spec_augment=self.training and self.spec_augment,
            generator=rng,
            padding_side="right" if captions is not None else "left",
            max_caption_length=self.max_caption_length,
            return_tensors="pt",
        )
        batch = dict(batch)
        pad_token_id = self.processor.tokenizer.pad_token_id
        if self.training:
            return self._align_captions(batch, pad_token_id)
        if captions is not None:
            batch = self._split_prompts(batch, pad_token_id)
        batch["clip_index"] = torch.tensor([item["index"] for item in items])
        return batch

    @staticmethod
    def _align_captions(batch: dict[str, torch.Tensor], pad_token_id: int) -> dict[str, torch.Tensor]:
        """Start every caption of right-padded training rows (B, L) at the same column, as the release lays out its
        training batches: it pads the instruction piece (`"</Speech> {instruction}\nASSISTANT:"`) to the longest of
        the batch before the caption, with the attention mask 0 and no labels there, and its position ids count
        through that padding. With one instruction per batch the rows are returned unchanged.

        Returns the rows (B, P + C): P the longest prompt, C the longest caption + EOS, then right padding.
        """
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        prompt_lengths = (labels != IGNORE_INDEX).int().argmax(dim=1)  # every row has a caption's EOS
        width = int(prompt_lengths.max())
        if bool((prompt_lengths == width).all()):
            return batch
        lengths = mask.sum(dim=1)
        columns = torch.arange(width + int((lengths - prompt_lengths).max()))[None, :]
        shift = (width - prompt_lengths)[:, None]
        in_prompt = columns < prompt_lengths[:, None]
        # (B, P + C): the column of `ids` each new column copies; the padding gap and the end copy nothing.
        source = torch.where(in_prompt, columns, columns - shift)
        present = (in_prompt | (columns >= width)) & (source < lengths[:, None])
        source = source.clamp(0, ids.shape[1] - 1)
        batch["input_ids"] = torch.where(present, ids.gather(1, source), pad_token_id)
        batch["attention_mask"] = present.to(mask.dtype)
        batch["labels"] = torch.where(present, labels.gather(1, source), IGNORE_INDEX)
        return batch

    @staticmethod
    def _split_prompts(batch: dict[str, torch.Tensor], pad_token_id: int) -> dict[str, torch.Tensor]:
        """Move the right-padded teacher-forced rows (B, L) to `caption_*` and put their prompts, left-padded
        (B, P), in `input_ids` / `attention_mask`: the prompt of a row is what precedes its first label."""
        ids, mask, labels = batch.pop("input_ids"), batch.pop("attention_mask"), batch.pop("labels")
        batch.update({f"{CAPTION_PREFIX}input_ids": ids, f"{CAPTION_PREFIX}attention_mask": mask})
        batch[f"{CAPTION_PREFIX}labels"] = labels
        # The first labelled position; every row has one, its caption's EOS.
        prompt_lengths = (labels != IGNORE_INDEX).int().argmax(dim=1)
        width = int(prompt_lengths.max())
        # (B, P): the position in `ids` that each left-padded prompt position copies, negative on the padding.
        source = torch.arange(width)[None, :] - (width - prompt_lengths)[:, None]
        present = source >= 0
        batch["input_ids"] = torch.where(present, ids.gather(1, source.clamp(min=0)), pad_token_id)
        batch["attention_mask"] = present.to(mask.dtype)
        return batch

    @staticmethod
    def _stack(items: list[dict[str, Any]], key: str) -> list[np.ndarray] | None:
        present = [key in item for item in items]
        if not any(present):
            return None
        if not all(present):
            raise ValueError(
                f"a batch mixes clips with and without {key}; give every clip the same visual input"
            )
        return [item[key] for item in items]
