"""Caption metrics as the COCO caption evaluation computes them (BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE, SPIDEr).

Built on `pycocoevalcap` (the `eval` extra). As in its `COCOEvalCap.evaluate`, references and predictions are
tokenised by the Stanford PTB tokenizer (Java, lower-cased, punctuation tokens removed) and every scorer gets
the tokenised text. Corpus-level BLEU uses the closest reference length; `CIDEr` is the toolkit's CIDEr-D
(clipped TF-IDF n-grams 1..4, Gaussian length penalty sigma 6, x10) with document frequencies taken over the
references of the scored clips, so it depends on the whole set of clips scored together.

Availability is reported, never approximated:
- without `java` on PATH, predictions and references are tokenised by `ptb_tokenize`, the PTB tokenizer's rules
  in Python (the same tokens on every caption of the tests' few hundred; `tokenizer` is then "python-fallback"),
  and BLEU, ROUGE-L and CIDEr-D are computed from them; METEOR, SPICE and SPIDEr are `None`;
- SPICE (and so SPIDEr) needs the Stanford CoreNLP 3.6.0 jars in pycocoevalcap's `spice/lib`. pycocoevalcap
  downloads them when its `Spice` scorer is built; this module never runs it without them.
The reason for each missing metric is in the result's `unavailable` dict.

The METEOR JVM is started on the first call and reused by later ones (its start-up takes 10-30 s). Every JVM runs
in a fixed English locale whatever the caller's (see `_java_command`): the scores do not depend on it.

This file is also the `evaluate` metric module `metrics/audio_captioning/audio_captioning.py` of the repository
(a symbolic link to it, as `ptb_tokenizer.py` there is to `lavcap_hf/evaluation/ptb_tokenizer.py`): `evaluate.load(
"metrics/audio_captioning")` copies the two files alone into its module cache, so they import nothing else from
`lavcap_hf`, and the first `evaluate.Metric` subclass here, `AudioCaptioning`, is the metric. Inside the package,
`score_captions` computes through that same class.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import evaluate

from .ptb_tokenizer import ptb_tokenize

CAPTION_METRICS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE", "SPIDEr")
METRIC_DISPLAY_NAMES = {"BLEU_1": "BLEU-1", "BLEU_2": "BLEU-2", "BLEU_3": "BLEU-3", "BLEU_4": "BLEU-4"}
METRIC_DISPLAY_NAMES.update({"ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr-D"})

PTB_TOKENIZER = "ptb"
FALLBACK_TOKENIZER = "python-fallback"

_INSTALL_HINT = (
    'caption metrics need pycocoevalcap: install the `eval` extra, pip install "lavcap-hf[eval]" '
    "(or, for the `evaluate` module alone, pip install pycocoevalcap)"
)
_SPICE_JAR = "spice-1.0.jar"


_CITATION = """\
@inproceedings{rho2025lavcap,
  title     = {LAVCap: LLM-based Audio-Visual Captioning using Optimal Transport},
  author    = {Rho, Kyeongha and Lee, Hyeongkeun and Iverson, Valentio and Chung, Joon Son},
  booktitle = {IEEE International Conference on Acoustics, Speech and Signal Processing (ICASSP)},
  year      = {2025}
}
@inproceedings{chen2015microsoft,
  title     = {Microsoft COCO Captions: Data Collection and Evaluation Server},
  author    = {Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and Vedantam, Ramakrishna and Gupta, Saurabh and
               Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  journal   = {arXiv preprint arXiv:1504.00325},
  year      = {2015}
}
"""

_DESCRIPTION = """\
Audio captioning metrics as the COCO caption evaluation toolkit (pycocoevalcap) computes them: BLEU-1..4, METEOR,
ROUGE-L, CIDEr-D, SPICE and SPIDEr, on PTB-tokenised text. Corpus-level: CIDEr-D's document frequencies and
BLEU's brevity penalty depend on all clips scored together. A metric that cannot run here (METEOR and SPICE need
Java; SPICE needs the Stanford CoreNLP 3.6.0 jars, which are never downloaded) is None, with its reason in
`unavailable`; nothing is approximated. Without Java, the PTB tokenizer's rules run in Python (`tokenizer` says
which ran).
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions: list of str, one generated caption per clip.
    references: list of list of str, the reference captions of each clip (one or more, e.g. five for AudioCaps).
