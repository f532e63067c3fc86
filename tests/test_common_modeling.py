"""Transformers' own common model tests (`ModelTesterMixin`, from the transformers sdist matching the installed
release) run on a tiny LAVCap. Generation is covered by tests/test_generation_contract.py and
tests/test_modeling_lavcap.py: the library's generation tests are not in its sdist."""

from __future__ import annotations

import copy
import unittest
from unittest import mock

import torch
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES
from transformers_common import import_common_tests

from lavcap_hf import LavCapConfig, LavCapForConditionalGeneration, LavCapModel
from lavcap_hf.testing.configs import tiny_lavcap_config

common = import_common_tests()
ModelTesterMixin = common.test_modeling_common.ModelTesterMixin
GenerationTesterMixin = common.generation_tester_mixin
FIRST_TEXT_ID = 5
"""Ids below are pad, bos, eos and the audio and video placeholders."""
PAD_ID = 0


class LavCapModelTester:
    """Tiny configs and inputs in the shape the common tests ask for: `prepare_config_and_inputs_for_common()`
    returns the config and a batch of prompts (text, then the placeholders) with their media."""

    # 7 clips: the attention-implementation tests pad every input to a batch of 7 with random rows otherwise,
    # rows without placeholders or media.
    def __init__(self, parent: unittest.TestCase, batch_size: int = 7, text_length: int = 7) -> None:
        self.parent = parent
        self.batch_size = batch_size
        self.is_training = True
        config = self.get_config()
        self.text_config = config.text_config
        self.vision_config = config.vision_config
        self.audio_config = config.audio_config
        self.num_hidden_layers = self.text_config.num_hidden_layers
        self.num_attention_heads = self.text_config.num_attention_heads
        self.hidden_size = self.text_config.hidden_size
        self.vocab_size = self.text_config.vocab_size
        self.text_length = text_length
        self.seq_length = text_length + sum(config.placeholder_counts)

    def get_config(self) -> LavCapConfig:
        # Placeholders on low ids: the embedding-resizing tests clamp the ids to a smaller vocabulary.
        return tiny_lavcap_config(audio_token_id=3, video_token_id=4)

    def prepare_config_and_inputs_for_common(self) -> tuple[LavCapConfig, dict[str, torch.Tensor]]:
        config = self.get_config()
        generator = torch.Generator().manual_seed(0)
        audio, video = config.placeholder_counts
        # Text tokens avoid the special ids (pad 0, bos 1, eos 2) and the placeholders (3 and 4).
        text = torch.randint(
            FIRST_TEXT_ID,
            config.text_config.vocab_size,
            (self.batch_size, self.text_length),
            generator=generator,
        )
        placeholders = torch.tensor([config.audio_token_id] * audio + [config.video_token_id] * video)
        input_ids = torch.cat([text[:, :1], placeholders.expand(self.batch_size, -1), text[:, 1:]], dim=1)
        # Prompts of different lengths, left-padded as a batch of them is: row i starts with i % 3 pad tokens.
        attention_mask = torch.ones_like(input_ids)
        for row in range(self.batch_size):
            padding = row % 3
            input_ids[row] = torch.cat(
                [torch.full((padding,), PAD_ID), input_ids[row, : input_ids.shape[1] - padding]]
            )
            attention_mask[row, :padding] = 0
        image_size = config.vision_config.image_size
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "input_features": torch.randn(
                self.batch_size,
                config.audio_config.target_length,
                config.audio_config.num_mel_bins,
                generator=generator,
            ),
            "pixel_values_videos": torch.randn(
                self.batch_size, config.num_frames, 3, image_size, image_size, generator=generator
            ),
        }
        return config, inputs


class LavCapModelCommonTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (LavCapModel, LavCapForConditionalGeneration)
    additional_model_inputs = ["input_features", "pixel_values_videos"]
    _is_composite = True
    # The library runs its missing-weight initialisation test only on models whose files carry a copyright year
    # of 2023 or later; this package's files carry none, and the test is wanted (CLIP's own init of a missing tower).
    test_can_init_all_missing_weights_before_2023 = True
    # 4.55's common tests also prune and mask attention heads (both removed from the library in 5.x); LAVCap's
    # encoders and decoder support neither, as the library's own LLaMA and CLIP do not.
    test_pruning = False
    test_head_masking = False

    def setUp(self) -> None:
        self.model_tester = LavCapModelTester(self)
        self.config = copy.deepcopy(self.model_tester.get_config())
        # The common tests tell a base model (no head, no loss) and a causal LM (labels for the loss) by their
        # names in the library's own tables, where a model outside the library is not listed: list LAVCap's there
        # (as `import lavcap_hf` registers them with AutoModel and AutoModelForCausalLM).
        patches = [
            mock.patch.dict(MODEL_MAPPING_NAMES, {"lavcap": "LavCapModel"}),
            mock.patch.dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, {"lavcap": "LavCapForConditionalGeneration"}),
        ]
        for patch in patches:
            patch.start()
            self.addCleanup(patch.stop)

    def test_reverse_loading_mapping(self) -> None:
        # The renames from the older layout name the generation class's keys (`language_model.model.*`,
        # `language_model.lm_head.*`); the base model loads such folders through `base_model_prefix`, as llava's.
        if not hasattr(ModelTesterMixin, "test_reverse_loading_mapping"):
            self.skipTest(
                "this release's common tests have no conversion mappings (4.x renames keys on load only)"
            )
        super().test_reverse_loading_mapping(skip_base_model=True)

    def test_initialization(self) -> None:
        """The library's check (4.55's common tests have it): with every init std set to zero, each trainable
        tensor is 0 or 1 (the mean of its central 95 %), except the OT logit scale, which starts at its configured
        value whatever the std (the library's CLIP test makes the same exception for CLIP's), and the projector,
        which starts as PyTorch's nn.Linear whatever the std, as released (tests/test_modeling_lavcap.py checks
        its distribution)."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        zero_init = common.test_modeling_common._config_zero_init(config)
        for model_class in self.all_model_classes:
            model = model_class(copy.deepcopy(zero_init))
            for name, param in model.named_parameters():
                if not param.requires_grad:
                    continue
                if name.endswith("logit_scale"):
                    self.assertAlmostEqual(param.item(), zero_init.logit_scale_init, places=5, msg=name)
                    continue
                if "multi_modal_projector." in name:
                    bound = 1 / param.shape[-1] ** 0.5 if param.ndim == 2 else None
                    self.assertTrue(param.std() > 0, msg=f"{name} of {model_class.__name__} is constant")
                    if bound is not None:
                        self.assertLessEqual(param.abs().max().item(), bound, msg=name)
                    continue
                values = torch.sort(param.data.flatten()).values
                cut = int(values.numel() * 0.025)
                central = values[cut : values.numel() - cut] if cut else values
                mean = ((central.mean() * 1e9).round() / 1e9).item()
                self.assertIn(mean, [0.0, 1.0], msg=f"{name} of {model_class.__name__} is not initialised")

    def test_multimodal_outputs_are_returned(self) -> None:
        """The library's version reads `image_outputs`; LAVCap takes video frames and audio, so this checks
        `video_outputs` and `audio_outputs` the same way: hidden states, attentions, one pooled entry per clip."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(copy.deepcopy(config))
            model.set_attn_implementation("eager")
            model.eval()
            with torch.no_grad():
                outputs = model(**inputs, output_hidden_states=True, output_attentions=True)
            for encoder in (outputs.video_outputs, outputs.audio_outputs):
                self.assertIsNotNone(encoder.hidden_states)
                self.assertIsNotNone(encoder.attentions)
                self.assertEqual(len(encoder.pooler_output), self.model_tester.batch_size)
