"""Caption metrics: pycocoevalcap scores checked against the metric definitions, computed here independently."""

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.request
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pycocoevalcap.spice.spice
import pytest

from lavcap_hf.evaluation import metrics as lavcap_metrics
from lavcap_hf.evaluation.metrics import (
    CAPTION_METRICS,
    compute_caption_metrics,
    format_metrics_table,
    missing_spice_files,
)

# No function of a package the stacks pin differently runs here (held to it, tests/conftest.py): one stack is enough.
pytestmark = pytest.mark.stack_independent

needs_java = pytest.mark.skipif(
    shutil.which("java") is None, reason="the PTB tokenizer and METEOR 1.5 run on a Java runtime"
)
SPICE_DIR = Path(pycocoevalcap.spice.spice.__file__).parent

# Captions are written already tokenised (lower case, no punctuation); `_raw` dresses them up as a captioner
# would write them, so the PTB step must undo that for the definitions below to agree with the scores.
SMALL_PREDICTIONS = {
    "dog": "a dog barks while a man talks",
    "rain": "rain falls on a metal roof",
    "car": "a car engine starts and idles",
    "birds": "birds chirp",
}
SMALL_REFERENCES = {
    "dog": ["a dog barks loudly while a man is talking", "a man talks and a dog barks"],
    "rain": ["heavy rain falls on a roof", "rain is falling on a metal roof", "rain drops hit the roof"],
    "car": ["a car engine starts", "an engine idles and then revs up loudly"],
    "birds": ["birds are chirping far away", "several birds chirp in the distance"],
}
IDENTICAL_REFERENCES = {
    "siren": ["a siren wails as a truck passes by", "an emergency siren sounds loudly"],
    "crowd": ["a crowd cheers and claps at a stadium", "people applaud and shout"],
    "water": ["water flows from a tap into a sink", "a faucet runs into a basin"],
    "piano": ["someone plays a slow melody on a piano", "soft piano music is playing"],
}
IDENTICAL_PREDICTIONS = {clip: refs[0] for clip, refs in IDENTICAL_REFERENCES.items()}
DISJOINT_PREDICTIONS = {clip: "xylophone zebra quantum violet" for clip in IDENTICAL_REFERENCES}


def _raw(caption):
    return caption.capitalize() + "."


def _raw_corpus(predictions, references):
    return {c: _raw(p) for c, p in predictions.items()}, {
        c: [_raw(r) for r in refs] for c, refs in references.items()
    }


def _ngrams(tokens, n):
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def reference_bleu(predictions, references, max_n):
    """Corpus BLEU: clipped n-gram precisions pooled over clips, brevity penalty against the summed lengths of
    the reference closest in length to each prediction (the shorter one on a tie)."""
    matched, total = [0] * max_n, [0] * max_n
    hyp_length = ref_length = 0
    for clip, prediction in predictions.items():
        hyp = prediction.split()
        refs = [ref.split() for ref in references[clip]]
        hyp_length += len(hyp)
        ref_length += min((len(ref) for ref in refs), key=lambda length: (abs(length - len(hyp)), length))
        for n in range(1, max_n + 1):
            max_ref_counts = Counter()
            for ref in refs:
                max_ref_counts |= _ngrams(ref, n)
            matched[n - 1] += sum(min(count, max_ref_counts[g]) for g, count in _ngrams(hyp, n).items())
            total[n - 1] += max(len(hyp) - n + 1, 0)
    precision = math.exp(sum(math.log(matched[k] / total[k]) for k in range(max_n)) / max_n)
    return precision * min(1.0, math.exp(1 - ref_length / hyp_length))


def reference_rouge_l(predictions, references, beta=1.2):
    """Mean over clips of the LCS F-measure, from the best precision and best recall over the references."""

    def lcs(a, b):
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
        return table[-1][-1]

    scores = []
    for clip, prediction in predictions.items():
        hyp = prediction.split()
        refs = [ref.split() for ref in references[clip]]
        precision = max(lcs(hyp, ref) / len(hyp) for ref in refs)
        recall = max(lcs(hyp, ref) / len(ref) for ref in refs)
        scores.append(
            (1 + beta**2) * precision * recall / (recall + beta**2 * precision) if precision * recall else 0.0
        )
    return float(np.mean(scores))