Returns:
    BLEU_1, BLEU_2, BLEU_3, BLEU_4, METEOR, ROUGE_L, CIDEr (CIDEr-D), SPICE, SPIDEr: float, or None when unavailable;
    unavailable: dict {metric: reason}; num_clips: int; tokenizer: "ptb" (Java) or "python-fallback".
Examples:
    >>> metric = evaluate.load("metrics/audio_captioning")
    >>> scores = metric.compute(predictions=["a dog barks"], references=[["a dog is barking", "a dog barks loudly"]])
    >>> scores["CIDEr"], scores["unavailable"].get("SPICE")
"""


class AudioCaptioning(evaluate.Metric):
    """The caption metrics of `compute_caption_metrics` as an `evaluate` metric (one prediction per clip, a list of
    references per clip). The first `evaluate.Metric` subclass of this file, so the one `evaluate.load` picks."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
            codebase_urls=["https://github.com/salaniz/pycocoevalcap"],
            reference_urls=["https://arxiv.org/abs/1504.00325", "https://arxiv.org/abs/2501.09291"],
        )

    def _compute(self, predictions: list[str], references: list[list[str]]) -> dict[str, Any]:
        return compute_caption_metrics(list(predictions), [list(refs) for refs in references])


@functools.cache
def _caption_metric() -> AudioCaptioning:
    # In memory: nothing is written to the evaluate cache; one instance, so one METEOR JVM per process.
    return AudioCaptioning(keep_in_memory=True)


def score_captions(
    predictions: Sequence[str] | Mapping[Hashable, str],
    references: Sequence[Sequence[str]] | Mapping[Hashable, Sequence[str]],
) -> dict[str, Any]:
    """`compute_caption_metrics` through the `AudioCaptioning` evaluate metric: what `lavcap evaluate`, the
    Trainer's evaluation report, equal to `evaluate.load("metrics/audio_captioning")`.

    Takes the inputs of `compute_caption_metrics` (lists, or dicts keyed by clip id); they are validated first,
    so a bad clip is named in a ValueError, and a dict is scored in its key order (clip ids only label clips).
    """
    _import_scorers()
    ids, hypotheses, reference_lists = _pair_inputs(predictions, references)
    del ids
    return _caption_metric().compute(predictions=hypotheses, references=reference_lists)


