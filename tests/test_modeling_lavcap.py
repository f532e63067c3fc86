"""LavCapForConditionalGeneration on tiny random configs: losses, freezing, generate(), save/load, paper sizes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import run_without_package, save_component_parts
from transformers import AutoModel, GenerationMixin

from lavcap_hf import FUSION_TYPES, LavCapConfig, LavCapForConditionalGeneration
from lavcap_hf.convert import build_from_components
from lavcap_hf.lora import apply_lora
from lavcap_hf.testing.configs import paper_sized_config, tiny_lavcap_config

BOS, PAD = 1, 0


def make_batch(config: LavCapConfig, caption_lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded prompts `BOS, placeholders, caption` with random media; labels on the caption only."""
    gen = torch.Generator().manual_seed(seed)
    audio, video = config.placeholder_counts
    rows = []
    for length in caption_lengths:
        caption = torch.randint(3, config.audio_token_id, (length,), generator=gen)
        rows.append(
            torch.cat(
                [
                    torch.tensor([BOS]),
                    torch.full((audio,), config.audio_token_id),
                    torch.full((video,), config.video_token_id),
                    caption,
                ]
            )
        )
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (row, length) in enumerate(zip(rows, caption_lengths, strict=True)):
        input_ids[i, width - len(row) :] = row
        attention_mask[i, width - len(row) :] = 1
        labels[i, width - length :] = row[-length:]
    batch = len(rows)
    frames = config.audio_config.target_length
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "input_features": torch.randn(batch, frames, 64, generator=gen),
        "pixel_values_videos": torch.randn(batch, config.num_frames, 3, 32, 32, generator=gen),
    }


def media(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_features", "pixel_values_videos")}


@pytest.fixture(scope="module")
def model() -> LavCapForConditionalGeneration:
    torch.manual_seed(0)
    return LavCapForConditionalGeneration(tiny_lavcap_config()).eval()


@pytest.mark.parametrize("fusion_type", FUSION_TYPES)
def test_forward_losses_for_every_fusion_type(fusion_type: str) -> None:
    torch.manual_seed(0)
    config = tiny_lavcap_config(fusion_type)
    model = LavCapForConditionalGeneration(config)
    batch = make_batch(config, [3, 5])
    out = model(**batch)
    assert torch.isfinite(out.lm_loss)
    assert out.logits.shape == (*batch["input_ids"].shape, config.text_config.vocab_size)
    if fusion_type.startswith("ot_"):
        assert torch.isfinite(out.ot_loss) and out.ot_loss > 0
        torch.testing.assert_close(out.loss, out.lm_loss + out.ot_loss)
    else:
        assert out.ot_loss is None
        torch.testing.assert_close(out.loss, out.lm_loss)
    # lm_loss is next-token cross entropy over the caption positions only.
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(out.lm_loss, expected)


PAPER_PLACEHOLDERS = {
    "ot_att": (64, 20),
    "ot_concat": (64, 20),
    "ot_channel_concat": (64, 0),
    "ot_cross_attention": (64, 0),
    "concat": (64, 40),
    "channel_concat": (64, 0),
    "audio_only": (64, 0),
    "visual_only": (0, 20),
    "concat_once": (64, 20),
    "plain_cross_attention": (64, 0),
}
"""(audio, video) placeholders per fusion type with 64 audio tokens and 20 frames, as the released code feeds them."""


@pytest.mark.parametrize("fusion_type", PAPER_PLACEHOLDERS)
def test_placeholder_counts_at_the_paper_sizes(fusion_type: str) -> None:
    assert set(PAPER_PLACEHOLDERS) == set(FUSION_TYPES)
    assert LavCapConfig(fusion_type=fusion_type).placeholder_counts == PAPER_PLACEHOLDERS[fusion_type]


def test_concat_feeds_the_audio_then_the_visual_tokens_twice() -> None:
    """`concat` is the released `tempcat_bfQF`: the projector sees [ha, hv, hv]."""
    torch.manual_seed(0)
    config = tiny_lavcap_config("concat")
    model = LavCapForConditionalGeneration(config).eval()
    batch = make_batch(config, [3, 2])
    num_audio, num_visual = config.num_audio_tokens, config.num_frames
    assert config.placeholder_counts == (num_audio, 2 * num_visual)
    with torch.no_grad():
        fused = model.get_multimodal_features(**media(batch)).multimodal_embeds
        audio = model.model.get_audio_features(batch["input_features"]).pooler_output
        visual = model.model.get_video_features(batch["pixel_values_videos"]).pooler_output
        expected = model.model.multi_modal_projector(torch.cat([audio, visual, visual], dim=1))
        assert torch.isfinite(model(**batch).loss)
    assert fused.shape[1] == num_audio + 2 * num_visual
    torch.testing.assert_close(fused, expected, rtol=0, atol=0)


def test_a_model_saved_as_cross_attention_loads_as_plain_cross_attention(tmp_path) -> None:
    """The former name loads with a FutureWarning into the same computation and weights; unknown names are errors."""
    torch.manual_seed(0)
    config = tiny_lavcap_config("plain_cross_attention")
    model = LavCapForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "fusion_type": "cross_attention"}))
    with pytest.warns(FutureWarning, match="'cross_attention' is now called 'plain_cross_attention'"):
        loaded = LavCapForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.fusion_type == "plain_cross_attention"
    batch = make_batch(config, [3, 2])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    loaded.save_pretrained(tmp_path / "again")
    assert (
        json.loads((tmp_path / "again" / "config.json").read_text())["fusion_type"] == "plain_cross_attention"
    )
    with pytest.raises(ValueError, match="fusion_type must be one of"):
        LavCapConfig(fusion_type="crossattn")


