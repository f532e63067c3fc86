"""The opt-in CoreNLP download for SPICE: jars placed from the release zip, nothing fetched when present, and a
failure that names the address and the folder. The zip is built here and served from a file: URL (no network)."""

from __future__ import annotations

import zipfile

import pytest

from lavcap_cli import main
from lavcap_hf.evaluation.corenlp import CORENLP_JARS, fetch_corenlp, missing_corenlp_jars

# No function of a package the stacks pin differently runs here (held to it, tests/conftest.py): one stack is enough.
pytestmark = pytest.mark.stack_independent


def release_zip(tmp_path, names=CORENLP_JARS):
    path = tmp_path / "stanford-corenlp-full-2015-12-09.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("stanford-corenlp-full-2015-12-09/README.txt", "not a jar")
        for name in names:
            archive.writestr(f"stanford-corenlp-full-2015-12-09/{name}", f"contents of {name}")
    return path


def test_fetch_places_both_jars_and_then_fetches_nothing(tmp_path) -> None:
    lib = tmp_path / "spice" / "lib"
    url = release_zip(tmp_path).as_uri()
    jars = fetch_corenlp(lib, url=url)
    assert [jar.name for jar in jars] == list(CORENLP_JARS)
    assert all(jar.read_text() == f"contents of {jar.name}" for jar in jars)
    assert missing_corenlp_jars(lib) == []
    assert sorted(p.name for p in lib.iterdir()) == sorted(CORENLP_JARS)  # no partial or scratch files left
    # Present already: the address is not read again (here it no longer exists).
    (tmp_path / "stanford-corenlp-full-2015-12-09.zip").unlink()
    assert fetch_corenlp(lib, url=url) == jars


def test_an_unreachable_address_names_itself_and_the_folder(tmp_path) -> None:
    lib = tmp_path / "lib"
    url = "http://127.0.0.1:9/stanford-corenlp.zip"  # the discard port: the connection is refused at once
    with pytest.raises(RuntimeError) as raised:
        fetch_corenlp(lib, url=url)
    message = str(raised.value)
    assert url in message and str(lib) in message and CORENLP_JARS[1] in message
    assert missing_corenlp_jars(lib) == list(CORENLP_JARS)


def test_an_archive_without_the_jars_writes_nothing(tmp_path) -> None:
    lib = tmp_path / "lib"
    url = release_zip(tmp_path, names=CORENLP_JARS[:1]).as_uri()
    with pytest.raises(RuntimeError, match="holds no stanford-corenlp-3.6.0-models.jar"):
        fetch_corenlp(lib, url=url)
    bad = tmp_path / "bad.zip"
    bad.write_text("not a zip")
    with pytest.raises(RuntimeError, match="not a zip archive"):
        fetch_corenlp(lib, url=bad.as_uri())
    assert not any(p.suffix == ".partial" for p in lib.glob(".*"))


def test_the_command_reports_success_and_failure(tmp_path, capsys) -> None:
    lib = tmp_path / "lib"
    assert main(["fetch-corenlp", "--lib-dir", str(lib), "--url", "http://127.0.0.1:9/corenlp.zip"]) == 1
    assert "127.0.0.1:9" in capsys.readouterr().err
    assert main(["fetch-corenlp", "--lib-dir", str(lib), "--url", release_zip(tmp_path).as_uri()]) == 0
    assert "SPICE can run" in capsys.readouterr().out
    assert missing_corenlp_jars(lib) == []