def compute_caption_metrics(
    predictions: Sequence[str] | Mapping[Hashable, str],
    references: Sequence[Sequence[str]] | Mapping[Hashable, Sequence[str]],
) -> dict[str, Any]:
    """Score one predicted caption per clip against that clip's reference captions.

    Args:
        predictions: one caption per clip, as a list (clip ids are the positions) or a dict {clip id: caption}.
        references: the clips' reference captions, a list of lists aligned with a list of predictions, or a
            dict with the same clip ids as a dict of predictions.

    Returns:
        A dict with one entry per name in `CAPTION_METRICS` (a float, or `None` when unavailable) and
        `unavailable` ({metric: reason}), `num_clips` (int), `tokenizer` (`"ptb"` or `"python-fallback"`).

    Raises:
        ImportError: pycocoevalcap is not installed.
        ValueError: the inputs do not pair up, a clip has no reference, or a caption is not a string.
    """
    scorers = _import_scorers()
    ids, hypotheses, reference_lists = _pair_inputs(predictions, references)
    # Integer keys: pycocoevalcap sorts and JSON-dumps them (SPICE), which arbitrary user ids may not survive.
    gts = {index: refs for index, refs in enumerate(reference_lists)}
    res = {index: [hypothesis] for index, hypothesis in enumerate(hypotheses)}

    java = shutil.which("java") is not None
    if java:
        tokenizer = scorers["PTBTokenizer"]()
        gts, res = (tokenizer.tokenize(_as_coco_annotations(captions)) for captions in (gts, res))
    else:
        gts, res = _tokenize_without_java(gts), _tokenize_without_java(res)

    scores: dict[str, Any] = dict.fromkeys(CAPTION_METRICS)
    unavailable: dict[str, str] = {}
    bleu, _ = scorers["Bleu"](4).compute_score(gts, res, verbose=0)
    scores.update({f"BLEU_{order}": float(value) for order, value in enumerate(bleu, start=1)})
    scores["ROUGE_L"] = float(scorers["Rouge"]().compute_score(gts, res)[0])
    scores["CIDEr"] = float(scorers["Cider"]().compute_score(gts, res)[0])

    if java:
        scores["METEOR"] = _meteor_score(scorers["Meteor"], gts, res)
    else:
        unavailable["METEOR"] = "METEOR 1.5 runs on Java and no `java` executable is on PATH"

    spice_reason = _spice_unavailable_reason(scorers["Spice"], java)
    if spice_reason is None:
        spice_reason = _spice_score(scorers["Spice"], gts, res, scores)
    if spice_reason is None:
        scores["SPIDEr"] = (scores["CIDEr"] + scores["SPICE"]) / 2
    else:
        unavailable["SPICE"] = spice_reason
        unavailable["SPIDEr"] = "SPIDEr is (CIDEr-D + SPICE) / 2 and SPICE is unavailable (see its reason)"

    scores.update(
        unavailable=unavailable, num_clips=len(ids), tokenizer=PTB_TOKENIZER if java else FALLBACK_TOKENIZER
    )
    return scores


def _import_scorers() -> dict[str, type]:
    """pycocoevalcap's tokenizer and scorer classes, or an ImportError that says how to install them."""
    try:
        import pycocoevalcap  # noqa: F401  (imported first so that a missing package fails here)
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.spice.spice import Spice
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    return {
        "Bleu": Bleu,
        "Cider": Cider,
        "Meteor": Meteor,
        "Rouge": Rouge,
        "Spice": Spice,
        "PTBTokenizer": PTBTokenizer,
    }


def _pair_inputs(
    predictions: Sequence[str] | Mapping[Hashable, str],
    references: Sequence[Sequence[str]] | Mapping[Hashable, Sequence[str]],
) -> tuple[list[Hashable], list[str], list[list[str]]]:
    """Validate and align the inputs: (clip ids, one prediction per clip, the references of each clip)."""
    if isinstance(predictions, Mapping) != isinstance(references, Mapping):
        raise ValueError("predictions and references must both be dicts keyed by clip id or both be lists")
    if isinstance(predictions, Mapping):
        missing = [clip for clip in predictions if clip not in references]
        extra = [clip for clip in references if clip not in predictions]
        if missing or extra:
            raise ValueError(
                f"predictions and references must have the same clip ids: no references for clips {missing[:5]}, "
                f"no prediction for clips {extra[:5]}"
            )
        ids = list(predictions)
        reference_lists = [references[clip] for clip in ids]
    else:
        if len(predictions) != len(references):
            raise ValueError(
                f"got {len(predictions)} predictions but {len(references)} reference lists; "
                "there must be one list of references per prediction"
            )
        ids = list(range(len(predictions)))
        reference_lists = list(references)
    if not ids:
        raise ValueError("no clips to score: predictions and references are empty")

    hypotheses = []
    for clip, prediction, refs in zip(ids, (predictions[clip] for clip in ids), reference_lists, strict=True):
        if not isinstance(prediction, str):
            raise ValueError(
                f"prediction for clip {clip!r} must be a string, got {type(prediction).__name__}"
            )
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise ValueError(
                f"references for clip {clip!r} must be a list of strings, got {type(refs).__name__}"
            )
        if not refs:
            raise ValueError(f"clip {clip!r} has no reference captions")
        for position, ref in enumerate(refs):
            if not isinstance(ref, str) or not ref.strip():
                raise ValueError(
                    f"reference {position} of clip {clip!r} must be a non-blank string, got {ref!r}"
                )
        hypotheses.append(prediction)
    # Whitespace runs become one space: Java's tokenizer treats e.g. U+2028 as a line break, which would shift
    # every later caption onto the wrong clip; the tokenisers split on whitespace anyway.
    return (
        ids,
        [" ".join(text.split()) for text in hypotheses],
        [[" ".join(r.split()) for r in refs] for refs in reference_lists],
    )


