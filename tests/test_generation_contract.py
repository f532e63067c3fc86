"""The library's generation and model contract, which transformers' own generation tests (not in its sdist) check
for every model: assisted decoding, decoding without a cache, continuing from a cache, `inputs_embeds` with media,
tuple outputs, the encoders' outputs, per-step attentions and hidden states, padding-free (packed) batches,
folders saved in the older layout (a separate causal LM), and the model's `generation_config` (the released
decoding by default, then the folder's, then `generate()`'s arguments)."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from helpers import recorded_decoding
from safetensors.torch import load_file, save_file
from test_modeling_lavcap import make_batch, media
from transformers import DataCollatorWithFlattening, GenerationConfig

from lavcap_hf import LavCapForConditionalGeneration
from lavcap_hf.model.configuration_lavcap import RELEASED_DECODING
from lavcap_hf.model.modeling_lavcap import KEY_RENAMES_FROM_SEPARATE_LM
from lavcap_hf.testing.configs import tiny_lavcap_config

GREEDY = {"num_beams": 1, "do_sample": False, "max_new_tokens": 5, "min_new_tokens": 5}


@pytest.fixture(scope="module")
def model() -> LavCapForConditionalGeneration:
    torch.manual_seed(3)
    return LavCapForConditionalGeneration(tiny_lavcap_config()).eval()


@pytest.fixture(scope="module")
def batch(model: LavCapForConditionalGeneration) -> dict[str, torch.Tensor]:
    """Two left-padded prompts (placeholders, then a caption prefix) and their media."""
    full = make_batch(model.config, [2, 4], seed=5)
    return {k: v for k, v in full.items() if k != "labels"}


def greedy(model: LavCapForConditionalGeneration, batch: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**batch, **GREEDY, **kwargs)


def test_assisted_and_prompt_lookup_decoding_equal_greedy_decoding(model, batch) -> None:
    """Candidate tokens are checked by forwards on the prompt ids: the media must reach those forwards."""
    one = {k: v[1:] for k, v in batch.items()}  # assisted decoding takes one prompt at a time
    expected = greedy(model, one)
    assert torch.equal(greedy(model, one, assistant_model=model), expected)
    assert torch.equal(greedy(model, one, prompt_lookup_num_tokens=2), expected)


def test_decoding_without_a_cache_sees_the_whole_sequence_at_every_step(model, batch) -> None:
    """`use_cache=False` feeds the whole sequence (media merged) at every step: per-step hidden states span it."""
    cached = greedy(model, batch)
    out = greedy(model, batch, use_cache=False, output_hidden_states=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, cached)
    prompt_length = batch["input_ids"].shape[1]
    lengths = [step[-1].shape[1] for step in out.hidden_states]
    assert lengths == [prompt_length + i for i in range(GREEDY["max_new_tokens"])]


def test_generation_continues_from_a_cache(model, batch) -> None:
    """A second `generate()` from the first one's cache and sequences gives the tokens of one long run."""
    with torch.no_grad():
        long = model.generate(**batch, **{**GREEDY, "max_new_tokens": 6, "min_new_tokens": 6})
        first = model.generate(
            **batch, **{**GREEDY, "max_new_tokens": 3, "min_new_tokens": 3}, return_dict_in_generate=True
        )
        cache_name = "cache" if hasattr(first, "cache") else "past_key_values"
        mask = torch.cat([batch["attention_mask"], torch.ones_like(first.sequences[:, -3:])], dim=1)
        second = model.generate(
            input_ids=first.sequences,
            attention_mask=mask,
            **{**GREEDY, "max_new_tokens": 3, "min_new_tokens": 3},
            **{cache_name: getattr(first, cache_name)},
        )
    assert torch.equal(second, long)


def test_inputs_embeds_take_the_media_at_their_placeholders(model, batch) -> None:
    """Media given with `inputs_embeds` are merged at the placeholder embeddings, as with `input_ids`."""
    embeds = model.get_input_embeddings()(batch["input_ids"])
    from_embeds = {"inputs_embeds": embeds, "attention_mask": batch["attention_mask"], **media(batch)}
    with torch.no_grad():
        expected = model(**batch).logits
        torch.testing.assert_close(model(**from_embeds).logits, expected)
        new_tokens = model.generate(**from_embeds, **GREEDY)
    prompt_length = batch["input_ids"].shape[1]
    assert torch.equal(new_tokens, greedy(model, batch)[:, prompt_length:])


def test_forward_returns_a_tuple_on_request(model, batch) -> None:
    labels = make_batch(model.config, [2, 4], seed=5)["labels"]
    with torch.no_grad():
        as_dict = model(**batch, labels=labels)
        as_tuple = model(**batch, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.loss)
    torch.testing.assert_close(as_tuple[1], as_dict.logits)


