"""Writes lavcap_cli/choices.py, the choices the torch-free `lavcap` parsers offer, from their one definition in
lavcap_hf (which imports torch, so the parsers cannot import it). Run after changing a fusion type, a manifest
column or a quantization choice: `python scripts/write_cli_choices.py`; tests/test_cli.py fails while the file is stale."""

from __future__ import annotations

import sys
from pathlib import Path

CHOICES_FILE = Path(__file__).resolve().parents[1] / "lavcap_cli" / "choices.py"


def choices_source() -> str:
    """The text of lavcap_cli/choices.py for the installed lavcap_hf."""
    from lavcap_hf.data.clips import DEFAULT_COLUMNS
    from lavcap_hf.model.configuration_lavcap import FUSION_TYPES
    from lavcap_hf.quantization import QUANTIZE_CHOICES

    fusion_types = "".join(f"    {name!r},\n" for name in FUSION_TYPES)
    columns = "".join(f"    {role!r}: {column!r},\n" for role, column in DEFAULT_COLUMNS.items())
    return (
        '"""Choices of the `lavcap` parsers, written by scripts/write_cli_choices.py from lavcap_hf: do not edit."""\n'
        "\n"
        f"FUSION_TYPES = (\n{fusion_types})\n"
        '"""`lavcap_hf.model.configuration_lavcap.FUSION_TYPES`."""\n'
        "\n"
        f"DEFAULT_COLUMNS = {{\n{columns}}}\n"
        '"""`lavcap_hf.data.clips.DEFAULT_COLUMNS`: manifest columns of each role."""\n'
        "\n"
        f"QUANTIZE_CHOICES = {QUANTIZE_CHOICES!r}\n"
        '"""`lavcap_hf.quantization.QUANTIZE_CHOICES`: the values of `--quantize`."""\n'
    ).replace("'", '"')


if __name__ == "__main__":
    CHOICES_FILE.write_text(choices_source(), encoding="utf-8")
    sys.exit(0)
