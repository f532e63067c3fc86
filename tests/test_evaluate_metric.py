"""The `evaluate` metric module `metrics/audio_captioning` gives exactly the numbers of `lavcap_hf.metrics`.

It is loaded offline from the repository folder, as `evaluate.load` loads a module from the Hub: the file is copied
alone into evaluate's module cache, so it must not need `lavcap_hf`.
"""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

import pytest

from lavcap_hf import metrics as lavcap_metrics

MODULE_DIR = Path(__file__).resolve().parents[1] / "metrics" / "audio_captioning"
PREDICTIONS = [
    "A dog barks while a man talks.",
    "Rain falls on a metal roof",
    "a car engine starts and idles",
    "Birds chirp.",
    "",
]
REFERENCES = [
    ["A dog barks loudly while a man is talking.", "A man talks and a dog barks"],
    ["Heavy rain falls on a roof.", "Rain is falling on a metal roof", "Rain drops hit the roof"],
    [
        "A car engine starts",
        "An engine idles and then revs up loudly",
        "A vehicle engine starts",
        "Car idling",
    ],
    [
        "Birds are chirping far away",
        "Several birds chirp in the distance",
        "Birds sing",
        "Small birds tweet",
        "Chirping birds",
    ],
    ["A crowd cheers", "People applaud and shout"],
]


@pytest.fixture(scope="module")
def audio_captioning(tmp_path_factory):
    """The module loaded by path, offline, into a fresh module cache, with `lavcap_hf` made unimportable."""
    cache = tmp_path_factory.mktemp("hf")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "HF_EVALUATE_OFFLINE": "1",
            "HF_MODULES_CACHE": str(cache / "modules"),
        }.items():
            patch.setenv(name, value)
        import evaluate
        import evaluate.config

        patch.setattr(evaluate.config, "HF_MODULES_CACHE", cache / "modules")
        for name in [name for name in sys.modules if name == "lavcap_hf" or name.startswith("lavcap_hf.")]:
            patch.delitem(sys.modules, name)
        patch.setitem(
            sys.modules, "lavcap_hf", None
        )  # `import lavcap_hf` now fails: the module is on its own
        metric = evaluate.load(str(MODULE_DIR), keep_in_memory=True)
    assert "lavcap_hf" in sys.modules and sys.modules["lavcap_hf"] is not None  # restored
    module = importlib.import_module(type(metric).__module__)
    assert Path(module.__file__).resolve() != (MODULE_DIR / "audio_captioning.py").resolve()  # a cached copy
    return metric


def test_module_file_is_the_package_implementation():
    """One implementation: the module file resolves to `lavcap_hf/metrics.py`."""
    assert (MODULE_DIR / "audio_captioning.py").resolve() == Path(lavcap_metrics.__file__).resolve()
    assert (MODULE_DIR / "README.md").is_file()


def test_info_describes_the_inputs(audio_captioning):
    assert audio_captioning.name == "audio_captioning"
    features = audio_captioning.features
    assert set(features) == {"predictions", "references"}
    assert features["predictions"].dtype == "string"


def test_compute_equals_lavcap_metrics_without_spice(audio_captioning):
    expected = lavcap_metrics.compute_caption_metrics(PREDICTIONS, REFERENCES)
    scores = audio_captioning.compute(predictions=PREDICTIONS, references=REFERENCES)
    assert scores == expected
    assert lavcap_metrics.score_captions(PREDICTIONS, REFERENCES) == expected
    assert scores["num_clips"] == 5 and scores["CIDEr"] > 0
    if scores["unavailable"].get("SPICE"):  # the default here: no Stanford CoreNLP jars
        assert scores["SPICE"] is None and scores["SPIDEr"] is None and "SPIDEr" in scores["unavailable"]
    if shutil.which("java"):
        assert scores["tokenizer"] == "ptb" and isinstance(scores["METEOR"], float)


def test_compute_equals_lavcap_metrics_with_spice_present(audio_captioning, monkeypatch):
    """SPICE "present". MOCKED: SPICE needs Java and the Stanford CoreNLP 3.6.0 jars, which cannot be downloaded
    here, so both implementations get a stand-in `Spice` scorer (a fixed per-corpus score from the tokenised
    inputs) and see no missing jar. What is checked is the plumbing (SPICE and SPIDEr = (CIDEr-D + SPICE) / 2 come
    out of the module exactly as out of `lavcap_hf.metrics`), not SPICE itself."""
    calls = []

    class FakeSpice:
        def compute_score(self, gts, res):
            calls.append((gts, res))
            words = sum(len(text.split()) for texts in res.values() for text in texts)
            return words / 100, [words / 100] * len(res)

    module = sys.modules[type(audio_captioning).__module__]
    for owner in (module, lavcap_metrics):
        scorers = owner._import_scorers()
        scorers["Spice"] = FakeSpice
        monkeypatch.setattr(owner, "_import_scorers", lambda scorers=scorers: scorers)
        monkeypatch.setattr(owner, "_spice_unavailable_reason", lambda spice_cls, java: None)

    expected = lavcap_metrics.compute_caption_metrics(PREDICTIONS, REFERENCES)
    scores = audio_captioning.compute(predictions=PREDICTIONS, references=REFERENCES)
    assert len(calls) == 2 and calls[0] == calls[1]  # both scored the same tokenised corpus
    assert scores == expected
    assert "SPICE" not in scores["unavailable"] and "SPIDEr" not in scores["unavailable"]
    assert scores["SPIDEr"] == pytest.approx((scores["CIDEr"] + scores["SPICE"]) / 2)


def test_module_without_pycocoevalcap_says_what_to_install(audio_captioning, monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)
    with pytest.raises(ImportError, match="pip install pycocoevalcap"):
        audio_captioning.compute(predictions=["a dog barks"], references=[["a dog barks"]])


def test_package_scores_through_the_same_metric_class():
    # `lavcap evaluate` and the Trainer call `score_captions`, which computes through `AudioCaptioning`.
    assert isinstance(lavcap_metrics._caption_metric(), lavcap_metrics.AudioCaptioning)
    assert (
        lavcap_metrics._caption_metric() is lavcap_metrics._caption_metric()
    )  # one instance, one METEOR JVM