def reference_cider_d(predictions, references, sigma=6.0):
    """CIDEr-D: per n in 1..4, TF-IDF vectors with document frequency counted over each clip's reference set,
    clipped cosine sum_g min(h_g, r_g) r_g / (|h| |r|), Gaussian length penalty, mean over n and references,
    x10, mean over clips. (The toolkit measures length in bigrams; their difference equals the difference in
    words for non-empty captions, as here.)"""
    num_clips = len(predictions)
    document_frequency = Counter()
    for refs in references.values():
        document_frequency.update({g for ref in refs for n in range(1, 5) for g in _ngrams(ref.split(), n)})

    def tfidf(tokens, n):
        idf = {g: math.log(num_clips) - math.log(max(1.0, document_frequency[g])) for g in _ngrams(tokens, n)}
        return {g: count * idf[g] for g, count in _ngrams(tokens, n).items()}

    def clipped_cosine(hyp, ref):
        dot = sum(min(weight, ref.get(g, 0.0)) * ref.get(g, 0.0) for g, weight in hyp.items())
        norms = math.sqrt(sum(w * w for w in hyp.values())) * math.sqrt(sum(w * w for w in ref.values()))
        return dot / norms if norms else 0.0

    scores = []
    for clip, prediction in predictions.items():
        hyp = prediction.split()
        per_reference = []
        for ref in (r.split() for r in references[clip]):
            penalty = math.exp(-((len(hyp) - len(ref)) ** 2) / (2 * sigma**2))
            per_reference.append(
                np.mean([clipped_cosine(tfidf(hyp, n), tfidf(ref, n)) * penalty for n in range(1, 5)])
            )
        scores.append(10.0 * np.mean(per_reference))
    return float(np.mean(scores))


def _assert_matches_definitions(scores, predictions, references):
    for n in range(1, 5):
        assert scores[f"BLEU_{n}"] == pytest.approx(reference_bleu(predictions, references, n), abs=1e-6)
    assert scores["ROUGE_L"] == pytest.approx(reference_rouge_l(predictions, references), abs=1e-6)
    assert scores["CIDEr"] == pytest.approx(reference_cider_d(predictions, references), abs=1e-6)


@pytest.fixture(scope="module")
def java_results():
    """The three corpora scored with Java, while any Python network use or SPICE model download fails."""
    download_attempts = []

    def refuse(*args, **kwargs):
        download_attempts.append(args)
        raise AssertionError("caption metrics must not touch the network")

    with pytest.MonkeyPatch.context() as patch:
        for owner, name in [
            (socket.socket, "connect"),
            (socket, "create_connection"),
            (urllib.request, "urlopen"),
            (urllib.request, "urlretrieve"),
            (sys.modules["pycocoevalcap.spice.get_stanford_models"], "urlretrieve"),
            (pycocoevalcap.spice.spice, "get_stanford_models"),
        ]:
            patch.setattr(owner, name, refuse)
        results = {
            "small": compute_caption_metrics(*_raw_corpus(SMALL_PREDICTIONS, SMALL_REFERENCES)),
            "identical": compute_caption_metrics(*_raw_corpus(IDENTICAL_PREDICTIONS, IDENTICAL_REFERENCES)),
            "disjoint": compute_caption_metrics(*_raw_corpus(DISJOINT_PREDICTIONS, IDENTICAL_REFERENCES)),
        }
    return results, download_attempts


@needs_java
def test_small_case_matches_the_definitions(java_results):
    scores = java_results[0]["small"]
    assert scores["tokenizer"] == "ptb" and scores["num_clips"] == 4
    _assert_matches_definitions(scores, SMALL_PREDICTIONS, SMALL_REFERENCES)
    assert 0.0 < scores["METEOR"] < 1.0


@needs_java
def test_identical_captions_score_the_maximum(java_results):
    results = java_results[0]
    scores = results["identical"]
    for name in ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L"):
        assert scores[name] == pytest.approx(1.0, abs=1e-6), name
    # METEOR 1.5 drops its fragmentation penalty when every word of hypothesis and reference is matched in a
    # single chunk (MeteorScorer.computeMetrics), so an identical caption scores its F-mean, exactly 1.
    assert scores["METEOR"] >= 1.0 - 1e-9
    # CIDEr-D is not bounded by 10 here (each clip also has a reference the prediction does not repeat), so
    # check it against the definition and against the other cases.
    assert scores["CIDEr"] == pytest.approx(
        reference_cider_d(IDENTICAL_PREDICTIONS, IDENTICAL_REFERENCES), abs=1e-6
    )
    assert scores["CIDEr"] > results["small"]["CIDEr"] > results["disjoint"]["CIDEr"]


@needs_java
def test_disjoint_captions_score_zero(java_results):
    scores = java_results[0]["disjoint"]
    for name in ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert scores[name] == pytest.approx(0.0, abs=1e-9), name


