"""Model card and Hub upload, offline: a fake HfApi records what would be uploaded.

`ModelCard.validate()` posts the card to the Hub, so the metadata is checked locally instead: the card is parsed
back with `huggingface_hub` and its `model-index` converted back into `EvalResult`s.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from transformers.pipelines import PIPELINE_REGISTRY

from lavcap_cli import add_push_arguments
from lavcap_hf import LavCapForConditionalGeneration, LavCapProcessor
from lavcap_hf.hub.model_card import (
    FUSION_DESCRIPTIONS,
    NOT_STATED_DATASET,
    PIPELINE_TASK,
    load_eval_results,
    render_model_card,
)
from lavcap_hf.hub.push import push_model_to_hub, run_push
from lavcap_hf.testing.configs import tiny_lavcap_config
from lavcap_hf.testing.tokenizers import word_level_tokenizer

REPO = "someone/lavcap-audiocaps"
SCORES = {
    "BLEU_1": 0.7123,
    "BLEU_2": 0.5541,
    "BLEU_3": 0.41,
    "BLEU_4": 0.3,
    "METEOR": 0.2468,
    "ROUGE_L": 0.5012,
    "CIDEr": 0.78912,
    "SPICE": None,
    "SPIDEr": None,
    "unavailable": {"SPICE": "Stanford CoreNLP jars are missing", "SPIDEr": "SPICE is unavailable"},
    "num_clips": 957,
    "tokenizer": "ptb",
}
AUTO_MAP = {
    "AutoConfig": "configuration_lavcap.LavCapConfig",
    "AutoModel": "modeling_lavcap.LavCapForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_lavcap.LavCapForConditionalGeneration",
}


class FakeHfApi:
    """Records `create_repo` and, at upload time, the staged files and what config.json / README.md say."""

    def __init__(self) -> None:
        self.created: dict = {}
        self.uploaded: dict = {}

    def create_repo(self, repo_id: str, **kwargs):
        self.created = {"repo_id": repo_id, **kwargs}
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id: str, folder_path: str, **kwargs):
        folder = Path(folder_path)
        self.uploaded = {
            "repo_id": repo_id,
            "files": sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()),
            "config": json.loads((folder / "config.json").read_text()),
            "readme": (folder / "README.md").read_text(),
            **kwargs,
        }
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")


@pytest.fixture(scope="module")
def model() -> LavCapForConditionalGeneration:
    torch.manual_seed(0)
    return LavCapForConditionalGeneration(tiny_lavcap_config())


@pytest.fixture
def no_pipeline(monkeypatch):
    monkeypatch.delitem(PIPELINE_REGISTRY.supported_tasks, PIPELINE_TASK, raising=False)


def saved_files(saver, tmp_path: Path, name: str) -> set[str]:
    """The files `saver.save_pretrained` writes by itself."""
    folder = tmp_path / name
    saver.save_pretrained(folder)
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def metrics_rows(card_text: str) -> dict[str, str]:
    return dict(re.findall(r"^\| ([\w-]+) \| ([\w./]+) \|$", card_text, flags=re.MULTILINE))


def test_card_has_the_metrics_table_and_a_model_index_that_parses_back(model) -> None:
    card = render_model_card(
        model,
        REPO,
        SCORES,
        base_models=["mispeech/ced-base"],
        license="llama2",
        training_data="AudioCaps train (49k clips, one caption each).",
        eval_dataset="AudioCaps",
        eval_split="test",
    )
    text = str(card)
    assert "AudioCaps train (49k clips, one caption each)." in text and "on AudioCaps (test split)" in text
    rows = metrics_rows(text)
    assert rows["BLEU-1"] == "0.7123" and rows["CIDEr-D"] == "0.7891" and rows["ROUGE-L"] == "0.5012"
    assert rows["SPICE"] == "n/a" and rows["SPIDEr"] == "n/a"
    assert "Stanford CoreNLP jars are missing" in text
    assert f'pipeline("audio-visual-captioning", model="{REPO}", trust_remote_code=True)' in text
    assert "arXiv" in text and "2501.09291" in text and "Rho, Kyeongha" in text
    assert "`ot_att`" in text and "## Limitations" in text and "## Intended use" in text

    parsed = ModelCard(text)
    assert parsed.data.license == "llama2" and parsed.data.library_name == "transformers"
    assert parsed.data.base_model == ["mispeech/ced-base"]
    name, results = model_index_to_eval_results(parsed.data.to_dict()["model-index"])
    assert name == "lavcap-audiocaps"
    available = {k: v for k, v in SCORES.items() if isinstance(v, float)}
    assert {r.metric_name: r.metric_value for r in results} == available
    assert {(r.task_type, r.dataset_name, r.dataset_split) for r in results} == {
        (PIPELINE_TASK, "AudioCaps", "test")
    }


def push_parser() -> argparse.ArgumentParser:
    """The `lavcap push-to-hub` parser, model card arguments included."""
    parser = argparse.ArgumentParser()
    add_push_arguments(parser)
    return parser


def test_card_states_no_dataset_that_nobody_stated(model) -> None:
    """A model trained on synthesised scenes (the demo) and pushed without saying so is not called AudioCaps."""
    text = str(render_model_card(model, REPO, SCORES))
    assert "AudioCaps" not in text
    assert "Not stated: the uploader did not say what data this model was trained on." in text
    assert "Caption metrics on an evaluation set that the uploader did not state" in text
    name, results = model_index_to_eval_results(ModelCard(text).data.to_dict()["model-index"])
    assert {(r.dataset_name, r.dataset_type, r.dataset_split) for r in results} == {
        (NOT_STATED_DATASET, NOT_STATED_DATASET, None)
    }
    assert {r.metric_name: r.metric_value for r in results}["CIDEr"] == SCORES["CIDEr"]


def test_card_uses_what_the_model_recorded_unless_stated_otherwise(model) -> None:
    config = tiny_lavcap_config()
    config.training_data = "Synthesised sound scenes from `lavcap demo`."
    config.eval_dataset = "lavcap demo held-out scenes"
    text = str(render_model_card(config, REPO, SCORES))
    assert "Synthesised sound scenes from `lavcap demo`." in text and "AudioCaps" not in text
    assert "Caption metrics on lavcap demo held-out scenes," in text
    stated = str(render_model_card(config, REPO, SCORES, eval_dataset="Clotho", eval_split="evaluation"))
    assert "Caption metrics on Clotho (evaluation split)" in stated


@pytest.mark.parametrize("stated", [False, True])
def test_push_command_card_names_only_the_stated_datasets(model, tmp_path, monkeypatch, stated) -> None:
    folder = tmp_path / "demo-model"
    model.save_pretrained(folder)
    results = tmp_path / "results.json"
    results.write_text(json.dumps(SCORES))
    api = FakeHfApi()
    monkeypatch.setattr("lavcap_hf.hub.push.HfApi", lambda token=None: api)
    argv = [str(folder), REPO, "--eval-results", str(results)]
    if stated:
        argv += ["--training-data", "Synthesised scenes (lavcap demo)", "--eval-dataset", "demo scenes"]
        argv += ["--eval-split", "held-out"]
    run_push(push_parser().parse_args(argv))
    readme = api.uploaded["readme"]
    _, results = model_index_to_eval_results(ModelCard(readme).data.to_dict()["model-index"])
    assert "AudioCaps" not in readme
    if stated:
        assert "Synthesised scenes (lavcap demo)" in readme and "on demo scenes (held-out split)" in readme
        assert {(r.dataset_name, r.dataset_split) for r in results} == {("demo scenes", "held-out")}
    else:
        assert "Not stated" in readme and "did not state" in readme
        assert {r.dataset_name for r in results} == {NOT_STATED_DATASET}


def test_card_without_results_says_so(model) -> None:
    text = str(render_model_card(model.config))
    assert "No evaluation results were supplied" in text and "model-index" not in text
    assert 'model="path/to/lavcap"' in text


@pytest.mark.parametrize(
    ("fusion_type", "words", "tokens"),
    [
        ("concat", "visual tokens twice", "8 audio + 8 visual tokens"),  # 8 audio tokens, 4 frames fed twice
        ("ot_cross_attention", "optimal-transport", "8 audio + 0 visual tokens"),
        ("plain_cross_attention", "not a row of the paper", "8 audio + 0 visual tokens"),
    ],
)
def test_card_describes_the_fusion_type_and_its_tokens(fusion_type: str, words: str, tokens: str) -> None:
    text = " ".join(str(render_model_card(tiny_lavcap_config(fusion_type))).split())
    assert f"{FUSION_DESCRIPTIONS[fusion_type]}; {tokens} go to the language model" in text
    assert words in FUSION_DESCRIPTIONS[fusion_type]


def test_bad_evaluation_results_are_value_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="no caption metric"):
        load_eval_results({"accuracy": 0.5})
    with pytest.raises(ValueError, match="CIDEr must be a number or null"):
        load_eval_results({"CIDEr": "high"})
    broken = tmp_path / "results.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="could not read evaluation results .*results.json"):
        load_eval_results(broken)
    with pytest.raises(ValueError, match="expected a LAVCap model"):
        render_model_card(tiny_lavcap_config().text_config)


def test_push_uploads_weights_code_processor_pipeline_and_card(model, tmp_path) -> None:
    processor = LavCapProcessor.from_model_config(model.config, word_level_tokenizer(["a dog barks"]))
    pipeline_class = PIPELINE_REGISTRY.supported_tasks[PIPELINE_TASK]["impl"]  # registered by the package
    api = FakeHfApi()
    commit = push_model_to_hub(model, REPO, processor=processor, eval_results=SCORES, private=True, api=api)

    assert (
        api.created["repo_id"] == REPO and api.created["private"] is True and api.created["exist_ok"] is True
    )
    assert commit.commit_url.startswith(f"https://huggingface.co/{REPO}")
    expected = (
        saved_files(model, tmp_path, "model") | saved_files(processor, tmp_path, "processor") | {"README.md"}
    )
    assert set(api.uploaded["files"]) == expected
    code = {"modeling_lavcap.py", "configuration_lavcap.py", "modeling_ced.py", "optimal_transport.py"}
    code |= {"processing_lavcap.py", f"{pipeline_class.__module__.split('.')[-1]}.py"}
    assert {"model.safetensors", "config.json", "tokenizer.json", *code} <= expected
    config = api.uploaded["config"]
    assert {k: config["auto_map"][k] for k in AUTO_MAP} == AUTO_MAP
    pipeline_entry = config["custom_pipelines"][PIPELINE_TASK]
    assert pipeline_entry["impl"] == f"{pipeline_class.__module__.split('.')[-1]}.{pipeline_class.__name__}"
    assert pipeline_entry["pt"] == ["AutoModel"]
    assert metrics_rows(api.uploaded["readme"])["METEOR"] == "0.2468"


def test_push_without_a_registered_pipeline_has_no_custom_pipelines(no_pipeline, tmp_path) -> None:
    model = LavCapForConditionalGeneration(tiny_lavcap_config())
    api = FakeHfApi()
    push_model_to_hub(model, REPO, api=api)
    assert set(api.uploaded["files"]) == saved_files(model, tmp_path, "model") | {"README.md"}
    assert "custom_pipelines" not in api.uploaded["config"]
    assert {k: api.uploaded["config"]["auto_map"][k] for k in AUTO_MAP} == AUTO_MAP
    assert api.created["private"] is False


def test_push_command_loads_the_folder_and_uploads_it(model, tmp_path, monkeypatch) -> None:
    folder = tmp_path / "converted"
    model.save_pretrained(folder)
    processor = LavCapProcessor.from_model_config(model.config, word_level_tokenizer(["a dog barks"]))
    processor.save_pretrained(folder)
    results = tmp_path / "results.json"
    results.write_text(json.dumps(SCORES))
    api = FakeHfApi()
    monkeypatch.setattr("lavcap_hf.hub.push.HfApi", lambda token=None: api)
    args = push_parser().parse_args(
        [str(folder), REPO, "--eval-results", str(results), "--base-model", "a/b"]
    )
    run_push(args)

    expected = saved_files(model, tmp_path, "model") | saved_files(processor, tmp_path, "processor")
    assert set(api.uploaded["files"]) == expected | {"README.md"}
    card = ModelCard(api.uploaded["readme"])
    assert card.data.base_model == ["a/b"]
    assert metrics_rows(api.uploaded["readme"])["CIDEr-D"] == "0.7891"
