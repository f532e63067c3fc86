"""Uploading a LAVCap model to the Hub: one commit with the weights, the model set's code, the processor and the model
card (`lavcap push-to-hub`)."""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from transformers import AutoProcessor, AutoTokenizer, PreTrainedModel

from ..model._compat import dtype_kwarg
from ..model.modeling_lavcap import LavCapForConditionalGeneration
from .model_card import check_lavcap_config, render_model_card


def stage_model_repo(
    model: PreTrainedModel,
    folder: str | os.PathLike,
    processor: Any = None,
    eval_results: Mapping[str, Any] | str | os.PathLike | None = None,
    repo_id: str | None = None,
    **card_kwargs: Any,
) -> list[str]:
    """Write everything a Hub repository of `model` holds into `folder`; returns the files, relative, sorted.

    What `model.save_pretrained` writes (safetensors weights; `config.json` with `auto_map` and, when the
    `audio-visual-captioning` pipeline is registered, `custom_pipelines`; the modelling and pipeline code), the
    processor's files (any object with `save_pretrained`, e.g. a `LavCapProcessor` or a tokenizer) and `README.md`,
    the model card (`card_kwargs` go to `render_model_card`).
    """
    check_lavcap_config(getattr(model, "config", None))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Weights, config with auto_map and custom_pipelines, the model set's code.
    model.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)
    render_model_card(model, repo_id, eval_results, **card_kwargs).save(folder / "README.md")
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def push_model_to_hub(
    model: PreTrainedModel,
    repo_id: str,
    processor: Any = None,
    eval_results: Mapping[str, Any] | str | os.PathLike | None = None,
    private: bool = False,
    token: str | None = None,
    api: HfApi | None = None,
    commit_message: str = "Upload LAVCap model",
    **card_kwargs: Any,
) -> Any:
    """Upload `model` (see `stage_model_repo`) to the Hub repository `repo_id`, created when missing.

    Returns the `upload_folder` commit info. `api` defaults to `HfApi(token=token)`.
    """
    api = api if api is not None else HfApi(token=token)
    with tempfile.TemporaryDirectory() as folder:
        stage_model_repo(model, folder, processor, eval_results, repo_id=repo_id, **card_kwargs)
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
        return api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=folder,
            repo_type="model",
            commit_message=commit_message,
            token=token,
        )


def load_processor(folder: str | os.PathLike) -> Any:
    """The processor saved in `folder` (AutoProcessor), else its tokenizer, else None."""
    folder = Path(folder)
    if (folder / "processor_config.json").exists():
        return AutoProcessor.from_pretrained(folder)
    if (folder / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(folder)
    return None


def run_push(args: argparse.Namespace) -> Any:
    """`lavcap push-to-hub`: load the saved model and its processor, upload them with a model card."""
    model = LavCapForConditionalGeneration.from_pretrained(args.model, **{dtype_kwarg(): "auto"})
    commit = push_model_to_hub(
        model,
        args.repo_id,
        processor=load_processor(args.model),
        eval_results=args.eval_results,
        private=args.private,
        token=args.token,
        commit_message=args.commit_message,
        base_models=args.base_models,
        license=args.license,
        **_card_arguments(args),
    )
    print(f"pushed {args.model} to {args.repo_id}: {getattr(commit, 'commit_url', commit)}")
    return commit


def _card_arguments(args: argparse.Namespace) -> dict[str, str | None]:
    """training_data / eval_dataset / eval_split from the parsed arguments (see `add_model_card_arguments`); a
    parser without them (the older `--dataset-name`, `--dataset-split` only) still passes those on."""
    return {
        "training_data": getattr(args, "training_data", None),
        "eval_dataset": getattr(args, "eval_dataset", getattr(args, "dataset_name", None)),
        "eval_split": getattr(args, "eval_split", getattr(args, "dataset_split", None)),
    }
