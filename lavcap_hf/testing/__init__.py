"""Tiny configurations and an offline tokenizer for tests, the demo and benchmarks."""

from .configs import paper_sized_config, small_lavcap_config, tiny_lavcap_config
from .tokenizers import word_level_tokenizer

__all__ = ["paper_sized_config", "small_lavcap_config", "tiny_lavcap_config", "word_level_tokenizer"]