def test_ot_loss_weight_scales_ot_loss() -> None:
    batch = make_batch(tiny_lavcap_config(), [4])
    losses = []
    for weight in (1.0, 0.25):
        torch.manual_seed(0)
        losses.append(
            LavCapForConditionalGeneration(tiny_lavcap_config(ot_loss_weight=weight))(**batch).ot_loss
        )
    torch.testing.assert_close(losses[1], 0.25 * losses[0])


def test_placeholder_count_mismatch_is_a_clear_error(model: LavCapForConditionalGeneration) -> None:
    batch = make_batch(model.config, [3])
    batch["input_ids"][0, 2] = 5  # one audio placeholder fewer
    with pytest.raises(ValueError, match="placeholder tokens"):
        model(**batch)
    without_media = {
        k: v for k, v in make_batch(model.config, [3]).items() if k in ("input_ids", "attention_mask")
    }
    # A forward reads placeholders without media as tokens, as the library's multimodal models do, and says so.
    with pytest.warns(UserWarning, match="no input_features.*read as ordinary tokens"):
        model(**without_media)
    two = make_batch(model.config, [3, 3])
    fused = model.get_multimodal_features(**media(two)).multimodal_embeds
    with pytest.raises(ValueError, match="got 1 clips for 2 prompts"):
        model(input_ids=two["input_ids"], multimodal_embeds=fused[:1])


def test_placeholder_scatter_puts_the_kth_vector_at_the_kth_placeholder(
    model: LavCapForConditionalGeneration,
) -> None:
    """Placeholders anywhere in a row (here shuffled among the text): values and gradients equal masked_scatter's."""
    config = model.config
    batch = make_batch(config, [3, 6], seed=9)
    generator = torch.Generator().manual_seed(9)
    input_ids = torch.stack(
        [row[torch.randperm(len(row), generator=generator)] for row in batch["input_ids"]]
    )
    num_vectors = sum(config.placeholder_counts)
    tokens = torch.randn(*input_ids.shape, 8, generator=generator, requires_grad=True)
    vectors = torch.randn(2, num_vectors, 8, generator=generator, requires_grad=True)
    out = model.model.merge_multimodal_embeds(input_ids, tokens, vectors)
    mask = torch.isin(input_ids, torch.tensor([config.audio_token_id, config.video_token_id]))
    reference = tokens.masked_scatter(mask.unsqueeze(-1).expand_as(tokens), vectors)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    weights = torch.randn(out.shape, generator=generator)
    grads = torch.autograd.grad((out * weights).sum(), (tokens, vectors))
    reference_grads = torch.autograd.grad((reference * weights).sum(), (tokens, vectors))
    for grad, expected in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=0, atol=0)


