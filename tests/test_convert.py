"""Checkpoint conversion on tiny weights with the released key names and layouts.

References written here, independently of the package: the released CED forward (fused-qkv attention computed
explicitly), half-pixel linear interpolation of the time position embeddings, and LoRA merging `W + alpha/r * B @ A`.
The "released LAVCap" model is rebuilt with peft around modules that carry the released module names, and its
checkpoint is saved the way the released trainer saves it (parameters without gradients dropped).
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from lavcap_cli import add_convert_arguments
from lavcap_hf import CedModel, LavCapForConditionalGeneration
from lavcap_hf.convert import (
    OFFICIAL_FUSION_TYPES,
    build_from_components,
    ced_config_from_state_dict,
    convert_official_checkpoint,
    from_pretrained_components,
    load_ced_weights,
    load_clip_vision_weights,
    load_state_dict,
    official_config_kwargs,
    part_dtypes,
    run_convert,
)
from lavcap_hf.lora import apply_lora, lavcap_lora_config
from lavcap_hf.model._compat import dtype_kwarg
from lavcap_hf.model.modeling_ced import interpolate_time_pos_embed

WIDTH, LAYERS, HEADS, PATCH, MEL, FRAMES = 128, 2, 2, 16, 64, 1024  # CED: heads = width // 64, as released
RELEASE_TIME_PATCHES = 63  # the release's 1012 frames
RANK, ALPHA = 2, 8.0
WORDS = [
    "a",
    "dog",
    "barks",
    "while",
    "car",
    "passes",
    "by",
    "people",
    "talk",
    "USER",
    "ASSISTANT",
    "describe",
]


# --------------------------------------------------------------------------------------------------------------
# Independent references


def half_pixel_linear(values: torch.Tensor, size: int) -> torch.Tensor:
    """Linear resampling of (..., L) to (..., size) with half-pixel centres: the source of output j is
    (j + 0.5) * L / size - 0.5, clamped at 0, blended between its two neighbours."""
    length = values.shape[-1]
    columns = []
    for j in range(size):
        source = max((j + 0.5) * length / size - 0.5, 0.0)
        low = min(math.floor(source), length - 1)
        high = min(low + 1, length - 1)
        weight = source - low
        columns.append((1 - weight) * values[..., low] + weight * values[..., high])
    return torch.stack(columns, dim=-1)


def reference_ced_tokens(weights: dict[str, torch.Tensor], fbank: torch.Tensor) -> torch.Tensor:
    """The released CED forward on release-layout weights, then LAVCap's mean over the frequency rows.

    fbank (B, frames, mel) -> (B, frames / 16, C).
    """
    batch, frames, mel = fbank.shape
    rows, cols, head_dim = mel // PATCH, frames // PATCH, WIDTH // HEADS
    spectrogram = fbank.transpose(1, 2)  # (B, mel, frames): BatchNorm normalises each mel bin

    def bn(name: str) -> torch.Tensor:
        return weights[f"init_bn.1.{name}"][:, None]

    spectrogram = (spectrogram - bn("running_mean")) / torch.sqrt(bn("running_var") + 1e-5) * bn(
        "weight"
    ) + bn("bias")
    patches = (
        spectrogram.reshape(batch, rows, PATCH, cols, PATCH)
        .permute(0, 1, 3, 2, 4)
        .reshape(batch, rows, cols, -1)
    )
    tokens = (
        patches @ weights["patch_embed.proj.weight"].reshape(WIDTH, -1).T + weights["patch_embed.proj.bias"]
    )
    time = half_pixel_linear(weights["time_pos_embed"][0, :, 0], FRAMES // PATCH)[:, :cols]  # (C, T)
    tokens = tokens + time.T[None, None] + weights["freq_pos_embed"][0, :, :, 0].T[None, :, None]
    hidden = tokens.reshape(batch, rows * cols, WIDTH)  # frequency-major

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (WIDTH,), weights[f"{name}.weight"], weights[f"{name}.bias"], eps=1e-6)

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ weights[f"{name}.weight"].T + weights[f"{name}.bias"]

    for i in range(LAYERS):
        block = f"blocks.{i}"
        qkv = linear(norm(hidden, f"{block}.norm1"), f"{block}.attn.qkv")
        query, key, value = qkv.reshape(batch, -1, 3, HEADS, head_dim).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(query @ key.transpose(-2, -1) * head_dim**-0.5, dim=-1)
        attended = (attention @ value).transpose(1, 2).reshape(batch, -1, WIDTH)
        hidden = hidden + linear(attended, f"{block}.attn.proj")
        mlp = linear(F.gelu(linear(norm(hidden, f"{block}.norm2"), f"{block}.mlp.fc1")), f"{block}.mlp.fc2")
        hidden = hidden + mlp
    hidden = norm(hidden, "norm")
    return hidden.reshape(batch, rows, cols, WIDTH).mean(dim=1)


# --------------------------------------------------------------------------------------------------------------
# Checkpoints with the released layouts


def release_ced_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """`audiotransformer_*_mAP_*.pt` layout: front end buffers, init_bn.1, fused qkv, 63 time patches, outputlayer."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.05) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    weights = {
        "front_end.0.spectrogram.window": torch.hann_window(512),
        "front_end.0.mel_scale.fb": torch.rand(257, MEL, generator=gen),
        "init_bn.1.weight": 1 + rand(MEL),
        "init_bn.1.bias": rand(MEL),
        "init_bn.1.running_mean": rand(MEL, scale=2.0),
        "init_bn.1.running_var": 0.5 + torch.rand(MEL, generator=gen),
        "init_bn.1.num_batches_tracked": torch.tensor(1000),
        "patch_embed.proj.weight": rand(WIDTH, 1, PATCH, PATCH),
        "patch_embed.proj.bias": rand(WIDTH),
        "time_pos_embed": rand(1, WIDTH, 1, RELEASE_TIME_PATCHES, scale=0.5),
        "freq_pos_embed": rand(1, WIDTH, MEL // PATCH, 1, scale=0.5),
        "norm.weight": 1 + rand(WIDTH),
        "norm.bias": rand(WIDTH),
        "outputlayer.0.weight": 1 + rand(WIDTH),
        "outputlayer.0.bias": rand(WIDTH),
        "outputlayer.1.weight": rand(10, WIDTH),
        "outputlayer.1.bias": rand(10),
    }
    for i in range(LAYERS):
        block = f"blocks.{i}"
        weights.update(
            {
                f"{block}.norm1.weight": 1 + rand(WIDTH),
                f"{block}.norm1.bias": rand(WIDTH),
                f"{block}.attn.qkv.weight": rand(3 * WIDTH, WIDTH, scale=0.2),
                f"{block}.attn.qkv.bias": rand(3 * WIDTH),
                f"{block}.attn.proj.weight": rand(WIDTH, WIDTH, scale=0.2),
                f"{block}.attn.proj.bias": rand(WIDTH),
                f"{block}.norm2.weight": 1 + rand(WIDTH),
                f"{block}.norm2.bias": rand(WIDTH),
                f"{block}.mlp.fc1.weight": rand(4 * WIDTH, WIDTH, scale=0.1),
                f"{block}.mlp.fc1.bias": rand(4 * WIDTH),
                f"{block}.mlp.fc2.weight": rand(WIDTH, 4 * WIDTH, scale=0.1),
                f"{block}.mlp.fc2.bias": rand(WIDTH),
            }
        )
    return weights


