"""Transformers' own common tests for LavCapConfig, CedConfig and LavCapProcessor (ConfigTester,
ProcessorTesterMixin), from the sdist of the installed transformers version (see `transformers_common`).

The processor tests run on the paper's model (`ot_att`, audio and frames) with no skip of this harness but the three
in `NOT_APPLICABLE` below (each with its reason). The mixin skips others itself, by what the processor has: the
image- and video-processor cases (LAVCap has no image processor, and its frames are prepared by the feature
extractor, with Pillow, rather than by a torchvision-based video processor), the cases that need librosa or
torchcodec to load media from files or URLs, tools in the chat template (LAVCap's has none), and
`text_replacement_offsets` (a vLLM helper; its audio case puts two clips in one prompt, where LAVCap captions one).
"""

from __future__ import annotations

import shutil
import tempfile
import unittest

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers_common import import_common_tests

from lavcap_hf import CedConfig, LavCapConfig, LavCapForConditionalGeneration, LavCapProcessor
from lavcap_hf.convert.components import build_from_components
from lavcap_hf.model.feature_extraction_lavcap import LavCapFeatureExtractor
from lavcap_hf.model.processing_lavcap import AUDIO_TOKEN, VIDEO_TOKEN, add_lavcap_special_tokens
from lavcap_hf.testing.configs import tiny_lavcap_config
from lavcap_hf.testing.tokenizers import word_level_tokenizer

common = import_common_tests()
ConfigTester = common.test_configuration_common.ConfigTester
ProcessorTesterMixin = common.test_processing_common.ProcessorTesterMixin

# Words of the mixin's test texts ("lower newer", "upper older longer string"), so that they tokenise to words.
TEST_TEXT_WORDS = ["lower newer upper older longer string"]


def tiny_config(fusion_type: str = "ot_att") -> LavCapConfig:
    # 8 frames per clip: the frame count of the mixin's videos.
    return tiny_lavcap_config(
        fusion_type, vocab_size=len(word_level_tokenizer(TEST_TEXT_WORDS)), num_frames=8
    )


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

    def test_config_without_arguments_is_the_papers_usable_model(self) -> None:
        """`LavCapConfig()` is the paper's model as `lavcap convert` builds it from LLaMA-2: the placeholder ids that
        `add_lavcap_special_tokens` gives on LLaMA-2's 32,000-token tokenizer, in a vocabulary with room for them."""
        config = LavCapConfig()
        tokenizer = llama2_sized_tokenizer()
        audio_id, video_id = add_lavcap_special_tokens(tokenizer)
        self.assertEqual((config.audio_token_id, config.video_token_id), (audio_id, video_id))
        self.assertEqual(config.text_config.pad_token_id, tokenizer.pad_token_id)
        self.assertEqual(config.text_config.vocab_size, len(tokenizer))
        # `lavcap convert`'s build from a LLaMA-2-sized decoder gives the same ids and vocabulary.
        decoder = LlamaForCausalLM(
            LlamaConfig(vocab_size=32000, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1)
        )  # fmt: skip
        tiny_audio = CedConfig(target_length=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
        converted, _ = build_from_components(
            None, None, decoder, llama2_sized_tokenizer(), audio_config=tiny_audio, visual_embed_dim=32
        )
        for name in ("audio_token_id", "video_token_id"):
            self.assertEqual(getattr(converted.config, name), getattr(config, name))
        for name in ("vocab_size", "pad_token_id"):
            self.assertEqual(getattr(converted.config.text_config, name), getattr(config.text_config, name))
        # The model it describes holds an embedding row for every id, and its processor writes those ids.
        with torch.device("meta"):
            model = LavCapForConditionalGeneration(config)
        rows = model.get_input_embeddings().num_embeddings
        self.assertGreater(
            rows, max(config.audio_token_id, config.video_token_id, config.text_config.pad_token_id)
        )
        processor = LavCapProcessor.from_model_config(config, tokenizer)
        self.assertEqual((processor.audio_token_id, processor.video_token_id), (audio_id, video_id))
        self.assertEqual((processor.num_audio_tokens, processor.num_video_tokens), (64, 20))
        self.assertEqual(LavCapConfig.from_dict(config.to_dict()).audio_token_id, audio_id)


def llama2_sized_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer laid out as LLaMA-2's: 32,000 tokens, `<unk>` 0, `<s>` 1, `</s>` 2, no pad token."""
    vocab = {
        token: i for i, token in enumerate(["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(3, 32000))])
    }
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


class CedConfigTest(unittest.TestCase):
    def test_config(self) -> None:
        tester = ConfigTester(
            self, config_class=CedConfig, has_text_modality=False, hidden_size=32, num_attention_heads=2
        )
        tester.run_common_tests()


class LavCapProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    """The processor of the paper's model (`ot_att`: audio and frames), on the mixin's own inputs: its audio, its
    channels-first videos, and prompts holding the placeholders."""

    processor_class = LavCapProcessor
    fusion_type = "ot_att"
    audio_token = AUDIO_TOKEN
    video_token = VIDEO_TOKEN

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

    def prepare_text_inputs(self, *args, **kwargs):
        """The mixin's prompts with the placeholders in the order of the model's prompt, audio before video (5.x's
        mixin writes video first; the processor refuses that order, as the model fills audio placeholders first)."""
        if isinstance(kwargs.get("modalities"), (list, tuple)):
            kwargs["modalities"] = sorted(
                kwargs["modalities"], key=lambda modality: modality.startswith("video")
            )
        return super().prepare_text_inputs(*args, **kwargs)


# Tests of the mixin that do not apply, with the reason.
NOT_APPLICABLE = {
    "test_apply_chat_template_audio": "it downloads two audio files from the Hub (and needs librosa); "
    "tests/test_processing.py::test_apply_chat_template_builds_inputs_that_generate_takes runs the same "
    "chat-template path, audio and video entries, on synthesised clips",
    "test_apply_chat_template_video_frame_sampling": "it downloads a video from the Web for the library's video "
    "loader to sample; LavCapProcessor takes decoded frames (lavcap_hf.model.media_decoding.load_media samples them) and this "
    "suite downloads no data",
    "test_get_num_multimodal_tokens_matches_processor_call": "it counts image tokens with the folder's image "
    "processor; LAVCap has none (tests/test_processing.py checks the audio and video counts against the "
    "processor's output)",
}
for _name in dir(LavCapProcessorTest):
    _reason = NOT_APPLICABLE.get(_name) or NOT_APPLICABLE.get(_name.rstrip("0123456789").rstrip("_"))
    # (parameterized leaves the undecorated base of its expanded tests with `__test__ = False`: not a test.)
    if _reason is not None and getattr(getattr(LavCapProcessorTest, _name), "__test__", True):
        setattr(LavCapProcessorTest, _name, unittest.skip(_reason)(getattr(LavCapProcessorTest, _name)))