def test_outputs_carry_the_encoders_hidden_states_and_attentions(model, batch) -> None:
    config = model.config
    model = LavCapForConditionalGeneration._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True, output_attentions=True)
    clips, frames = batch["pixel_values_videos"].shape[:2]
    video = out.video_outputs
    assert len(video.hidden_states) == config.vision_config.num_hidden_layers + 1
    assert len(video.attentions) == config.vision_config.num_hidden_layers
    assert video.pooler_output.shape == (clips, frames, config.visual_embed_dim)
    audio = out.audio_outputs
    assert len(audio.hidden_states) == config.audio_config.num_hidden_layers + 1
    assert audio.pooler_output.shape == (clips, config.num_audio_tokens, config.audio_config.hidden_size)
    assert len(out.hidden_states) == config.text_config.num_hidden_layers + 1
    assert len(out.attentions) == config.text_config.num_hidden_layers


@pytest.mark.parametrize(
    "settings", [{"num_beams": 2}, {"do_sample": True, "num_beams": 1}], ids=["beams", "samples"]
)
def test_per_step_attentions_and_hidden_states_span_the_prompt_with_several_rows_per_clip(
    model, batch, settings
) -> None:
    """`output_attentions` / `output_hidden_states` of `generate()`: the first step reads the whole prompt on every
    row, as the library's generation tests check, also where the prompt is otherwise read once per clip."""
    model = LavCapForConditionalGeneration._from_config(model.config, attn_implementation="eager").eval()
    steps = {"max_new_tokens": 3, "min_new_tokens": 3, "num_return_sequences": 2, **settings}
    with torch.no_grad():
        out = model.generate(
            **batch, **steps, output_attentions=True, output_hidden_states=True, return_dict_in_generate=True
        )
    rows, length = 2 * batch["input_ids"].shape[0], batch["input_ids"].shape[1]
    heads, width = model.config.text_config.num_attention_heads, model.config.text_config.hidden_size
    for step, (attentions, hidden_states) in enumerate(zip(out.attentions, out.hidden_states, strict=True)):
        queries = length if step == 0 else 1
        assert {tuple(layer.shape) for layer in attentions} == {(rows, heads, queries, length + step)}
        assert {tuple(layer.shape) for layer in hidden_states} == {(rows, queries, width)}


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_a_packed_batch_gives_the_logits_and_loss_of_the_padded_batch(model, implementation) -> None:
    """Padding-free training: `DataCollatorWithFlattening` puts the prompts of several clips one after another in
    one row, `position_ids` restarting at each, without an attention mask; each clip's vectors go to its own
    placeholders, and the decoder keeps the prompts apart, as the library's decoders do (without a cache)."""
    model = LavCapForConditionalGeneration._from_config(
        model.config, attn_implementation=implementation
    ).eval()
    padded = make_batch(model.config, [2, 5, 3], seed=6)
    real = padded["attention_mask"].bool()
    features = [
        {"input_ids": ids[keep].tolist(), "labels": labels[keep].tolist()}
        for ids, labels, keep in zip(padded["input_ids"], padded["labels"], real, strict=True)
    ]
    packed = {**DataCollatorWithFlattening(return_tensors="pt")(features), **media(padded)}
    assert packed["input_ids"].shape == (1, int(real.sum()))
    with torch.no_grad():
        expected = model(**padded, use_cache=False)
        out = model(**packed, use_cache=False)
    torch.testing.assert_close(out.logits[0], expected.logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-5)
    two_clips = {k: v[:2] for k, v in media(padded).items()}
    with pytest.raises(ValueError, match=r"got 2 clips for 1 prompts holding \[\d+\]"):
        model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], **two_clips)


def old_layout_name(key: str) -> str:
    """The name a tensor had when the causal LM was a separate module (`language_model.model.*`, `.lm_head`)."""
    for pattern, replacement in KEY_RENAMES_FROM_SEPARATE_LM.items():
        unescaped = re.sub(r"\\(.)", r"\1", pattern.lstrip("^"))
        if key.startswith(replacement):
            return unescaped + key[len(replacement) :]
    return key


def test_a_folder_in_the_older_layout_loads_with_every_tensor(model, batch, tmp_path) -> None:
    """Folders written before the decoder moved into `LavCapModel` hold `language_model.model.*` and
    `language_model.lm_head.*`; they load into the current layout on every supported release."""
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    older = {old_layout_name(k): v for k, v in load_file(weights).items()}
    assert any(k.startswith("language_model.model.layers.") for k in older)
    assert "language_model.lm_head.weight" in older
    save_file(older, weights, metadata={"format": "pt"})
    loaded, info = LavCapForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    assert torch.equal(greedy(loaded.eval(), batch), greedy(model, batch))


