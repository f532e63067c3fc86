"""Opt-in download of the Stanford CoreNLP 3.6.0 jars that SPICE (and so SPIDEr) needs.

pycocoevalcap ships SPICE without CoreNLP and downloads it (about 390 MB) the first time its scorer is built;
`lavcap_hf.evaluation.metrics` never builds it without the jars, so nothing is fetched behind a user's back. This module is
the one explicit way: `lavcap fetch-corenlp`, or `fetch_corenlp()`, on a machine with internet; elsewhere copy the
two jars from the zip into the folder `spice_lib_dir()` names.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

CORENLP_URL = "https://nlp.stanford.edu/software/stanford-corenlp-full-2015-12-09.zip"
"""The CoreNLP release SPICE 1.0 was built against."""

CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
"""The jars on SPICE's class path that pycocoevalcap does not ship."""


def spice_lib_dir() -> Path:
    """pycocoevalcap's `spice/lib` folder, where SPICE looks for its class path."""
    try:
        from pycocoevalcap import spice
    except ImportError as error:
        raise ImportError("SPICE comes with pycocoevalcap: pip install 'lavcap-hf[eval]'") from error
    return Path(spice.__file__).parent / "lib"


def missing_corenlp_jars(lib_dir: Path) -> list[str]:
    return [name for name in CORENLP_JARS if not (lib_dir / name).is_file()]


def fetch_corenlp(lib_dir: str | os.PathLike | None = None, url: str = CORENLP_URL) -> list[Path]:
    """Download the CoreNLP zip from `url` and put its two jars into `lib_dir` (default: `spice_lib_dir()`).

    Nothing is fetched when both jars are there already. A jar appears complete or not at all (extracted to a
    temporary name, then renamed). Returns the jars' paths; a RuntimeError names the address and the folder when
    the download or the archive fails.
    """
    lib = Path(lib_dir) if lib_dir is not None else spice_lib_dir()
    missing = missing_corenlp_jars(lib)
    if missing:
        lib.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib) as scratch:
            archive = Path(scratch) / "corenlp.zip"
            _download(url, archive, lib)
            _extract_jars(archive, missing, lib, url)
    return [lib / name for name in CORENLP_JARS]


def _download(url: str, target: Path, lib: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
    except (urllib.error.URLError, OSError) as error:
        raise RuntimeError(
            f"could not download Stanford CoreNLP from {url} ({error}); SPICE and SPIDEr stay unavailable. "
            f"Without internet here, get that zip elsewhere and copy {' and '.join(CORENLP_JARS)} from it into {lib}"
        ) from error


def _extract_jars(archive: Path, names: list[str], lib: Path, url: str) -> None:
    """Copy the archive members whose file names are `names` (at any depth) into `lib`."""
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = {Path(member).name: member for member in bundle.namelist()}
            absent = [name for name in names if name not in members]
            if absent:
                raise RuntimeError(
                    f"{url} holds no {', '.join(absent)}: not the CoreNLP 3.6.0 release SPICE needs"
                )
            for name in names:
                partial = lib / f".{name}.partial"
                with bundle.open(members[name]) as source, open(partial, "wb") as out:
                    shutil.copyfileobj(source, out, length=1 << 20)
                partial.replace(lib / name)
    except zipfile.BadZipFile as error:
        raise RuntimeError(f"{url} is not a zip archive ({error}); nothing was written to {lib}") from error


def run_fetch_corenlp(lib_dir: str | None, url: str | None = None) -> int:
    """`lavcap fetch-corenlp`: 0 with the jars in place, 1 with the reason on stderr."""
    import sys

    try:
        jars = fetch_corenlp(lib_dir, url=url or CORENLP_URL)
    except (RuntimeError, ImportError) as error:
        print(f"lavcap fetch-corenlp: {error}", file=sys.stderr)
        return 1
    print("SPICE can run: " + ", ".join(str(jar) for jar in jars))
    return 0
