"""Transformers' own common tests for LavCapConfig, CedConfig and LavCapProcessor (ConfigTester,
ProcessorTesterMixin), from the sdist of the installed transformers version (see `transformers_common`)."""

from __future__ import annotations

import shutil
import tempfile
import unittest

import numpy as np
from transformers_common import import_common_tests

from lavcap_hf import CedConfig, LavCapConfig, LavCapProcessor
from lavcap_hf.feature_extraction_lavcap import LavCapFeatureExtractor
from lavcap_hf.testing_utils import tiny_lavcap_config, word_level_tokenizer

common = import_common_tests()
ConfigTester = common.test_configuration_common.ConfigTester
ProcessorTesterMixin = common.test_processing_common.ProcessorTesterMixin

# Words of the mixin's test texts ("lower newer", "upper older longer string"), so that they tokenise to words.
TEST_TEXT_WORDS = ["lower newer upper older longer string"]


def tiny_config(fusion_type: str = "ot_att") -> LavCapConfig:
    return tiny_lavcap_config(fusion_type, vocab_size=len(word_level_tokenizer(TEST_TEXT_WORDS)))


class TinyConfigSource:
    """What `ConfigTester` reads from a test's `model_tester`: a config with non-default values."""

    @staticmethod
    def get_config() -> LavCapConfig:
        return tiny_config()


class LavCapConfigTest(unittest.TestCase):
    model_tester = TinyConfigSource()

    def test_config(self) -> None:
        # Settings other than the defaults; the mixin compares each with its JSON value, so no sub-config dicts.
        tester = ConfigTester(
            self, config_class=LavCapConfig, has_text_modality=False, fusion_type="concat", num_frames=4
        )
        tester.run_common_tests()


class CedConfigTest(unittest.TestCase):
    def test_config(self) -> None:
        tester = ConfigTester(
            self, config_class=CedConfig, has_text_modality=False, hidden_size=32, num_attention_heads=2
        )
        tester.run_common_tests()


class LavCapProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    """The mixin's audio tests give audio without frames: the processor is that of an `audio_only` model (one that
    takes frames as well, `ot_att`, is covered by tests/test_processing.py)."""

    processor_class = LavCapProcessor
    fusion_type = "audio_only"

    @classmethod
    def _setup_tokenizer(cls):
        return word_level_tokenizer(TEST_TEXT_WORDS)

    @classmethod
    def _setup_feature_extractor(cls) -> LavCapFeatureExtractor:
        config = tiny_config(cls.fusion_type)
        return LavCapFeatureExtractor(
            max_length=config.audio_config.target_length,
            feature_size=config.audio_config.num_mel_bins,
            num_frames=config.num_frames,
            image_size=config.vision_config.image_size,
        )

    @classmethod
    def prepare_processor_dict(cls) -> dict:
        audio, video = tiny_config(cls.fusion_type).placeholder_counts
        return {"num_audio_tokens": audio, "num_video_tokens": video}

    @classmethod
    def setUpClass(cls) -> None:
        if hasattr(ProcessorTesterMixin, "_setup_from_components"):  # 5.x saves the processor itself
            super().setUpClass()
            return
        # 4.55's mixin expects the test to save the processor to `tmpdirname`.
        cls.tmpdirname = tempfile.mkdtemp()
        processor = cls.processor_class(
            cls._setup_feature_extractor(), cls._setup_tokenizer(), **cls.prepare_processor_dict()
        )
        processor.save_pretrained(cls.tmpdirname)

    @classmethod
    def tearDownClass(cls) -> None:
        shutil.rmtree(cls.tmpdirname, ignore_errors=True)

    def get_component(self, attribute: str, **kwargs):
        # 4.55's mixin loads the feature extractor as the class named in `feature_extractor_class`, the base class.
        if attribute == "feature_extractor":
            return LavCapFeatureExtractor.from_pretrained(self.tmpdirname, **kwargs)
        return super().get_component(attribute, **kwargs)

    def prepare_videos_inputs(self, batch_size: int | None = None):
        """LAVCap's frames: `num_frames` uint8 RGB frames (frames, height, width, 3) per clip (the mixin's are
        8 channels-first frames)."""
        rng = np.random.default_rng(0)
        video = rng.integers(0, 256, (tiny_config().num_frames, 30, 40, 3), dtype=np.uint8)
        return video if batch_size is None else [video] * batch_size


# Tests of the mixin that do not apply, with the reason. LAVCap's prompt is fixed (the processor builds it from the
# instruction) and `text` is the reference caption; every call featurises the clip.
NOT_APPLICABLE = {
    "test_apply_chat_template_audio": "it tokenises a text-only conversation rendered by the chat template as "
    "`text`; LavCapProcessor's `text` is the caption of a clip, and every call needs the clip",
    "test_apply_chat_template_assistant_mask": "it tokenises text-only conversations as `text` (see "
    "test_apply_chat_template_audio)",
    "test_apply_chat_template_video_frame_sampling": "it downloads a video from the Web for the library's video "
    "loader to sample; LavCapProcessor takes decoded "
    "frames (lavcap_hf.media.load_media) and this suite downloads no data",
    "test_get_num_multimodal_tokens_matches_processor_call": "it counts image tokens; LAVCap takes no images "
    "(tests/test_processing.py checks the audio and video counts against the processor's output)",
}
for _name in dir(LavCapProcessorTest):
    _reason = NOT_APPLICABLE.get(_name) or NOT_APPLICABLE.get(_name.rstrip("0123456789").rstrip("_"))
    # (parameterized leaves the undecorated base of its expanded tests with `__test__ = False`: not a test.)
    if _reason is not None and getattr(getattr(LavCapProcessorTest, _name), "__test__", True):
        setattr(LavCapProcessorTest, _name, unittest.skip(_reason)(getattr(LavCapProcessorTest, _name)))