def test_front_end_and_placeholder_scatter_never_read_device_values() -> None:
    """No host-device sync in LAVCap's part of a training step: the encoders, the OT fusion, the projector and the
    placeholder scatter with its count check run forward and backward on the meta device, where reading any value
    raises (the count check runs on the device there and on CUDA). The language model is the library's own; its
    attention-mask code reads the mask."""
    config = tiny_lavcap_config()
    batch = {k: v.to("meta") for k, v in make_batch(config, [2, 5]).items()}
    with torch.device("meta"):
        model = LavCapForConditionalGeneration(config)
    front = model.get_multimodal_features(**media(batch))
    embeds = model.model.merge_multimodal_embeds(
        batch["input_ids"], model.get_input_embeddings()(batch["input_ids"]), front.multimodal_embeds
    )
    (embeds.sum() + front.ot_loss).backward()
    assert embeds.shape == (2, batch["input_ids"].shape[1], config.text_config.hidden_size)
    assert model.model.multi_modal_projector.weight.grad is not None


def test_precomputed_video_embeds_match_the_vision_tower(model: LavCapForConditionalGeneration) -> None:
    batch = make_batch(model.config, [3, 4])
    with torch.no_grad():
        embeds = model.model.get_video_features(batch["pixel_values_videos"]).pooler_output
        from_pixels = model(**batch).logits
        batch_embeds = {k: v for k, v in batch.items() if k != "pixel_values_videos"}
        from_embeds = model(**batch_embeds, video_embeds=embeds).logits
    torch.testing.assert_close(from_pixels, from_embeds)
    with pytest.raises(ValueError, match="video_embeds must have shape"):
        model(**batch_embeds, video_embeds=embeds[..., :-1])


def test_model_without_vision_tower_takes_video_embeds() -> None:
    config = tiny_lavcap_config(with_vision=False)
    model = LavCapForConditionalGeneration(config)
    assert model.model.vision_tower is None
    batch = make_batch(config, [3])
    batch.pop("pixel_values_videos")
    out = model(**batch, video_embeds=torch.randn(1, config.num_frames, config.visual_embed_dim))
    assert torch.isfinite(out.loss)


def test_ot_plan_on_request_has_the_marginals(model: LavCapForConditionalGeneration) -> None:
    batch = make_batch(model.config, [3, 3])
    out = model(**batch, output_ot_plan=True)
    audio, video = model.config.placeholder_counts
    assert out.ot_plan.shape == (2, video, audio)
    torch.testing.assert_close(out.ot_plan.sum(-1), torch.full((2, video), 1 / video), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.ot_plan.sum(-2), torch.full((2, audio), 1 / audio), atol=1e-4, rtol=0)
    assert model(**batch).ot_plan is None


def uniform_ks_distance(values: torch.Tensor, bound: float) -> float:
    """Kolmogorov-Smirnov distance between the empirical distribution of `values` and U(-bound, bound)."""
    x = torch.sort(values.detach().flatten().double()).values
    cdf = ((x + bound) / (2 * bound)).clamp(0, 1)
    ranks = torch.arange(1, x.numel() + 1, dtype=torch.float64)
    return float(torch.maximum(ranks / x.numel() - cdf, cdf - (ranks - 1) / x.numel()).max())


def assert_uniform(values: torch.Tensor, bound: float) -> None:
    """Within +-bound and spread over it as U(-bound, bound): a KS distance that U(-bound, bound) exceeds with
    probability ~1e-5 (normal(0, 0.02) weights, the generic init, are ~0.3 away at these sizes)."""
    assert float(values.detach().abs().max()) <= bound
    assert uniform_ks_distance(values, bound) < 2.5 / math.sqrt(values.numel())