def _as_coco_annotations(captions: dict[int, list[str]]) -> dict[int, list[dict[str, str]]]:
    """{clip: [caption, ...]} -> the {clip: [{"caption": caption}, ...]} layout PTBTokenizer.tokenize reads."""
    return {clip: [{"caption": text} for text in texts] for clip, texts in captions.items()}


def _tokenize_without_java(captions: dict[int, list[str]]) -> dict[int, list[str]]:
    """`PTBTokenizer().tokenize` without Java: the same tokens from `ptb_tokenize`, given the captions in the same
    order (all of them in one text, as the jar reads them)."""
    tokens = iter(ptb_tokenize([text for texts in captions.values() for text in texts]))
    return {clip: [next(tokens) for _ in texts] for clip, texts in captions.items()}


# Java takes its default locale from the environment (LANG, LC_ALL, LC_CTYPE, LC_MESSAGES: where the OS has that
# locale; LC_NUMERIC plays no part) and from -Duser.* options in JAVA_TOOL_OPTIONS, JDK_JAVA_OPTIONS and
# _JAVA_OPTIONS (the last one overriding the command line). METEOR 1.5 writes its statistics in that locale and reads
# them back as Java numbers, so under a decimal-comma locale (de_DE, fr_FR) it answered nothing. Every JVM started
# here runs in the locale Java takes on a C-locale machine, whatever the caller's environment, which stays as it is.
# (pycocoevalcap's PTB tokenizer reads and writes UTF-8 and lower-cases in English under any locale: it runs as is.)
_JAVA_LOCALE_OPTIONS = ("-Duser.language=en", "-Duser.country=US", "-Duser.script=", "-Duser.variant=")
_JAVA_OPTIONS_VARIABLES = ("JAVA_TOOL_OPTIONS", "JDK_JAVA_OPTIONS", "_JAVA_OPTIONS")
_JAVA_LOCALE_PROPERTY = re.compile(
    r"""(?:^|(?<=\s))["']?-Duser\.(?:language|country|region|script|variant)(?:\.(?:format|display))?=\S*"""
)


def _java_command(arguments: Sequence[str]) -> list[str]:
    """`java` in the fixed locale, then `arguments` (JVM options, then the jar and its arguments)."""
    return ["java", *_JAVA_LOCALE_OPTIONS, *arguments]


def _java_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """`environ` (default: this process's) for a JVM started by `_java_command`: the locale properties removed from
    the JVM option variables, where they would override or outlast the command line's; every other option (heap,
    proxy, trust store) kept."""
    environment = dict(os.environ if environ is None else environ)
    for name in _JAVA_OPTIONS_VARIABLES:
        if name in environment:
            options = " ".join(_JAVA_LOCALE_PROPERTY.sub(" ", environment[name]).split())
            if options:
                environment[name] = options
            else:
                del environment[name]
    return environment