@pytest.mark.parametrize("layout", ["as saved", "older"])
def test_a_saved_file_loads_straight_into_the_module(model, tmp_path, layout) -> None:
    """The Trainer restores its best checkpoint and resumes a run with `module.load_state_dict(load_file(...))`,
    not `from_pretrained`: every tensor of the file must land, whatever layout it was saved in (5.x saves in the
    older one), and under a wrapper's prefix too."""
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    if layout == "older":
        saved = {old_layout_name(k): v for k, v in saved.items()}
        assert "language_model.lm_head.weight" in saved
    torch.manual_seed(11)
    fresh = LavCapForConditionalGeneration(model.config)
    assert fresh.load_state_dict(dict(saved), strict=True)  # a missing or unexpected key raises
    for key, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], tensor), key

    wrapper = torch.nn.ModuleDict({"inner": LavCapForConditionalGeneration(model.config)})
    wrapper.load_state_dict({f"inner.{k}": v for k, v in saved.items()}, strict=True)
    assert torch.equal(wrapper["inner"].lm_head.weight, model.lm_head.weight)


def test_static_cache_and_a_compiled_decoding_step_give_the_eager_tokens(model, batch) -> None:
    """The decoding step compiles as one graph (`fullgraph=True`: a graph break is an error) over a static cache.
    The graphs run through a recording backend (dynamo's capture without code generation, to stay fast on a CPU)."""
    from transformers import CompileConfig

    graphs = []

    def recording_backend(graph_module: torch.fx.GraphModule, example_inputs: list, **options) -> object:
        graphs.append(graph_module)
        return graph_module.forward

    expected = greedy(model, batch)
    assert torch.equal(greedy(model, batch, cache_implementation="static"), expected)
    compile_config = CompileConfig(fullgraph=True, dynamic=False, backend=recording_backend)
    compile_config._compile_all_devices = (
        True  # the library compiles on accelerators only unless told otherwise
    )
    torch._dynamo.reset()
    try:
        # `compile_decoding=True` asks for the static cache and the one-graph step; the config given here only
        # replaces the backend (and compiles on a CPU).
        compiled = greedy(model, batch, compile_decoding=True, compile_config=compile_config)
    finally:
        torch._dynamo.reset()
    assert torch.equal(compiled, expected)
    assert graphs, "the decoding step was not compiled"


@pytest.mark.parametrize(
    "settings, copies",
    [
        ({"num_beams": 3, "do_sample": False}, 3),
        ({"num_beams": 3, "num_return_sequences": 2, "do_sample": False}, 3),
        ({"num_beams": 1, "do_sample": True, "num_return_sequences": 2}, 2),
    ],
    ids=["beams", "beams-returning-two", "samples"],
)
def test_the_prompt_is_read_once_per_clip_and_the_tokens_do_not_change(
    model, batch, settings, copies
) -> None:
    """With several rows per prompt, the decoder reads the B prompts once (all but the last token), then
    continues from the repeated cache on B * copies rows of one token; the tokens equal the per-beam prefill's."""
    reads = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: reads.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True
    )
    steps = {"max_new_tokens": 4, "min_new_tokens": 4, **settings}
    try:
        with torch.no_grad():
            torch.manual_seed(0)
            shared = model.generate(**batch, **steps)
            first_reads, reads[:] = list(reads[:2]), []
            torch.manual_seed(0)
            per_beam = model.generate(**batch, **steps, share_prefill=False)
    finally:
        hook.remove()
    clips, length = batch["input_ids"].shape
    assert first_reads == [(clips, length - 1), (clips * copies, 1)]
    assert reads[0] == (clips * copies, length)
    assert torch.equal(shared, per_beam)


# ----------------------------------------------------------------------------------------------------------------
# Decoding settings: the model's generation_config


def decoding(config: GenerationConfig) -> dict:
    return {name: getattr(config, name) for name in RELEASED_DECODING}


def test_the_released_decoding_is_the_release_config_generate_section() -> None:
    """configs/config_best.yaml of the release, `generate:`: max_new_tokens 200, num_beams 4, do_sample False."""
    assert RELEASED_DECODING == {"num_beams": 4, "max_new_tokens": 200, "do_sample": False}


