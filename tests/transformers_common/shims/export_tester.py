"""Stands in for transformers' `tests/exporters/test_export.py` (imported by 5.x's `test_modeling_common`), which
the sdist does not ship."""


class ExportTesterMixin:
    """Empty: the library's `torch.export` tests are not in the sdist, so none run through this mixin."""