def check_pytorch_initialisation(model: LavCapForConditionalGeneration) -> None:
    """The projector as nn.Linear starts (weight and bias U(+-1/sqrt(in_features))); a cross-attention fusion as
    nn.MultiheadAttention starts (xavier-uniform input projection, zero biases, output projection as nn.Linear);
    the head as the decoder's (normal, std `initializer_range`)."""
    projector = model.model.multi_modal_projector
    bound = 1 / math.sqrt(projector.in_features)
    assert_uniform(projector.weight, bound)
    assert_uniform(projector.bias, bound)
    attention = getattr(model.model.fusion, "cross_attn", None)
    if attention is not None:
        width = attention.embed_dim
        assert_uniform(attention.in_proj_weight, math.sqrt(6 / (width + 3 * width)))
        assert_uniform(attention.out_proj.weight, 1 / math.sqrt(width))
        assert not attention.in_proj_bias.any() and not attention.out_proj.bias.any()
    std = model.config.text_config.initializer_range
    assert float(model.lm_head.weight.std()) == pytest.approx(std, rel=0.05)


@pytest.mark.parametrize("fusion_type", ["ot_att", "ot_cross_attention"])
def test_a_new_model_starts_its_fusion_and_projector_as_released(fusion_type: str) -> None:
    """The release builds its projector (`speech_llama_proj`) and cross-attention as plain torch modules and trains
    them from PyTorch's initialisation."""
    torch.manual_seed(0)
    check_pytorch_initialisation(LavCapForConditionalGeneration(tiny_lavcap_config(fusion_type, width=64)))


def test_a_model_built_from_pretrained_components_starts_its_projector_as_released(tmp_path) -> None:
    """The build a from-scratch training run starts from: pretrained CED and LM, a new fusion and projector."""
    llm, ced = save_component_parts(tmp_path)
    torch.manual_seed(0)
    model, _ = build_from_components(ced, None, llm, num_frames=4, visual_embed_dim=32)
    assert model.model.multi_modal_projector.in_features == 32
    check_pytorch_initialisation(model)


def test_paper_freezing_trains_exactly_lora_projector_and_logit_scale() -> None:
    torch.manual_seed(0)
    config = tiny_lavcap_config()
    peft_model = apply_lora(LavCapForConditionalGeneration(config))
    peft_model.train()
    batch = make_batch(config, [3, 4])
    peft_model(**batch).loss.backward()
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    # lora_B starts at zero, so lora_A's first gradient is zero but present; every other trained weight moves.
    with_grad = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    nonzero = {n for n in trainable if peft_model.get_parameter(n).grad.abs().sum() > 0}
    assert nonzero == {n for n in trainable if "lora_A" not in n}
    for name in trainable:
        is_lora = "lora_" in name and (".audio_tower." in name or ".language_model." in name)
        is_head = "modules_to_save" in name and (".multi_modal_projector." in name or ".fusion." in name)
        assert is_lora or is_head, name
    assert any("audio_tower" in n and "q_proj.lora_A" in n for n in trainable)
    assert any("audio_tower" in n and "v_proj.lora_B" in n for n in trainable)
    assert any("language_model" in n and "q_proj.lora_A" in n for n in trainable)
    assert any(n.endswith("fusion.modules_to_save.default.logit_scale") for n in trainable)
    assert not any("vision_tower" in n for n in trainable)
    assert not any("k_proj" in n for n in trainable)


def greedy_reference(model: LavCapForConditionalGeneration, batch: dict, steps: int) -> torch.Tensor:
    """Step-by-step argmax with the full forward (no cache), pad after EOS as generate() does. The placeholder ids
    are never chosen (generate() is given `suppress_tokens=model.placeholder_token_ids`): a random model may rank
    them first, and a full forward over a placeholder that is not the clip's would be refused."""
    eos, pad = model.config.text_config.eos_token_id, model.config.text_config.pad_token_id
    ids, mask = batch["input_ids"], batch["attention_mask"]
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(
                input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False, **media(batch)
            ).logits
        scores = logits[:, -1].clone()
        scores[:, model.placeholder_token_ids] = -torch.inf
        nxt = scores.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        done |= nxt == eos
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(nxt[:, None])], 1)
        position_ids = torch.cat([position_ids, position_ids[:, -1:] + 1], 1)
    return ids