@pytest.fixture(scope="module")
def saved_folder(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("generation") / "model"
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("generation_file", ["saved", "none", "token-ids-only"])
def test_a_saved_folder_decodes_as_released_without_arguments(saved_folder, batch, generation_file, tmp_path):
    """`generate(**inputs)` on a loaded folder decodes with the released beams and length: the tokens of explicit
    `num_beams=4, max_new_tokens=200`, not those of the library's greedy 20 tokens. Also for a folder without
    generation_config.json, or with one that holds token ids only (as this package saved them before)."""
    folder = tmp_path / "model"
    folder.mkdir()
    for file in saved_folder.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    saved = json.loads((folder / "generation_config.json").read_text())
    assert decoding(GenerationConfig(**saved)) == RELEASED_DECODING
    if generation_file == "none":
        (folder / "generation_config.json").unlink()
    elif generation_file == "token-ids-only":
        ids = {k: saved[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (folder / "generation_config.json").write_text(json.dumps(ids))
    loaded = LavCapForConditionalGeneration.from_pretrained(folder).eval()
    with recorded_decoding(loaded) as used, torch.no_grad():
        by_default = loaded.generate(**batch)
        released = loaded.generate(**batch, **RELEASED_DECODING)
        library_default = loaded.generate(**batch, num_beams=1, max_new_tokens=20, do_sample=False)
    assert decoding(used[0]) == RELEASED_DECODING and used[0].eos_token_id == saved["eos_token_id"]
    assert torch.equal(by_default, released)
    assert by_default.shape != library_default.shape or not torch.equal(by_default, library_default)


def test_generate_arguments_and_a_passed_generation_config_win(saved_folder, batch) -> None:
    """An argument wins over the model's settings; so does a passed generation config for every setting it holds,
    `num_beams=1` included (transformers 4.x would take the model's beams for a setting at the library default)."""
    loaded = LavCapForConditionalGeneration.from_pretrained(saved_folder).eval()
    edited = copy.deepcopy(loaded.generation_config)
    edited.num_beams, edited.max_new_tokens = 1, 4
    with recorded_decoding(loaded) as used, torch.no_grad():
        loaded.generate(**batch, max_new_tokens=1)
        loaded.generate(**batch, num_beams=1, max_new_tokens=3)
        loaded.generate(**batch, generation_config=edited)
        loaded.generate(**batch, generation_config=edited, max_new_tokens=2)
    assert [(c.num_beams, c.max_new_tokens) for c in used] == [(4, 1), (1, 3), (1, 4), (1, 2)]
    assert decoding(loaded.generation_config) == RELEASED_DECODING  # the passed settings did not stick


def test_a_folder_generation_config_wins_over_the_released_decoding(model, batch, tmp_path) -> None:
    """The settings of a folder's generation_config.json win; each decoding setting it leaves out is the released
    one. A saved greedy choice reads back greedy on every release (4.x writes nothing for a setting at its
    default unless told to)."""
    greedy = copy.deepcopy(model)
    greedy.generation_config.num_beams, greedy.generation_config.max_new_tokens = 1, 6
    greedy.save_pretrained(tmp_path / "greedy")
    written = json.loads((tmp_path / "greedy" / "generation_config.json").read_text())
    assert written["num_beams"] == 1 and written["max_new_tokens"] == 6
    loaded = LavCapForConditionalGeneration.from_pretrained(tmp_path / "greedy").eval()
    model.save_pretrained(tmp_path / "partial")
    settings = json.loads((tmp_path / "partial" / "generation_config.json").read_text())
    partial = {k: v for k, v in settings.items() if k not in RELEASED_DECODING}
    (tmp_path / "partial" / "generation_config.json").write_text(json.dumps({**partial, "num_beams": 2}))
    two_beams = LavCapForConditionalGeneration.from_pretrained(tmp_path / "partial").eval()
    with (
        recorded_decoding(loaded) as greedy_used,
        recorded_decoding(two_beams) as partial_used,
        torch.no_grad(),
    ):
        loaded.generate(**batch)
        two_beams.generate(**batch)
    assert decoding(greedy_used[0]) == {**RELEASED_DECODING, "num_beams": 1, "max_new_tokens": 6}
    assert decoding(partial_used[0]) == {**RELEASED_DECODING, "num_beams": 2}


def test_generate_never_emits_a_placeholder_token(model, batch) -> None:
    """The released model has no placeholder tokens in its vocabulary: a head that ranks them first still gives
    captions without them, with beams and greedy, also next to the caller's own `suppress_tokens`."""
    favouring = copy.deepcopy(model)
    with torch.no_grad():
        for token_id in favouring.placeholder_token_ids:
            favouring.lm_head.weight[token_id] = 50 * favouring.lm_head.weight.abs().max()
    prompt_length = batch["input_ids"].shape[1]
    for settings in ({"num_beams": 1}, {"num_beams": 3}, {"num_beams": 2, "suppress_tokens": [7]}):
        with torch.no_grad():
            new = favouring.generate(**batch, max_new_tokens=4, min_new_tokens=4, **settings)[
                :, prompt_length:
            ]
        emitted = set(new.flatten().tolist())
        assert emitted and not emitted & set(favouring.placeholder_token_ids), settings
        assert 7 not in emitted or "suppress_tokens" not in settings
