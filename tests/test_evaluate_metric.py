"""The `evaluate` metric module `metrics/audio_captioning` gives exactly the numbers of `lavcap_hf.evaluation.metrics`.

It is loaded offline from the repository folder, as `evaluate.load` loads a module from the Hub: the file is copied
alone into evaluate's module cache, so it must not need `lavcap_hf`.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from lavcap_hf.evaluation import metrics as lavcap_metrics

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
    """One implementation: the module's files resolve to `lavcap_hf/evaluation/metrics.py` and `lavcap_hf/evaluation/ptb_tokenizer.py`."""
    package = Path(lavcap_metrics.__file__).resolve().parent
    assert (MODULE_DIR / "audio_captioning.py").resolve() == package / "metrics.py"
    assert (MODULE_DIR / "ptb_tokenizer.py").resolve() == package / "ptb_tokenizer.py"
    assert (MODULE_DIR / "README.md").is_file()


def test_info_describes_the_inputs(audio_captioning):
    assert audio_captioning.name == "audio_captioning"
    features = audio_captioning.features
    assert set(features) == {"predictions", "references"}
    assert features["predictions"].dtype == "string"


@pytest.mark.integration
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


STAND_IN_JAVA = """#!{python}
import json, os, sys

arguments = sys.argv[1:]
if "spice-1.0.jar" not in arguments:
    os.execv({java!r}, [{java!r}, *arguments])
with open(arguments[arguments.index("spice-1.0.jar") + 1], encoding="utf-8") as inputs:
    records = json.load(inputs)
with open({log!r}, "a", encoding="utf-8") as log:
    print(json.dumps({{"arguments": arguments, "environment": dict(os.environ), "records": records}}), file=log)
results = []
for record in records:
    words = record["test"].split()
    found = sum(any(word in reference.split() for reference in record["refs"]) for word in words)
    results.append({{"image_id": record["image_id"], "scores": {{"All": {{"f": found / max(len(words), 1)}}}}}})
with open(arguments[arguments.index("-out") + 1], "w", encoding="utf-8") as out:
    json.dump(results, out)
"""


def test_compute_equals_lavcap_metrics_with_spice_present(audio_captioning, monkeypatch, tmp_path):
    """SPICE "present". MOCKED: SPICE needs the Stanford CoreNLP 3.6.0 jars, which cannot be downloaded here, and a
    Java with a JavaScript engine (none since Java 15), so a stand-in `java` first on PATH plays the SPICE jar: it
    reads SPICE's input file and writes, where SPICE writes its output, each clip's share of predicted words found in
    a reference as its F-score; every other `java` command runs the real one. Checked: both implementations give
    SPICE the same tokenised corpus, start it in the fixed English locale although the caller's JVM options say
    German, average its F-scores, and SPIDEr = (CIDEr-D + SPICE) / 2 comes out of the module exactly as out of
    `lavcap_hf.evaluation.metrics`."""
    log, stand_in = tmp_path / "spice-calls.jsonl", tmp_path / "bin" / "java"
    stand_in.parent.mkdir()
    stand_in.write_text(STAND_IN_JAVA.format(python=sys.executable, java=shutil.which("java"), log=str(log)))
    stand_in.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stand_in.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("JAVA_TOOL_OPTIONS", "-Duser.language=de -Duser.country=DE")
    module = sys.modules[type(audio_captioning).__module__]
    for owner in (module, lavcap_metrics):  # the CoreNLP jars are missing here: as if they were present
        monkeypatch.setattr(owner, "_spice_unavailable_reason", lambda spice_cls, java: None)

    expected = lavcap_metrics.compute_caption_metrics(PREDICTIONS, REFERENCES)
    scores = audio_captioning.compute(predictions=PREDICTIONS, references=REFERENCES)
    calls = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    # Both scored the same corpus, tokenised ("A dog barks while a man talks." is the first prediction).
    assert len(calls) == 2 and calls[0]["records"] == calls[1]["records"]
    records = calls[0]["records"]
    assert records[0]["test"] == "a dog barks while a man talks"
    for call in calls:
        assert call["arguments"][:4] == [
            "-Duser.language=en",
            "-Duser.country=US",
            "-Duser.script=",
            "-Duser.variant=",
        ]
        assert "JAVA_TOOL_OPTIONS" not in call["environment"]  # it held nothing but the German locale
    assert scores == expected
    found = [sum(any(w in r.split() for r in x["refs"]) for w in x["test"].split()) for x in records]
    shares = [count / max(len(x["test"].split()), 1) for count, x in zip(found, records, strict=True)]
    assert scores["SPICE"] == pytest.approx(sum(shares) / len(shares))
    assert "SPICE" not in scores["unavailable"] and "SPIDEr" not in scores["unavailable"]
    assert scores["SPIDEr"] == pytest.approx((scores["CIDEr"] + scores["SPICE"]) / 2)


def test_module_without_pycocoevalcap_says_what_to_install(audio_captioning, monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)
    with pytest.raises(ImportError, match="pip install pycocoevalcap"):
        audio_captioning.compute(predictions=["a dog barks"], references=[["a dog barks"]])


def test_package_scores_through_one_cached_metric_that_scores_like_a_fresh_one(monkeypatch):
    """`lavcap evaluate` and the Trainer call `score_captions`: every call computes through the one cached
    `AudioCaptioning` (so one METEOR JVM per process), and the reused instance scores a corpus exactly as a fresh
    one does, with nothing carried over from the corpus before."""
    computed_by = []
    compute = lavcap_metrics.AudioCaptioning._compute

    def spy(self, predictions, references):
        computed_by.append(self)
        return compute(self, predictions, references)

    monkeypatch.setattr(lavcap_metrics.AudioCaptioning, "_compute", spy)
    first = lavcap_metrics.score_captions(PREDICTIONS, REFERENCES)
    second = lavcap_metrics.score_captions(PREDICTIONS[:3], REFERENCES[:3])
    assert len(computed_by) == 2 and computed_by[0] is computed_by[1] is lavcap_metrics._caption_metric()
    assert (first["num_clips"], second["num_clips"]) == (5, 3) and second["CIDEr"] != first["CIDEr"]
    fresh = lavcap_metrics.AudioCaptioning(keep_in_memory=True)
    assert fresh.compute(predictions=PREDICTIONS[:3], references=REFERENCES[:3]) == second
    if shutil.which("java"):
        assert lavcap_metrics._meteor_process.cache_info().currsize == 1