def _meteor_score(meteor_cls: type, gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    """Corpus METEOR 1.5 from pycocoevalcap's scorer, on a JVM kept for later calls (see `_meteor_process`)."""
    meteor = _meteor_process(meteor_cls)
    try:
        return float(meteor.compute_score(gts, res)[0])
    except ValueError as error:  # an answer that is no number: the JVM failed
        _meteor_process.cache_clear()
        _stop_meteor(meteor)
        said = meteor.meteor_p.stderr.read().decode("utf-8", "replace").strip().splitlines()
        raise RuntimeError(
            f"METEOR 1.5 (Java) gave no score ({error}); it said: {' | '.join(said[-5:])}"
        ) from error
    except BaseException:
        _meteor_process.cache_clear()
        _stop_meteor(meteor)
        raise


@functools.cache
def _meteor_process(meteor_cls: type) -> Any:
    """The METEOR JVM, started on first use and kept until exit: loading its paraphrase table takes 10-30 s,
    which repeated evaluations (one per Trainer evaluation) would otherwise pay each time. It holds ~1.2 GB.

    The scorer is pycocoevalcap's, with its JVM started here as its `__init__` would, but in the fixed locale of
    `_java_command` (its own inherits the caller's, in which METEOR may fail).
    """
    meteor = meteor_cls.__new__(meteor_cls)
    jar = sys.modules[meteor_cls.__module__].METEOR_JAR
    meteor.meteor_cmd = _java_command(["-jar", "-Xmx2G", jar, "-", "-", "-stdio", "-l", "en", "-norm"])
    meteor.meteor_p = subprocess.Popen(
        meteor.meteor_cmd,
        cwd=Path(inspect.getfile(meteor_cls)).parent,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_java_environment(),
    )
    meteor.lock = threading.Lock()
    atexit.register(_stop_meteor, meteor)
    return meteor


def _stop_meteor(meteor: Any) -> None:
    """Stop the JVM. After an error `Meteor.compute_score` leaves its lock held, on which `Meteor.__del__`
    would wait forever, so release it first."""
    if meteor.lock.locked():
        meteor.lock.release()
    meteor.meteor_p.stdin.close()
    meteor.meteor_p.kill()
    meteor.meteor_p.wait()


def _spice_unavailable_reason(spice_cls: type, java: bool) -> str | None:
    """Why SPICE cannot run here, or None when Java and every jar on SPICE's class path are present."""
    spice_dir = Path(inspect.getfile(spice_cls)).parent
    reasons = [] if java else ["SPICE runs on Java and no `java` executable is on PATH"]
    missing = missing_spice_files(spice_dir)
    if missing:
        reasons.append(
            f"SPICE needs Stanford CoreNLP 3.6.0 and {spice_dir} lacks {', '.join(missing)}; "
            "pycocoevalcap would download them, this package never does: put stanford-corenlp-3.6.0.jar and "
            "stanford-corenlp-3.6.0-models.jar (from stanford-corenlp-full-2015-12-09.zip) in spice/lib"
        )
    return "; ".join(reasons) or None


def missing_spice_files(spice_dir: Path) -> list[str]:
    """Files SPICE needs that are absent from `spice_dir`: `spice-1.0.jar` and its manifest's Class-Path.

    pycocoevalcap ships all of them except `lib/stanford-corenlp-3.6.0.jar` and
    `lib/stanford-corenlp-3.6.0-models.jar`. `Spice()` downloads CoreNLP when the first of these is absent, so
    an empty list here is also what guarantees that building the scorer downloads nothing.
    """
    jar = spice_dir / _SPICE_JAR
    if not jar.is_file():
        return [_SPICE_JAR]
    with zipfile.ZipFile(jar) as archive:
        manifest = archive.read("META-INF/MANIFEST.MF").decode("utf-8")
    # Manifest lines are folded at 72 bytes; a continuation line starts with one space.
    lines = re.sub(r"\r?\n ", "", manifest).splitlines()
    class_path = next((line.split(":", 1)[1].split() for line in lines if line.startswith("Class-Path:")), [])
    return [name for name in class_path if not (spice_dir / name).is_file()]


def _spice_score(
    spice_cls: type, gts: dict[int, list[str]], res: dict[int, list[str]], scores: dict[str, Any]
) -> str | None:
    """Put corpus SPICE into `scores`; return why it failed instead when the Java scorer exits with an error.

    Runs SPICE 1.0 as pycocoevalcap's `Spice.compute_score` does (same jar, options and cache, the mean of each
    clip's F-score), but in the fixed locale of `_java_command` and with its files in a temporary folder.
    """
    import numpy as np

    spice_dir = Path(inspect.getfile(spice_cls)).parent
    clips = sorted(gts)
    records = [{"image_id": clip, "test": res[clip][0], "refs": gts[clip]} for clip in clips]
    with tempfile.TemporaryDirectory(prefix="lavcap-spice-") as scratch:
        inputs, outputs = Path(scratch) / "input.json", Path(scratch) / "output.json"
        inputs.write_text(json.dumps(records), encoding="utf-8")
        options = [
            str(inputs),
            "-cache",
            str(spice_dir / "cache"),
            "-out",
            str(outputs),
            "-subset",
            "-silent",
        ]
        run = subprocess.run(
            _java_command(["-jar", "-Xmx8G", _SPICE_JAR, *options]),
            cwd=spice_dir,
            env=_java_environment(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        if run.returncode != 0 or not outputs.is_file():
            said = run.stderr.decode("utf-8", "replace").strip().splitlines()
            return (
                f"the SPICE scorer failed (java exit status {run.returncode}; it asks for an 8 GB heap and writes "
                f"its output with Java's JavaScript engine, which Java 15 and later lack): {' | '.join(said[-3:])}"
            )
        results = json.loads(outputs.read_text(encoding="utf-8"))
    scores["SPICE"] = float(np.mean([_as_float(item["scores"]["All"]["f"]) for item in results]))
    return None


def _as_float(value: Any) -> float:
    """SPICE's F-score as pycocoevalcap reads it: NaN where it is not a number (a clip without tuples)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def format_metrics_table(
    scores: Mapping[str, Any], columns: Sequence[tuple[str, Mapping[str, Any]]] | None = None
) -> str:
    """The markdown table of caption metrics, the one every report uses (`lavcap evaluate`, the model card).

    Args:
        scores: the output of `compute_caption_metrics`; the reasons for unavailable metrics and the clip count are
            listed below the table.
        columns: (title, {metric: value}) per value column, in order; default: one `Score` column of `scores`.
            Rows are the metrics of the first column.

    Returns:
        One row per metric, four decimals, `n/a` where a value is None.
    """
    columns = columns if columns is not None else [("Score", scores)]
    names = [name for name in CAPTION_METRICS if name in columns[0][1]]
    if not names:
        raise ValueError(
            f"no caption metric among the keys {sorted(columns[0][1])}; expected some of {CAPTION_METRICS}"
        )
    header = ["Metric", *(title for title, _ in columns)]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * len(columns)]
    for name in names:
        cells = [
            METRIC_DISPLAY_NAMES.get(name, name),
            *(_format_score(values[name]) for _, values in columns),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        f"- {METRIC_DISPLAY_NAMES.get(name, name)} n/a: {reason}"
        for name, reason in scores.get("unavailable", {}).items()
    ]
    if "num_clips" in scores:
        notes.append(f"- {scores['num_clips']} clips scored, tokenizer: {scores.get('tokenizer', 'unknown')}")
    return "\n".join(lines + ([""] + notes if notes else []))


def _format_score(value: float | None) -> str:
    """Four decimals (a rounded -0 shown as 0), `n/a` for None."""
    if value is None:
        return "n/a"
    text = f"{value:.4f}"
    return "0.0000" if text == "-0.0000" else text