def hub_ced_state_dict(release: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`mispeech/ced-*` layout: the encoder under `encoder.` with a plain `init_bn`, the classifier as `outputlayer.*`."""
    weights = {}
    for key, tensor in release.items():
        if key.startswith("front_end."):
            continue
        name = key if key.startswith("outputlayer.") else "encoder." + key.replace("init_bn.1.", "init_bn.")
        weights[name] = tensor
    return weights


def package_ced_state_dict(release: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This package's `CedModel` layout, written by hand: split q/k/v, plain init_bn, 64 time patches."""
    weights = {}
    for key, tensor in release.items():
        if key.startswith(("front_end.", "outputlayer.")):
            continue
        if ".attn.qkv." in key:
            for i, projection in enumerate(("q_proj", "k_proj", "v_proj")):
                weights[key.replace("qkv", projection)] = tensor[i * WIDTH : (i + 1) * WIDTH]
            continue
        weights[key.replace("init_bn.1.", "init_bn.")] = tensor
    weights["time_pos_embed"] = half_pixel_linear(release["time_pos_embed"], FRAMES // PATCH)
    return weights


def expected_ced_tensors(release: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What every CedModel tensor must hold after loading `release` in any layout."""
    return package_ced_state_dict(release)


@pytest.fixture(scope="module")
def release() -> dict[str, torch.Tensor]:
    return release_ced_state_dict()


@pytest.fixture(scope="module")
def fbank() -> torch.Tensor:
    return torch.randn(2, FRAMES, MEL, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def llm_folder(tmp_path_factory):
    """A tiny LLaMA and a LLaMA-like word-level tokenizer without a pad token, saved as a Hub folder would be."""
    folder = tmp_path_factory.mktemp("llama")
    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(folder)
    torch.manual_seed(2)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def build(llm_folder, audio=None, vision=None, **kwargs) -> LavCapForConditionalGeneration:
    kwargs.setdefault("num_frames", 4)
    kwargs.setdefault("visual_embed_dim", WIDTH)
    model, _ = build_from_components(audio, vision, llm_folder, **kwargs)
    return model.eval()


# --------------------------------------------------------------------------------------------------------------
# CED


def test_time_pos_embed_interpolation_is_half_pixel_bilinear() -> None:
    embed = torch.randn(1, 8, 1, RELEASE_TIME_PATCHES)
    torch.testing.assert_close(interpolate_time_pos_embed(embed, 64), half_pixel_linear(embed, 64))
    torch.testing.assert_close(interpolate_time_pos_embed(embed, 40), embed[..., :40])


@pytest.mark.parametrize("layout", ["release", "hub", "package"])
def test_ced_layouts_load_every_tensor_and_match_the_released_forward(
    layout, release, fbank, tmp_path
) -> None:
    if layout == "release":
        source = tmp_path / "audiotransformer_base_mAP_4999.pt"
        torch.save(release, source)
    elif layout == "hub":
        source = tmp_path / "ced-base"
        source.mkdir()
        (source / "config.json").write_text(json.dumps({"model_type": "ced", "target_length": 1012}))
        save_file(hub_ced_state_dict(release), source / "model.safetensors")
    else:
        source = tmp_path / "ced.safetensors"
        save_file({k: v.contiguous() for k, v in package_ced_state_dict(release).items()}, source)

    weights = load_state_dict(source)
    config = ced_config_from_state_dict(weights)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (
        WIDTH,
        LAYERS,
        HEADS,
    )
    assert (config.num_mel_bins, config.patch_size, config.mlp_ratio, config.qkv_bias) == (
        MEL,
        PATCH,
        4.0,
        True,
    )
    model = CedModel(config).eval()
    report = load_ced_weights(model, weights)

    loaded = model.state_dict()
    expected = expected_ced_tensors(release)
    assert set(loaded) == set(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(loaded[key], tensor, rtol=1e-6, atol=1e-6, msg=key)
    dropped = {k for k in weights if k.startswith(("front_end.", "outputlayer."))}
    assert set(report.skipped) == dropped
    assert len(report.mapped) == len(weights) - len(dropped)
    with torch.no_grad():
        tokens = model(fbank).last_hidden_state.view(2, MEL // PATCH, -1, WIDTH).mean(dim=1)
    torch.testing.assert_close(tokens, reference_ced_tokens(release, fbank), rtol=1e-4, atol=1e-4)


def test_bad_ced_checkpoints_are_value_errors(release, tmp_path) -> None:
    model = CedModel(ced_config_from_state_dict(release))
    incomplete = {k: v for k, v in release.items() if k != "blocks.1.mlp.fc2.bias"}
    with pytest.raises(ValueError, match=r"lacks 1 tensors.*blocks\.1\.mlp\.fc2\.bias"):
        load_ced_weights(model, incomplete)
    misshapen = {**release, "norm.weight": torch.ones(WIDTH + 1)}
    with pytest.raises(ValueError, match=r"norm\.weight has shape \(129,\)"):
        load_ced_weights(model, misshapen)
    with pytest.raises(ValueError, match="not a CED checkpoint"):
        ced_config_from_state_dict({"weight": torch.zeros(1)})
    garbage = tmp_path / "broken.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read checkpoint .*broken.pt"):
        load_state_dict(garbage)
    with pytest.raises(ValueError, match="no such file or folder"):
        load_state_dict(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="holds no state dict"):
        load_state_dict({"epoch": 3})


# --------------------------------------------------------------------------------------------------------------
# CLIP and the language model


@pytest.mark.parametrize("prefixed", [True, False], ids=["vision_model-prefix", "no-prefix"])
def test_clip_component_loads_the_vision_tower_and_drops_the_text_tower(
    prefixed, llm_folder, tmp_path
) -> None:
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    vision.update(image_size=32, patch_size=8)
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    text.update(vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=WIDTH)
    torch.manual_seed(3)
    clip = CLIPModel(config).eval()
    # The released openai checkpoints also store the position ids, a buffer current CLIP code recomputes.
    weights = {**clip.state_dict(), "vision_model.embeddings.position_ids": torch.arange(17)[None]}
    if not prefixed:
        weights = {k.removeprefix("vision_model."): v for k, v in weights.items()}
    folder = tmp_path / "clip"
    config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in weights.items()}, folder / "model.safetensors")

    model = build(llm_folder, vision=folder, fusion_type="visual_only")
    tower = model.model.vision_tower
    assert model.config.vision_config.projection_dim == WIDTH
    vision_weights = {
        k: v for k, v in clip.state_dict().items() if k.startswith(("vision_model.", "visual_"))
    }
    for key, tensor in vision_weights.items():
        torch.testing.assert_close(tower.state_dict()[key], tensor, rtol=0, atol=0, msg=key)
    pixels = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        ours = model.model.get_video_features(pixels).pooler_output
        theirs = clip.visual_projection(clip.vision_model(pixel_values=pixels.flatten(0, 1)).pooler_output)
    torch.testing.assert_close(ours, theirs.view(2, 4, -1))

    report = load_clip_vision_weights(tower, weights)
    position_ids = "vision_model.embeddings.position_ids" if prefixed else "embeddings.position_ids"
    assert set(report.skipped) == {k for k in weights if k.startswith(("text_", "logit_scale"))} | {
        position_ids
    }
    assert "recomputed" in report.skipped.pop(position_ids)
    assert all("text" in reason or "temperature" in reason for reason in report.skipped.values())
    with pytest.raises(ValueError, match="pass vision_config"):
        build(llm_folder, vision=folder / "model.safetensors", fusion_type="visual_only")


def test_language_model_gets_pad_and_placeholder_tokens_and_keeps_its_weights(llm_folder, release) -> None:
    saved = LlamaForCausalLM.from_pretrained(llm_folder)
    vocab = saved.config.vocab_size
    model = from_pretrained_components(
        audio=release, text=llm_folder, num_frames=4, visual_embed_dim=WIDTH, dtype=torch.bfloat16
    )
    tokenizer = model.tokenizer
    assert tokenizer.pad_token == "[PAD]" and len(tokenizer) == vocab + 3
    audio_id, video_id = tokenizer.convert_tokens_to_ids(["<|audio|>", "<|video|>"])
    assert (model.config.audio_token_id, model.config.video_token_id) == (audio_id, video_id)
    assert all(
        tokenizer.added_tokens_decoder[i].special for i in (audio_id, video_id, tokenizer.pad_token_id)
    )
    assert tokenizer.decode([audio_id, 4, video_id], skip_special_tokens=True) == WORDS[1]
    assert tokenizer("dog <|audio|><|video|>", add_special_tokens=False).input_ids[-2:] == [
        audio_id,
        video_id,
    ]
    assert (
        model.language_model.config.pad_token_id
        == tokenizer.pad_token_id
        == model.generation_config.pad_token_id
    )
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer)
    # Everything in bf16 but CED's BatchNorm, whose statistics and affine weights stay float32.
    norm = {"model.audio_tower.init_bn.weight", "model.audio_tower.init_bn.bias"}
    assert {p.dtype for n, p in model.named_parameters() if n not in norm} == {torch.bfloat16}
    assert {model.get_parameter(n).dtype for n in norm} == {torch.float32}
    ours = {
        **{f"model.{k}": v for k, v in model.language_model.state_dict().items()},
        "lm_head.weight": model.lm_head.weight,
    }
    for key, tensor in saved.state_dict().items():
        expected = tensor.to(torch.bfloat16)
        torch.testing.assert_close(ours[key][: expected.shape[0]], expected, rtol=0, atol=0, msg=key)
    assert not any(p.is_meta for p in model.parameters())


# --------------------------------------------------------------------------------------------------------------
# Released LAVCap checkpoints


class ReleasedAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.proj = (nn.Linear(WIDTH, WIDTH) for _ in range(4))


class ReleasedMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)


class ReleasedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = (
            nn.LayerNorm(WIDTH),
            ReleasedAttention(),
            nn.LayerNorm(WIDTH),
            ReleasedMlp(),
        )


class ReleasedCed(nn.Module):
    """The module tree (names only) of the released LAVCap AudioTransformer: split q/k/v, init_bn in a Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.init_bn = nn.Sequential(nn.Identity(), nn.BatchNorm2d(MEL), nn.Identity())
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(1, WIDTH, PATCH, PATCH)
        self.time_pos_embed = nn.Parameter(torch.zeros(1, WIDTH, 1, FRAMES // PATCH))
        self.freq_pos_embed = nn.Parameter(torch.zeros(1, WIDTH, MEL // PATCH, 1))
        self.blocks = nn.Sequential(*(ReleasedBlock() for _ in range(LAYERS)))
        self.norm = nn.LayerNorm(WIDTH)
        self.output_layer = nn.Sequential(nn.LayerNorm(WIDTH), nn.Linear(WIDTH, 10))


class ReleasedLavCap(nn.Module):
    """The released LAVCAP's trained parts and names: peft-wrapped CED and LLaMA, speech_llama_proj, logit_scale."""

    def __init__(self, release: dict[str, torch.Tensor], llm_folder) -> None:
        super().__init__()
        ced = ReleasedCed()
        weights = package_ced_state_dict(release)
        weights = {k.replace("init_bn.", "init_bn.1."): v for k, v in weights.items()}
        weights.update(
            {k.replace("outputlayer", "output_layer"): v for k, v in release.items() if "outputlayer" in k}
        )
        ced.load_state_dict(weights)
        gen = torch.Generator().manual_seed(4)
        ced.init_bn[1].running_mean.normal_(
            generator=gen
        )  # the trainer runs CED in train mode: statistics move
        ced.init_bn[1].running_var.uniform_(0.5, 1.5, generator=gen)
        lora = {"r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.1}
        self.audio_encoder = get_peft_model(ced, LoraConfig(target_modules=["q_proj", "v_proj"], **lora))
        llama = LlamaForCausalLM.from_pretrained(llm_folder)
        llama.resize_token_embeddings(llama.config.vocab_size + 1)  # the released code adds [PAD]
        self.llama_decoder = get_peft_model(llama, LoraConfig(task_type="CAUSAL_LM", **lora))
        self.speech_llama_proj = nn.Linear(WIDTH, 64)
        self.logit_scale = nn.Parameter(torch.tensor(3.0))
        for name, parameter in self.named_parameters():
            if "lora_B" in name:  # peft starts B at zero; a trained adapter has not
                nn.init.normal_(parameter, std=0.1, generator=gen)

    def checkpoint(self, trainable_only: bool) -> dict:
        """`{"model": state_dict, "config": ...}` as the released runner saves it."""
        state = self.state_dict()
        if trainable_only:
            frozen = {n for n, p in self.named_parameters() if not p.requires_grad}
            state = {k: v for k, v in state.items() if k not in frozen}
        # The released LLaMA registers its rotary frequencies as a persistent buffer.
        state["llama_decoder.base_model.model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        config = {"fusion_type": "ot_tempcat_QAV_add", "enc_lora_alpha": ALPHA, "dec_lora_alpha": ALPHA}
        config.update(spec_f_mean=True, use_speech_Qformer=False, av_embed_norm=False, num_sinkhorn_iter=50)
        return {"model": state, "config": {"model": config}, "epoch": 3, "scaler": None}

    def lora_update(self, module: nn.Module) -> torch.Tensor:
        return ALPHA / RANK * module.lora_B["default"].weight @ module.lora_A["default"].weight

    def merged_release_weights(self, release: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`release` with the LoRA updates in its fused qkv and the trained BatchNorm statistics."""
        weights = dict(release)
        for i, block in enumerate(self.audio_encoder.base_model.model.blocks):
            q, k, v = release[f"blocks.{i}.attn.qkv.weight"].chunk(3)
            q, v = q + self.lora_update(block.attn.q_proj), v + self.lora_update(block.attn.v_proj)
            weights[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, k, v])
        bn = self.audio_encoder.base_model.model.init_bn[1]
        weights.update({"init_bn.1.running_mean": bn.running_mean, "init_bn.1.running_var": bn.running_var})
        return weights


@pytest.fixture(scope="module")
def released(release, llm_folder) -> ReleasedLavCap:
    torch.manual_seed(5)
    return ReleasedLavCap(release, llm_folder).eval()


@pytest.fixture(scope="module")
def merged(released, release, llm_folder) -> LavCapForConditionalGeneration:
    """Our model from the same components with the released checkpoint merged in."""
    model = build(llm_folder, audio=release)
    convert_official_checkpoint(released.checkpoint(trainable_only=True), model)
    return model


def lavcap_batch(model: LavCapForConditionalGeneration, seed: int = 6) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    audio, video = model.config.placeholder_counts
    caption = torch.randint(3, 3 + len(WORDS), (2, 5), generator=gen)
    placeholders = [model.config.audio_token_id] * audio + [model.config.video_token_id] * video
    input_ids = torch.cat(
        [torch.ones(2, 1, dtype=torch.long), torch.tensor([placeholders] * 2), caption], dim=1
    )
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "input_features": torch.randn(2, FRAMES, MEL, generator=gen),
        "video_embeds": torch.randn(2, 4, WIDTH, generator=gen),
    }


@pytest.mark.parametrize("trainable_only", [True, False], ids=["trainer-checkpoint", "full-state-dict"])
def test_released_checkpoint_merges_into_the_model(
    trainable_only, released, release, llm_folder, fbank, tmp_path
):
    path = tmp_path / "checkpoint_best.pth"
    torch.save(released.checkpoint(trainable_only), path)
    model = build(llm_folder, audio=release)
    placeholder_rows = model.get_input_embeddings().weight[-3:].clone()
    report = convert_official_checkpoint(path, model)

    ced = released.audio_encoder.base_model.model
    ours = model.model.audio_tower
    for i in range(LAYERS):
        q, k, v = release[f"blocks.{i}.attn.qkv.weight"].chunk(3)
        attn = ced.blocks[i].attn
        torch.testing.assert_close(ours.blocks[i].attn.q_proj.weight, q + released.lora_update(attn.q_proj))
        torch.testing.assert_close(ours.blocks[i].attn.v_proj.weight, v + released.lora_update(attn.v_proj))
        torch.testing.assert_close(ours.blocks[i].attn.k_proj.weight, k, rtol=0, atol=0)
    torch.testing.assert_close(ours.init_bn.running_mean, ced.init_bn[1].running_mean, rtol=0, atol=0)
    torch.testing.assert_close(ours.init_bn.running_var, ced.init_bn[1].running_var, rtol=0, atol=0)
    torch.testing.assert_close(model.model.multi_modal_projector.weight, released.speech_llama_proj.weight)
    torch.testing.assert_close(model.model.multi_modal_projector.bias, released.speech_llama_proj.bias)
    assert model.model.fusion.logit_scale.item() == 3.0
    llama = released.llama_decoder.base_model.model
    for i in range(2):
        base = llama.model.layers[i].self_attn.q_proj
        torch.testing.assert_close(
            model.language_model.layers[i].self_attn.q_proj.weight,
            base.base_layer.weight + released.lora_update(base),
        )

    assert report.mapped["speech_llama_proj.weight"] == "model.multi_modal_projector.weight"
    assert report.mapped["logit_scale"] == "model.fusion.logit_scale"
    lora_key = "audio_encoder.base_model.model.blocks.0.attn.q_proj.lora_A.default.weight"
    assert report.mapped[lora_key] == "model.audio_tower.blocks.0.attn.q_proj.weight (+ LoRA)"
    assert (
        "rotary"
        in report.skipped["llama_decoder.base_model.model.model.layers.0.self_attn.rotary_emb.inv_freq"]
    )
    if trainable_only:
        assert "frozen CED" in report.missing["model.audio_tower.blocks.0.attn.k_proj.weight"]
        assert "frozen LLM" in report.missing["model.language_model.embed_tokens.weight"]
    else:
        assert "classifier" in report.skipped["audio_encoder.base_model.model.output_layer.1.weight"]
        base_key = "audio_encoder.base_model.model.blocks.0.attn.q_proj.base_layer.weight"
        assert report.mapped[base_key] == "model.audio_tower.blocks.0.attn.q_proj.weight"
        # The released vocabulary has [PAD] only; the placeholder rows keep their values.
        embeddings = model.get_input_embeddings().weight
        released_rows = llama.model.embed_tokens.weight
        torch.testing.assert_close(embeddings[: released_rows.shape[0]], released_rows, rtol=0, atol=0)
        torch.testing.assert_close(embeddings[-2:], placeholder_rows[-2:], rtol=0, atol=0)
        assert not report.missing.get("model.language_model.embed_tokens.weight")

    with torch.no_grad():
        tokens = model.model.get_audio_features(fbank).pooler_output
        embeds = torch.randn(2, 7, 64)
        logits = model(inputs_embeds=embeds).logits
        released_logits = released.llama_decoder(inputs_embeds=embeds).logits
    reference = reference_ced_tokens(released.merged_release_weights(release), fbank)
    torch.testing.assert_close(tokens, reference, rtol=1e-4, atol=1e-4)
    vocab = released_logits.shape[-1]
    torch.testing.assert_close(logits[..., :vocab], released_logits, rtol=1e-4, atol=1e-5)


def test_released_checkpoint_as_adapters_equals_merged(released, merged, release, llm_folder) -> None:
    checkpoint = released.checkpoint(trainable_only=True)
    peft_model = apply_lora(
        build(llm_folder, audio=release), lavcap_lora_config(r=RANK, lora_alpha=ALPHA)
    ).eval()
    report = convert_official_checkpoint(checkpoint, peft_model)

    base = peft_model.get_base_model()
    q_proj = base.model.audio_tower.blocks[0].attn.q_proj
    released_q = released.audio_encoder.base_model.model.blocks[0].attn.q_proj
    torch.testing.assert_close(
        q_proj.lora_A["default"].weight, released_q.lora_A["default"].weight, rtol=0, atol=0
    )
    torch.testing.assert_close(
        q_proj.base_layer.weight, release["blocks.0.attn.qkv.weight"][:WIDTH], rtol=0, atol=0
    )
    projector = base.model.multi_modal_projector.modules_to_save["default"]
    torch.testing.assert_close(projector.weight, released.speech_llama_proj.weight, rtol=0, atol=0)
    assert base.model.fusion.modules_to_save["default"].logit_scale.item() == 3.0
    assert report.mapped["logit_scale"] == "model.fusion.logit_scale"
    assert "frozen CED" in report.missing["model.audio_tower.blocks.0.attn.q_proj.weight"]

    batch = lavcap_batch(merged)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).logits, merged(**batch).logits, rtol=1e-4, atol=1e-4)

    with pytest.raises(ValueError, match=r"scale 16, the adapter rank 2 and scale 4.*lora_alpha=32"):
        convert_official_checkpoint(checkpoint, peft_model, lora_alpha=4 * ALPHA)


def test_released_config_is_checked(released, release, llm_folder) -> None:
    checkpoint = released.checkpoint(trainable_only=True)
    assert official_config_kwargs(checkpoint) == {"fusion_type": "ot_att", "sinkhorn_iterations": 50}
    model = build(llm_folder, audio=release, fusion_type="ot_concat")
    with pytest.raises(ValueError, match="trained with fusion_type 'ot_att'"):
        convert_official_checkpoint(checkpoint, model)
    for change, message in (
        ({"use_speech_Qformer": True}, "Q-Former"),
        ({"spec_f_mean": False}, "frequency mean pooling"),
        ({"fusion_type": "chancat_afQF"}, "no equivalent"),
    ):
        broken = {**checkpoint, "config": {"model": {**checkpoint["config"]["model"], **change}}}
        with pytest.raises(ValueError, match=message):
            official_config_kwargs(broken)


RELEASED_ROWS = {
    "ot_tempcat_QAV_add": "ot_att",
    "ot_tempcat": "ot_concat",
    "ot_tempcat_bfQF": "ot_concat",
    "ot_tempcat_afQF": "ot_concat",
    "ot_chancat": "ot_channel_concat",
    "ot_chancat_bfQF": "ot_channel_concat",
    "ot_chancat_afQF": "ot_channel_concat",
    "ot_crossattn": "ot_cross_attention",
    "tempcat_bfQF": "concat",
    "tempcat_afQF": "concat_once",
    "chancat_bfQF": "channel_concat",
    "crossattn": "audio_only",
}
"""Released `fusion_type` (no Q-Former) -> the fusion type here that computes the same, read off the released forward:
`ot_*` normalise and add the OT loss; `ot_tempcat*` concatenate tokens, `QAV_add` adds the plan-weighted tokens,
`ot_chancat*` pad the frames over the audio positions, `ot_crossattn` runs its attention; `tempcat_bfQF`
concatenates the frames before and again after the (skipped) Q-Former, `tempcat_afQF` only after; `crossattn`
falls through to the audio tokens."""


def released_config(fusion_type: str) -> dict:
    return {
        "config": {"model": {"fusion_type": fusion_type, "spec_f_mean": True, "use_speech_Qformer": False}}
    }


@pytest.mark.parametrize("released_type", RELEASED_ROWS)
def test_each_released_fusion_type_converts_to_the_row_that_computes_it(released_type: str) -> None:
    assert OFFICIAL_FUSION_TYPES == RELEASED_ROWS
    assert official_config_kwargs(released_config(released_type)) == {
        "fusion_type": RELEASED_ROWS[released_type]
    }


@pytest.mark.parametrize(
    "released_type",
    # The released forward fails for the first three without the Q-Former (no projector, or a 2C-wide projector on
    # C-wide tokens); the others are names from its config comments or this package's own.
    [
        "aud_embed_only",
        "vis_embed_only",
        "chancat_afQF",
        "temp_cat_bfQF",
        "opt_trans_chan",
        "cross_attention",
    ],
)
def test_a_released_fusion_type_without_an_equivalent_is_refused(released_type: str) -> None:
    with pytest.raises(ValueError, match=rf"fusion_type '{released_type}' has no equivalent") as error:
        official_config_kwargs(released_config(released_type))
    for theirs, ours in RELEASED_ROWS.items():
        assert f"{theirs} -> {ours}" in str(error.value)


@pytest.mark.parametrize(
    ("released_type", "ours", "written"),
    [("ot_crossattn", "ot_cross_attention", True), ("crossattn", "audio_only", False)],
)
def test_released_cross_attention_weights(released_type, ours, written, release, llm_folder) -> None:
    """`ot_crossattn`'s attention lands in the fusion; `crossattn`'s, which its forward never calls, is skipped."""
    attention = nn.MultiheadAttention(WIDTH, WIDTH // 64, batch_first=True)
    state = {f"cross_attn.{k}": torch.randn(v.shape) for k, v in attention.state_dict().items()}
    checkpoint = {"model": {**state, "logit_scale": torch.tensor(2.0)}, **released_config(released_type)}
    model = build(llm_folder, audio=release, **official_config_kwargs(checkpoint))
    assert model.config.fusion_type == ours
    report = convert_official_checkpoint(checkpoint, model)
    for key, tensor in state.items():
        target = f"model.fusion.{key}"
        if written:
            assert report.mapped[key] == target
            torch.testing.assert_close(model.get_parameter(target), tensor, rtol=0, atol=0)
        else:
            assert f"has no {target}" in report.skipped[key]
    assert (report.mapped.get("logit_scale") == "model.fusion.logit_scale") == written


@pytest.mark.parametrize("adapters", [False, True], ids=["merged", "adapters"])
def test_convert_command_saves_a_loadable_model(
    adapters, released, merged, release, llm_folder, tmp_path
) -> None:
    checkpoint = tmp_path / "checkpoint_best.pth"
    torch.save(released.checkpoint(trainable_only=True), checkpoint)
    torch.save(release, tmp_path / "ced.pt")
    parser = argparse.ArgumentParser()
    add_convert_arguments(parser)
    argv = ["--audio", str(tmp_path / "ced.pt"), "--text", str(llm_folder), "--checkpoint", str(checkpoint)]
    argv += ["--num-frames", "4", "--visual-embed-dim", str(WIDTH), "--output-dir", str(tmp_path / "out")]
    report = run_convert(parser.parse_args(argv + (["--adapters"] if adapters else [])))
    assert report.mapped["checkpoint:speech_llama_proj.weight"] == "model.multi_modal_projector.weight"

    loaded = LavCapForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    if adapters:
        loaded = PeftModel.from_pretrained(loaded, tmp_path / "out" / "adapter").eval()
    assert loaded.config.fusion_type == "ot_att"
    batch = lavcap_batch(merged)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, merged(**batch).logits, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def float16_llm_folder(llm_folder, tmp_path_factory):
    """The tiny LLaMA stored in float16, as meta-llama/Llama-2-7b-chat-hf is, with its tokenizer."""
    folder = tmp_path_factory.mktemp("llama-float16")
    LlamaForCausalLM.from_pretrained(llm_folder).to(torch.float16).save_pretrained(folder)
    PreTrainedTokenizerFast.from_pretrained(llm_folder).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("dtype", "cast_all", "expected"),
    [("bfloat16", False, torch.bfloat16), ("bfloat16", True, torch.bfloat16), (None, False, torch.float16)],
    ids=["bfloat16", "bfloat16-cast-all", "stored-dtype"],
)
def test_conversion_merges_in_float32_rounds_once_and_keeps_ced_and_the_projector_float32(
    dtype, cast_all, expected, released, release, float16_llm_folder, tmp_path
) -> None:
    """LoRA merged into a float16-stored LLaMA: each merged weight is the float32 sum rounded once to the target dtype
    (bf16 rounding of W, then of W + update, loses most of a small update). CED (BatchNorm included), the OT logit
    scale and the projector stay float32 unless `--cast-all`, also through `from_pretrained`; the report says so."""
    checkpoint = tmp_path / "checkpoint_best.pth"
    torch.save(released.checkpoint(trainable_only=True), checkpoint)
    torch.save(release, tmp_path / "ced.pt")
    parser = argparse.ArgumentParser()
    add_convert_arguments(parser)
    argv = ["--audio", str(tmp_path / "ced.pt"), "--text", str(float16_llm_folder)]
    argv += ["--checkpoint", str(checkpoint), "--num-frames", "4", "--visual-embed-dim", str(WIDTH)]
    argv += ["--output-dir", str(tmp_path / "out")] + (["--dtype", dtype] if dtype else [])
    argv += ["--cast-all"] if cast_all else []
    report = run_convert(parser.parse_args(argv))

    stored = LlamaForCausalLM.from_pretrained(
        float16_llm_folder, **{dtype_kwarg(): torch.float16}
    ).state_dict()
    llama = released.llama_decoder.base_model.model.model
    ced = released.audio_encoder.base_model.model
    kept = expected if cast_all else torch.float32
    norm = {"weight", "bias", "running_mean", "running_var"}
    for loading in ({}, {dtype_kwarg(): "auto"}, {dtype_kwarg(): torch.bfloat16}):
        model = LavCapForConditionalGeneration.from_pretrained(tmp_path / "out", **loading)
        if model.language_model.dtype == expected:  # not cast again by loading a float16 folder in bf16
            for i in range(2):
                attention, ours = llama.layers[i].self_attn, model.language_model.layers[i].self_attn
                for name in ("q_proj", "v_proj"):
                    weight = stored[f"model.layers.{i}.self_attn.{name}.weight"]
                    merged = (weight.float() + released.lora_update(getattr(attention, name))).to(expected)
                    assert torch.equal(getattr(ours, name).weight, merged), (loading, i, name)
                key = f"model.layers.{i}.self_attn.k_proj.weight"
                assert torch.equal(ours.k_proj.weight, stored[key].to(expected))
        tower = model.model.audio_tower
        for i in range(LAYERS):
            q, _, v = release[f"blocks.{i}.attn.qkv.weight"].chunk(3)
            attention = ced.blocks[i].attn
            for name, weight in (("q_proj", q), ("v_proj", v)):
                merged = weight + released.lora_update(getattr(attention, name))
                assert torch.equal(getattr(tower.blocks[i].attn, name).weight, merged.to(kept))
        assert {p.dtype for p in tower.blocks.parameters()} == {kept}
        projector = model.model.multi_modal_projector
        assert torch.equal(projector.weight, released.speech_llama_proj.weight.to(kept))
        assert model.model.fusion.logit_scale.dtype == kept and model.model.fusion.logit_scale.item() == 3.0
        assert {getattr(tower.init_bn, n).dtype for n in norm} == {torch.float32}
        assert torch.equal(tower.init_bn.running_mean, ced.init_bn[1].running_mean)
        if model.language_model.dtype == expected:
            assert part_dtypes(model) == report.dtypes, loading
    kept_name = str(kept).removeprefix("torch.")
    assert report.dtypes == {
        "language_model": str(expected).removeprefix("torch."),
        "lm_head": str(expected).removeprefix("torch."),
        "audio_tower": kept_name,
        "audio_tower.init_bn": "float32",
        "fusion": kept_name,
        "multi_modal_projector": kept_name,
    }
    assert f"audio_tower {kept_name}; audio_tower.init_bn float32" in report.summary()
