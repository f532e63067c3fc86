"""The model card of a LAVCap model (`model_card.jinja`): what it is, how to use it, its evaluation results as a
markdown table and `model-index` metadata. A repository pushed with it loads where this package is not installed:
`config.json` carries `auto_map` and `custom_pipelines`, and the model set's code is uploaded next to the weights."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import PretrainedConfig, PreTrainedModel

from ..evaluation.metrics import CAPTION_METRICS, format_metrics_table
from ..model.configuration_lavcap import PIPELINE_TASK, LavCapConfig
from ..model.optimal_transport import FUSIONS

MODEL_CARD_TEMPLATE = Path(__file__).with_name("model_card.jinja")
TASK_NAME = "Audio-visual captioning"
TAGS = ["lavcap", "audio-visual-captioning", "audio-captioning", "optimal-transport", "custom_code"]
NOT_STATED_DATASET = "unstated"
"""`model-index` dataset type/name of scores whose evaluation set nobody stated (the card never guesses one)."""
RECORDED_CARD_FIELDS = ("training_data", "eval_dataset", "eval_split")
"""Config attributes a model may carry ("recorded with the model"); an argument given explicitly wins."""
FUSION_DESCRIPTIONS = {name: spec.description for name, spec in FUSIONS.items()}
"""One line per fusion type for the model card, from `lavcap_hf.model.optimal_transport.FUSIONS`."""


def load_eval_results(source: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """Caption metrics from a dict or a JSON file (as `lavcap_hf.evaluation.metrics.compute_caption_metrics` returns them).

    Keys are names in `CAPTION_METRICS` with a number or null (unavailable), plus optional `unavailable`,
    `num_clips`, `tokenizer`.
    """
    if not isinstance(source, Mapping):
        path = Path(source)
        try:
            source = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"could not read evaluation results {path}: {error}") from error
        if not isinstance(source, Mapping):
            raise ValueError(
                f"evaluation results {path} must hold a JSON object, got {type(source).__name__}"
            )
    scores = dict(source)
    if not any(name in scores for name in CAPTION_METRICS):
        raise ValueError(
            f"no caption metric among the keys {sorted(scores)}; expected some of {CAPTION_METRICS}"
        )
    for name in CAPTION_METRICS:
        value = scores.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"evaluation result {name} must be a number or null, got {value!r}")
    return scores


def eval_results_to_model_index(
    scores: Mapping[str, Any], dataset_name: str | None = None, dataset_split: str | None = None
) -> list[EvalResult]:
    """One `EvalResult` per available metric of the `audio_captioning` evaluate metric's output (metric type = the
    lower-cased key, e.g. `cider`). Without a stated `dataset_name` the dataset is `unstated`, and no split."""
    name_or_unstated = dataset_name or NOT_STATED_DATASET
    return [
        EvalResult(
            task_type=PIPELINE_TASK,
            task_name=TASK_NAME,
            dataset_type=name_or_unstated.lower(),
            dataset_name=name_or_unstated,
            dataset_split=dataset_split if dataset_name else None,
            metric_type=name.lower(),
            metric_name=name,
            metric_value=float(scores[name]),
        )
        for name in CAPTION_METRICS
        if scores.get(name) is not None
    ]


def render_model_card(
    model_or_config: PreTrainedModel | LavCapConfig,
    repo_id: str | None = None,
    eval_results: Mapping[str, Any] | str | os.PathLike | None = None,
    *,
    base_models: Sequence[str] | None = None,
    license: str | None = None,
    training_data: str | None = None,
    eval_dataset: str | None = None,
    eval_split: str | None = None,
    dataset_name: str | None = None,
    dataset_split: str | None = None,
    template_path: str | os.PathLike = MODEL_CARD_TEMPLATE,
) -> ModelCard:
    """The model card of a LAVCap model: description, usage, training data, metrics table, limitations, citation.

    Args:
        model_or_config: the model or its `LavCapConfig`; the card describes its parts and fusion type.
        repo_id: Hub id used in the usage example and as the model name.
        eval_results: caption metrics (see `load_eval_results`); they fill the table and the `model-index`.
        base_models: Hub ids of the pretrained parts, for the `base_model` metadata.
        license: Hub license id (e.g. `llama2` for a LLaMA-2 language model).
        training_data: what the model was trained on, as the uploader states it (the "Training data" section).
        eval_dataset, eval_split: the set the metrics were computed on, as the uploader states it.
            Each of these three defaults to the model config's attribute of the same name when the model recorded
            one (`RECORDED_CARD_FIELDS`), else the card says it is not stated: it never assumes a dataset.
        dataset_name, dataset_split: older names of `eval_dataset`, `eval_split`.
        template_path: the Jinja template (default: the one shipped in this package).
    """
    config = model_or_config.config if isinstance(model_or_config, PreTrainedModel) else model_or_config
    check_lavcap_config(config)
    training_data = _stated(training_data, config, "training_data")
    eval_dataset = _stated(eval_dataset or dataset_name, config, "eval_dataset")
    eval_split = _stated(eval_split or dataset_split, config, "eval_split")
    scores = load_eval_results(eval_results) if eval_results is not None else None
    model_name = repo_id.split("/")[-1] if repo_id else "LAVCap"
    card_data = ModelCardData(
        language=["en"],
        license=license,
        library_name="transformers",
        tags=TAGS,
        base_model=list(base_models) if base_models else None,
        model_name=model_name,
        eval_results=eval_results_to_model_index(scores, eval_dataset, eval_split) if scores else None,
    )
    audio = config.audio_config
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=model_name,
        repo_id=repo_id or "path/to/lavcap",
        audio_summary=_audio_summary(config),
        vision_summary=_vision_summary(config),
        text_summary=_text_summary(config.text_config),
        fusion_type=config.fusion_type,
        fusion_description=_fusion_summary(config),
        training_data=training_data,
        metrics_table=format_metrics_table(scores) if scores else None,
        eval_dataset=eval_dataset,
        eval_split=eval_split,
        audio_seconds=f"{audio.target_length / 100:g}",
        num_frames=config.num_frames,
    )


def _stated(value: str | None, config: Any, field: str) -> str | None:
    """`value` when given, else the non-blank string the config recorded under `field`, else None."""
    if value is None:
        value = getattr(config, field, None)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{field} must be a string, got {type(value).__name__}")
    return value.strip() or None if value is not None else None


def check_lavcap_config(config: Any) -> None:
    if getattr(config, "model_type", None) != LavCapConfig.model_type:
        raise ValueError(f"expected a LAVCap model or config, got {type(config).__name__}")


def _audio_summary(config: LavCapConfig) -> str:
    if not config.uses_audio:
        return "none (this fusion type ignores the audio)"
    audio = config.audio_config
    return (
        f"CED, {audio.num_hidden_layers} layers of width {audio.hidden_size}; a {audio.num_mel_bins}-bin log-mel fbank "
        f"of {audio.target_length} frames (10 ms hop) becomes {config.num_audio_tokens} tokens after mean pooling over "
        "frequency"
    )


def _vision_summary(config: LavCapConfig) -> str:
    if not config.uses_visual:
        return "none (this fusion type ignores the frames)"
    vision = config.vision_config
    if vision is None:
        return f"none in the checkpoint: pass precomputed `video_embeds` ({config.visual_embed_dim}-d per frame, CLIP)"
    return (
        f"frozen CLIP ViT, {vision.num_hidden_layers} layers of width {vision.hidden_size}, {vision.image_size} px "
        f"frames in {vision.patch_size} px patches; {config.num_frames} frames, one {vision.projection_dim}-d "
        "embedding each"
    )


def _fusion_summary(config: LavCapConfig) -> str:
    audio, video = config.placeholder_counts
    return f"{FUSION_DESCRIPTIONS[config.fusion_type]}; {audio} audio + {video} visual tokens go to the language model"


def _text_summary(text_config: PretrainedConfig) -> str:
    name = getattr(text_config, "_name_or_path", "")
    source = f", initialised from `{name}`" if name else ""
    return (
        f"{text_config.model_type}, {text_config.num_hidden_layers} layers of width {text_config.hidden_size}, "
        f"{text_config.vocab_size} tokens{source}"
    )