@needs_java
def test_spice_is_reported_unavailable_without_corenlp_and_nothing_is_downloaded(java_results):
    results, download_attempts = java_results
    assert download_attempts == []
    missing = missing_spice_files(SPICE_DIR)
    for scores in results.values():
        if missing:
            assert scores["SPICE"] is None and scores["SPIDEr"] is None
            assert "stanford-corenlp-3.6.0" in scores["unavailable"]["SPICE"]
            assert "SPICE" in scores["unavailable"]["SPIDEr"]
        else:  # CoreNLP installed by hand: SPICE runs and SPIDEr is its mean with CIDEr-D
            assert scores["SPIDEr"] == pytest.approx((scores["CIDEr"] + scores["SPICE"]) / 2)
        assert "METEOR" not in scores["unavailable"]


def test_missing_spice_files_follows_the_jar_class_path(tmp_path):
    assert missing_spice_files(tmp_path) == ["spice-1.0.jar"]
    manifest = (
        "Manifest-Version: 1.0\r\nClass-Path: lib/stanford-corenlp-3.6.0.jar lib/ejml-0.23.jar lib/stanford-c\r\n"
        " orenlp-3.6.0-models.jar\r\nMain-Class: edu.anu.spice.SpiceScorer\r\n"
    )
    with zipfile.ZipFile(tmp_path / "spice-1.0.jar", "w") as jar:
        jar.writestr("META-INF/MANIFEST.MF", manifest)
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "ejml-0.23.jar").touch()
    assert missing_spice_files(tmp_path) == [
        "lib/stanford-corenlp-3.6.0.jar",
        "lib/stanford-corenlp-3.6.0-models.jar",
    ]
    (tmp_path / "lib" / "stanford-corenlp-3.6.0.jar").touch()
    (tmp_path / "lib" / "stanford-corenlp-3.6.0-models.jar").touch()
    assert missing_spice_files(tmp_path) == []