class CallCounter:
    """Counts a module's forward calls and records the batch size of each call's first input."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.batch_sizes: list[int] = []
        module.register_forward_hook(self)

    def __call__(self, module: torch.nn.Module, args: tuple, output: object) -> None:
        self.calls += 1
        self.batch_sizes.append(args[0].shape[0])


def test_greedy_generate_equals_stepwise_argmax_and_encodes_once(
    model: LavCapForConditionalGeneration,
) -> None:
    counter = CallCounter(model.model.audio_tower)
    batch = make_batch(model.config, [2, 5], seed=3)
    generated = model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        **media(batch),
        max_new_tokens=8,
        num_beams=1,
        do_sample=False,
        suppress_tokens=model.placeholder_token_ids,
    )
    assert counter.calls == 1
    reference = greedy_reference(model, batch, steps=generated.shape[1] - batch["input_ids"].shape[1])
    assert torch.equal(generated, reference)


def test_batched_left_padded_generation_equals_one_by_one(model: LavCapForConditionalGeneration) -> None:
    batch = make_batch(model.config, [1, 6], seed=4)
    kwargs = {"max_new_tokens": 6, "num_beams": 1, "do_sample": False}
    together = model.generate(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **media(batch), **kwargs
    )
    for i in range(2):
        keep = batch["attention_mask"][i].bool()
        alone = model.generate(
            input_ids=batch["input_ids"][i : i + 1, keep],
            attention_mask=batch["attention_mask"][i : i + 1, keep],
            input_features=batch["input_features"][i : i + 1],
            pixel_values_videos=batch["pixel_values_videos"][i : i + 1],
            **kwargs,
        )
        new_together = together[i, batch["input_ids"].shape[1] :]
        new_alone = alone[0, keep.sum() :]
        assert torch.equal(new_together[: len(new_alone)], new_alone)


def test_beam_search_and_sampling_encode_once(model: LavCapForConditionalGeneration) -> None:
    counter = CallCounter(model.model.audio_tower)
    batch = make_batch(model.config, [2, 3], seed=5)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], **media(batch)}
    beams = model.generate(**inputs, max_new_tokens=5, num_beams=4, num_return_sequences=2)
    # Once, on the 2 clips: the fused prompt embeddings are repeated for the beams, not the media.
    assert beams.shape[0] == 4 and counter.batch_sizes == [2]
    torch.manual_seed(0)
    sampling = {"max_new_tokens": 5, "num_beams": 1, "do_sample": True, "top_k": 0, "temperature": 1.5}
    first = model.generate(**inputs, **sampling)
    torch.manual_seed(0)
    again = model.generate(**inputs, **sampling)
    assert torch.equal(first, again) and counter.calls == 3


def test_beam_search_from_clip_embeddings_equals_beam_search_on_repeated_media(
    model: LavCapForConditionalGeneration,
) -> None:
    """generate() encodes the B clips and lets the beams share their embeddings; GenerationMixin's own generate()
    with the media encodes B x beams copies on the prefill step. Same tokens, a quarter of the encoder work."""
    counter = CallCounter(model.model.audio_tower)
    batch = make_batch(model.config, [2, 5], seed=7)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], **media(batch)}
    kwargs = {"max_new_tokens": 6, "num_beams": 4, "num_return_sequences": 2, "do_sample": False}
    per_clip = model.generate(**inputs, **kwargs)
    repeated = GenerationMixin.generate(model, **inputs, **kwargs)
    assert counter.batch_sizes == [2, 8]
    assert torch.equal(per_clip, repeated)
    # The prompt ids can be the positional `inputs`, as in GenerationMixin.generate.
    positional = model.generate(inputs.pop("input_ids"), **inputs, **kwargs)
    assert torch.equal(positional, per_clip)


def test_generate_with_media_needs_the_prompt_and_one_form_of_the_media(
    model: LavCapForConditionalGeneration,
) -> None:
    batch = make_batch(model.config, [2], seed=8)
    with pytest.raises(ValueError, match=r"must hold \d+ placeholder tokens"):
        model.generate(attention_mask=batch["attention_mask"], **media(batch), max_new_tokens=2)
    vectors = model.get_multimodal_features(**media(batch)).multimodal_embeds
    with pytest.raises(ValueError, match="either media inputs or their multimodal_embeds"):
        model.generate(
            input_ids=batch["input_ids"], multimodal_embeds=vectors, **media(batch), max_new_tokens=2
        )
    with pytest.raises(ValueError, match="placeholder tokens but no input_features"):
        model.generate(input_ids=batch["input_ids"], max_new_tokens=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: checks CUDA synchronisations")
@pytest.mark.parametrize("fusion_type", ["ot_att", "concat"])
def test_front_end_and_placeholder_scatter_make_no_cuda_sync(fusion_type: str) -> None:
    """On CUDA, LAVCap's part of a training step (encoders, fusion, projector, placeholder scatter; forward and
    backward) never waits for the device: torch's sync debug mode turns any synchronising call into an error."""
    config = tiny_lavcap_config(fusion_type=fusion_type)
    model = LavCapForConditionalGeneration(config).cuda().train()
    batch = {k: v.cuda() for k, v in make_batch(config, [2, 5]).items()}

    def step() -> None:
        front = model.get_multimodal_features(**media(batch))
        tokens = model.get_input_embeddings()(batch["input_ids"])
        embeds = model.model.merge_multimodal_embeds(batch["input_ids"], tokens, front.multimodal_embeds)
        ot_loss = front.ot_loss if front.ot_loss is not None else 0
        (embeds.float().square().mean() + ot_loss).backward()

    step()  # warm-up: lazy initialisations may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_generate_computes_the_logits_of_the_last_position_only(
    model: LavCapForConditionalGeneration,
) -> None:
    """`generate()` passes logits_to_keep=1, so the prefill of a beam search builds (B x beams, 1, vocab) logits,
    not (B x beams, L, vocab); the forward's last-position logits equal the full forward's."""
    lengths = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda _, __, out: lengths.append(out.shape[1])
    )
    batch = make_batch(model.config, [2, 3], seed=6)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], **media(batch)}
    try:
        model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, num_beams=2)
    finally:
        hook.remove()
    assert lengths == [1, 1, 1]
    with torch.no_grad():
        full = model(**inputs).logits
        last = model(**inputs, logits_to_keep=1).logits
    assert last.shape[1] == 1
    torch.testing.assert_close(last[:, 0], full[:, -1])
    with pytest.raises(ValueError, match="logits_to_keep=0 with labels"):
        model(**inputs, labels=batch["labels"], logits_to_keep=1)


