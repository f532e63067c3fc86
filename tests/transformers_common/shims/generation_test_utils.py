"""Stands in for transformers' `tests/generation/test_utils.py`, which the sdist does not ship."""


class GenerationTesterMixin:
    """Empty: the library's generation tests are not in the sdist, so none run through this mixin.

    `test_modeling_common` checks that the tester of a model that can `generate` inherits this class; inheriting it
    here only satisfies that check. Generation behaviour is covered by this project's own tests.
    """
