"""Stands in for transformers' `tests/utils/test_configuration_utils.py`, which the sdist does not ship.

`ConfigTester.check_config_arguments_init` builds a config from `config_common_kwargs` and checks that every value
comes back; it checks the dtype entry against `torch.float16` under the name each release uses.
"""

from lavcap_hf.model._compat import dtype_kwarg

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    dtype_kwarg(): "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["LavCapForConditionalGeneration"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}
"""`PretrainedConfig` arguments every config takes, each set to a value other than its default."""