def test_without_java_the_python_metrics_still_work(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no java executable anywhere on PATH
    scores = compute_caption_metrics(*_raw_corpus(SMALL_PREDICTIONS, SMALL_REFERENCES))
    assert scores["tokenizer"] == "python-fallback"
    _assert_matches_definitions(scores, SMALL_PREDICTIONS, SMALL_REFERENCES)
    for name in ("METEOR", "SPICE", "SPIDEr"):
        assert scores[name] is None
    assert "`java`" in scores["unavailable"]["METEOR"] and "`java`" in scores["unavailable"]["SPICE"]
    assert "SPICE is unavailable" in scores["unavailable"]["SPIDEr"]


# Captions where the PTB tokenizer splits or keeps what a simple tokenizer would not (cannot -> can not, gonna ->
# gon na; ol', '90s and C++ kept whole): the scores without Java must still be Java's.
TRICKY_PREDICTIONS = [
    "I cannot hear the old man, he's gonna leave.",
    "Rock 'n' roll from the '90s plays on ol' radios",
    "Someone wanna type C++ code at 5 p.m. in the U.S.",
    "A 50-year-old engine idles; it can't start -- twice!",
]
TRICKY_REFERENCES = [
    ["I cannot hear him, the man's gonna leave", "A man is gonna leave and I cannot hear"],
    ["Rock 'n' roll of the '90s plays on the radio", "ol' radios play rock 'n' roll"],
    ["A person wanna write C++ at 5 p.m.", "C++ code is typed in the U.S. at 5 p.m."],
    ["An engine idles and can't start", "The 50-year-old engine won't start, it idles"],
]


@needs_java
def test_without_java_the_scores_are_javas(monkeypatch, tmp_path):
    """The Python tokenizer gives the jar's tokens, so BLEU, ROUGE-L and CIDEr-D do not depend on Java."""
    with_java = compute_caption_metrics(TRICKY_PREDICTIONS, TRICKY_REFERENCES)
    monkeypatch.setenv("PATH", str(tmp_path))  # no java executable anywhere on PATH
    without_java = compute_caption_metrics(TRICKY_PREDICTIONS, TRICKY_REFERENCES)
    assert (with_java["tokenizer"], without_java["tokenizer"]) == ("ptb", "python-fallback")
    for name in ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L", "CIDEr"):
        assert without_java[name] == with_java[name], name


# ------------------------------------------------------------------------------------ scores under any locale

LOCALE_VARIABLES = ("LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "LC_NUMERIC", "LC_MESSAGES", "LOCPATH")
JVM_OPTION_VARIABLES = ("JAVA_TOOL_OPTIONS", "JDK_JAVA_OPTIONS", "_JAVA_OPTIONS")
ENGLISH = {"user.language": "en", "user.country": "US"}


@pytest.fixture(scope="module")
def os_locales(tmp_path_factory):
    """A LOCPATH folder holding de_DE.UTF-8, fr_FR.UTF-8 and tr_TR.UTF-8 compiled by glibc's localedef (from the
    sources of Debian's `locales` package), or None where they are missing. Java reads LANG and LC_* only where the
    OS has that locale, and falls back to en_US otherwise: a German user's machine has it, this one need not."""
    localedef, folder = shutil.which("localedef"), tmp_path_factory.mktemp("locales")
    for name in ("de_DE", "fr_FR", "tr_TR"):
        if localedef is not None:
            command = [localedef, "-i", name, "-f", "UTF-8", str(folder / f"{name}.UTF-8")]
            subprocess.run(command, capture_output=True)
        if not (folder / f"{name}.UTF-8").is_dir():
            return None
    return str(folder)


def environment_with(settings, os_locales):
    """This process's environment without its locale and JVM option settings, then `settings` (and LOCPATH)."""
    skipped = LOCALE_VARIABLES + JVM_OPTION_VARIABLES
    environment = {name: value for name, value in os.environ.items() if name not in skipped}
    if os_locales is not None:
        environment["LOCPATH"] = os_locales
    return {**environment, **settings}


def java_locale(command, environment):
    """The user.* properties of a JVM started by `command` (with -XshowSettings added) in `environment`."""
    shown = subprocess.run(
        [*command, "-XshowSettings:properties", "-version"],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    return dict(re.findall(r"^\s+(user\.(?:language|country|script|variant)(?:\.\w+)?) = (.*)$", shown, re.M))


@pytest.mark.integration
@needs_java
@pytest.mark.parametrize(
    "settings",
    [
        {"LANG": "de_DE.UTF-8"},
        {"LC_ALL": "fr_FR.UTF-8"},
        {"LANG": "C.UTF-8", "LC_CTYPE": "tr_TR.UTF-8"},  # Java formats numbers in LC_CTYPE's locale
        {"LC_MESSAGES": "de_DE.UTF-8"},
        {"JAVA_TOOL_OPTIONS": "-Xss2m -Duser.language=de -Duser.country=DE"},
        {"JDK_JAVA_OPTIONS": "-Duser.language=fr -Duser.country=FR"},
        {
            "_JAVA_OPTIONS": "-Duser.language=de -Duser.country=DE -Duser.language.format=de -Duser.country.format=DE"
        },
    ],
    ids=[
        "LANG",
        "LC_ALL",
        "LC_CTYPE",
        "LC_MESSAGES",
        "JAVA_TOOL_OPTIONS",
        "JDK_JAVA_OPTIONS",
        "_JAVA_OPTIONS",
    ],
)
def test_the_scorers_jvms_run_in_english_whatever_locale_the_caller_has(settings, os_locales):
    environment = environment_with(settings, os_locales)
    plain = java_locale(["java"], environment)
    if os_locales is None and plain == ENGLISH:
        pytest.skip(
            "this OS has no de_DE, fr_FR or tr_TR locale (no localedef or locale sources), so Java ignores it"
        )
    assert plain != ENGLISH  # the setting moves a JVM started without the scorers' options
    java_environment = lavcap_metrics._java_environment(environment)
    pinned = java_locale(lavcap_metrics._java_command([]), java_environment)
    assert pinned == {**ENGLISH, "user.script": "", "user.variant": ""}
    if "JAVA_TOOL_OPTIONS" in settings:  # the caller's other JVM options stay
        assert java_environment["JAVA_TOOL_OPTIONS"] == "-Xss2m"


SCORE_IN_A_PROCESS = """
import json, sys
from lavcap_hf.evaluation.metrics import compute_caption_metrics
with open(sys.argv[1], encoding="utf-8") as inputs:
    predictions, references = json.load(inputs)
print(json.dumps(compute_caption_metrics(predictions, references)))
"""


@needs_java
@pytest.mark.integration
def test_scores_of_a_german_user_equal_those_of_the_c_locale(os_locales, tmp_path):
    """Scored in two fresh processes, one in the C locale and one as a German user: LANG=de_DE.UTF-8 (with the OS
    locale where localedef could build it) and JVM options saying German too, so that Java runs in German even where
    it could not. METEOR used to give no score there; every score must be the C locale's."""
    predictions = [*TRICKY_PREDICTIONS, "Ein Hund bellt, während ein Mann in İstanbul spricht…"]
    references = [
        *TRICKY_REFERENCES,
        ["Ein Hund bellt laut", "Ein Mann spricht und ein Hund bellt in İstanbul"],
    ]
    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps([predictions, references]), encoding="utf-8")
    german = {
        "LANG": "de_DE.UTF-8",
        "LANGUAGE": "de_DE:de",
        "JAVA_TOOL_OPTIONS": "-Duser.language=de -Duser.country=DE",
    }
    runs = {
        name: subprocess.Popen(
            [sys.executable, "-c", SCORE_IN_A_PROCESS, str(corpus)],
            env=environment_with(settings, os_locales),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, settings in {"C": {"LANG": "C", "LC_ALL": "C"}, "de_DE": german}.items()
    }
    scores = {}
    for name, run in runs.items():
        out, err = run.communicate(timeout=900)
        assert run.returncode == 0, f"scoring in the {name} locale failed:\n{err[-3000:]}"
        scores[name] = json.loads(out.strip().splitlines()[-1])
    assert isinstance(scores["C"]["METEOR"], float) and scores["C"]["tokenizer"] == "ptb"
    assert scores["de_DE"] == scores["C"]


@pytest.mark.parametrize(
    ("predictions", "references", "message"),
    [
        (["a dog barks"], [["a dog"], ["a cat"]], "1 predictions but 2 reference lists"),
        ({"a": "x", "b": "y"}, {"a": ["x"], "c": ["y"]}, r"no references for clips \['b'\]"),
        ({"a": "x"}, [["x"]], "both be dicts"),
        ({"a": "x", "b": 3}, {"a": ["x"], "b": ["y"]}, "clip 'b' must be a string, got int"),
        ({"a": "x", "b": "y"}, {"a": ["x"], "b": []}, "clip 'b' has no reference captions"),
        ({"a": "x", "b": "y"}, {"a": ["x"], "b": "y"}, "references for clip 'b' must be a list"),
        ({"a": "x", "b": "y"}, {"a": ["x"], "b": ["y", "  "]}, "reference 1 of clip 'b'"),
        ([], [], "no clips"),
    ],
)
def test_invalid_inputs_raise_value_error_naming_the_clip(predictions, references, message):
    with pytest.raises(ValueError, match=message):
        compute_caption_metrics(predictions, references)


def test_missing_pycocoevalcap_asks_for_the_eval_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)
    with pytest.raises(ImportError, match=r"lavcap-hf\[eval\]"):
        compute_caption_metrics(["a dog barks"], [["a dog barks"]])


def test_format_metrics_table_marks_unavailable_metrics():
    scores = dict.fromkeys(CAPTION_METRICS, 0.25)
    scores.update(SPICE=None, SPIDEr=None, unavailable={"SPICE": "no CoreNLP", "SPIDEr": "needs SPICE"})
    scores.update(num_clips=7, tokenizer="ptb", CIDEr=0.123456)
    table = format_metrics_table(scores)
    lines = table.splitlines()
    assert lines[:2] == ["| Metric | Score |", "| --- | ---: |"]
    assert (
        lines[2] == "| BLEU-1 | 0.2500 |" and "| CIDEr-D | 0.1235 |" in lines and "| SPICE | n/a |" in lines
    )
    assert len([line for line in lines[2:] if line.startswith("|")]) == len(CAPTION_METRICS)
    assert "- SPICE n/a: no CoreNLP" in lines and "- 7 clips scored, tokenizer: ptb" in lines
    assert format_metrics_table({"BLEU_4": 0.5}).splitlines()[-1] == "| BLEU-4 | 0.5000 |"
    with pytest.raises(ValueError, match="no caption metric"):
        format_metrics_table({"loss": 1.0})


def test_format_metrics_table_with_value_columns():
    """The one score table also carries `lavcap evaluate`'s condition and drop columns, rows from the first column."""
    full = {"BLEU_4": 0.5, "CIDEr": None, "num_clips": 3, "tokenizer": "ptb", "unavailable": {}}
    condition = {"BLEU_4": 0.5, "CIDEr": None}
    drop = {"BLEU_4": 0.5 - 0.50000001, "CIDEr": None}
    lines = format_metrics_table(
        full, [("Full", full), ("No visual", condition), ("drop", drop)]
    ).splitlines()
    assert lines[:2] == ["| Metric | Full | No visual | drop |", "| --- | ---: | ---: | ---: |"]
    assert lines[2:4] == ["| BLEU-4 | 0.5000 | 0.5000 | 0.0000 |", "| CIDEr-D | n/a | n/a | n/a |"]
    assert lines[-1] == "- 3 clips scored, tokenizer: ptb"