def test_save_and_load_give_identical_logits(model: LavCapForConditionalGeneration, tmp_path) -> None:
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    batch = make_batch(model.config, [3, 2])
    with torch.no_grad():
        expected = model(**batch).logits
        for loaded in (
            LavCapForConditionalGeneration.from_pretrained(tmp_path),
            AutoModel.from_pretrained(tmp_path),
        ):
            assert isinstance(loaded, LavCapForConditionalGeneration)
            torch.testing.assert_close(loaded.eval()(**batch).logits, expected, rtol=0, atol=0)


@pytest.mark.integration
def test_trust_remote_code_loads_without_the_package(model: LavCapForConditionalGeneration, tmp_path) -> None:
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    batch = make_batch(model.config, [3, 2])
    torch.save(batch, tmp_path / "batch.pt")
    with torch.no_grad():
        expected = model(**batch).logits
    run_without_package(
        f"""
        import torch
        from transformers import AutoModel, GenerationMixin
        try:
            import lavcap_hf
            raise SystemExit("lavcap_hf should not be importable here")
        except ImportError:
            pass
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "LavCapForConditionalGeneration"
        assert "lavcap_hf" not in type(model).__module__
        batch = torch.load({str(tmp_path / "batch.pt")!r})
        with torch.no_grad():
            torch.save(model(**batch).logits, {str(tmp_path / "logits.pt")!r})
        """,
        tmp_path,
    )
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=0)


def test_paper_sized_model_on_meta_reports_trainable_parameters(capsys) -> None:
    config = paper_sized_config()
    with torch.device("meta"):
        peft_model = apply_lora(LavCapForConditionalGeneration(config))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    # Expected by construction: LoRA r=8 on 12 CED blocks (768 x 768 q/v) and 32 LLaMA layers (4096 x 4096 q/v),
    # the 768 -> 4096 projector and the logit scale.
    ced_lora = 12 * 2 * 8 * (768 + 768)
    llm_lora = 32 * 2 * 8 * (4096 + 4096)
    projector = 768 * 4096 + 4096
    assert trainable == ced_lora + llm_lora + projector + 1
    with capsys.disabled():
        print(
            f"\npaper-sized LAVCap: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)"
        )
