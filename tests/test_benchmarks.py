"""Smoke runs of the benchmarks in benchmarks/, the behaviour their baselines rely on, and gradient checkpointing of LavCapForConditionalGeneration (full fine-tuning and the LoRA recipe of the 7B path)."""

from __future__ import annotations

import copy
import functools
import importlib
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from lavcap_hf import LavCapForConditionalGeneration
from lavcap_hf.lora import apply_lora, lavcap_lora_config
from lavcap_hf.model.modeling_ced import CedBlock
from lavcap_hf.testing.configs import tiny_lavcap_config
from lavcap_hf.testing.tokenizers import word_level_tokenizer
from lavcap_hf.training.compat import enable_activation_checkpointing

# Training runs, benchmarks and launched processes: the opt-in integration tier (pyproject.toml).
pytestmark = pytest.mark.integration

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_caption  # noqa: E402
import bench_features  # noqa: E402
import bench_generate  # noqa: E402
import bench_memory  # noqa: E402
import bench_ot  # noqa: E402
import bench_train  # noqa: E402

LLAMA_2_7B_PARAMETERS = 6_738_415_616
"""Parameter count of Llama-2-7b-hf (32000-token vocabulary, untied embeddings), as published."""


def markdown_rows(text: str, header_start: str, exact: bool = False) -> list[dict[str, str]]:
    """The rows of the first markdown table whose header line starts with (`exact`: is) `header_start`, as
    {column: cell}."""
    lines = text.splitlines()
    start = next(
        i
        for i, line in enumerate(lines)
        if (line == header_start if exact else line.startswith(header_start))
    )
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True)))
    return rows


# -- bench_ot and bench_train ---------------------------------------------------------------------------------------


@pytest.mark.stack_independent  # torch and the OT module only (held to it, tests/conftest.py)
def test_bench_ot_tables_agree_with_the_per_sample_loop(capsys):
    bench_ot.main(["--device", "cpu", "--batch-sizes", "3", "--repeats", "1", "--threads", "1"])
    out = capsys.readouterr().out
    header = "| batch | batched (ms) | per-sample loop (ms) | speed-up |"
    step = markdown_rows(out, header + " max abs diff | peak MiB batched | peak MiB loop |", exact=True)
    forward = markdown_rows(out, header, exact=True)
    sinkhorn = markdown_rows(out, header + " max abs diff |", exact=True)
    for rows in (step, forward, sinkhorn):
        assert [row["batch"] for row in rows] == ["3"]
        assert float(rows[0]["speed-up"].rstrip("x")) > 0
    assert float(step[0]["max abs diff"]) < 1e-5
    assert float(sinkhorn[0]["max abs diff"]) < 1e-5
    assert float(step[0]["peak MiB batched"]) > 0


@pytest.mark.parametrize("visual", ["embeds", "frames"])
def test_bench_train_small_reports_throughput_and_the_ot_share(visual, capsys):
    # A CPU has no known peak: the limit column reads "-" unless a peak is given (here for the frames case).
    peak = ["--peak-tflops", "0.01"] if visual == "frames" else []
    bench_train.main(
        ["--config", "small", "--device", "cpu", "--steps", "3", "--warmup", "1", "--batch-size", "2"]
        + ["--threads", "1", "--visual", visual, *peak]
    )
    (row,) = markdown_rows(capsys.readouterr().out, "| config | visual |")
    assert row["visual"] == visual and row["dtype"] == "float32" and row["steps timed"] == "2"
    assert float(row["samples/s"]) > 0
    ot_ms, step_ms = float(row["OT module (ms)"]), float(row["median step (ms)"])
    assert 0 < ot_ms < step_ms
    assert float(row["OT share"].rstrip("%")) == pytest.approx(100 * ot_ms / step_ms, abs=0.1)
    assert float(row["mean / median"]) > 0
    if not peak:
        assert row["limit (ms)"] == row["median / limit"] == "-"
        return
    limit_ms = float(row["limit (ms)"])
    assert limit_ms > 0
    assert float(row["median / limit"].rstrip("x")) == pytest.approx(step_ms / limit_ms, rel=0.05, abs=0.05)


GPU_SCRIPT_RUNS = (
    "train_embeds",
    "generate",
    "ot",
    "train_embeds_checkpointing",
    "train_frames",
    "caption",
    "memory",
)

RECORD_ARGV = """#!/bin/sh
# Records this call's arguments, one file per call in call order, NUL-separated.
n=$(ls "$ARGV_DIR" | wc -l)
printf '%s\\0' "$@" > "$ARGV_DIR/$(printf '%03d' "$n")"
echo recorded "$1"
"""


def parse_recorded_command_line(argv: list[str]) -> str:
    """Runs what a recorded `python ARGS` call would have run first: a `-c` program is compiled and run here; a
    benchmark's own argument parser parses its arguments (a bad one exits, which fails the test). Returns what ran."""
    if argv[0] == "-c":
        exec(compile(argv[1], "<python -c>", "exec"), {})
        return "-c"
    path = Path(argv[0])
    assert Path(bench_ot.__file__).with_name(path.name).is_file(), argv
    module = importlib.import_module(path.stem)
    module.parse_args(argv[1:])
    return path.stem


def test_gpu_script_builds_command_lines_that_each_benchmark_accepts(tmp_path):
    """benchmarks/gpu_paper_size.sh needs a CUDA GPU, which the test machines lack. Its python is replaced by a shim
    that records each command line the script built, and nvidia-smi by a stub; the script's control flow and every
    command line it builds are real, and each is then parsed by the benchmark's own argument parser here (in this
    process: one import of each benchmark instead of a fresh interpreter per command line)."""
    bin_dir, argv_dir = tmp_path / "bin", tmp_path / "argv"
    bin_dir.mkdir()
    argv_dir.mkdir()
    for name, body in (("python", RECORD_ARGV), ("nvidia-smi", "#!/bin/sh\necho stub GPU\n")):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHON": str(bin_dir / "python"),
        "ARGV_DIR": str(argv_dir),
    }
    script = Path(bench_ot.__file__).with_name("gpu_paper_size.sh")
    logs = tmp_path / "logs"
    result = subprocess.run(
        ["bash", str(script), str(logs)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    for name in GPU_SCRIPT_RUNS:
        assert f"== {name}: exit 0" in result.stdout, result.stdout
    calls = [path.read_bytes().split(b"\0")[:-1] for path in sorted(argv_dir.iterdir())]
    ran = [parse_recorded_command_line([arg.decode() for arg in argv]) for argv in calls]
    assert ran.count("-c") == 1 and len([name for name in ran if name.startswith("bench_")]) == len(
        GPU_SCRIPT_RUNS
    )
    assert sorted(path.stem for path in logs.iterdir()) == sorted(GPU_SCRIPT_RUNS)


# -- bench_generate -------------------------------------------------------------------------------------------------


def test_bench_generate_quick_prints_every_variant_and_batch(capsys):
    args = [
        "--quick",
        "--batch-sizes",
        "1",
        "2",
        "--naive-batch-sizes",
        "2",
        "--repeats",
        "1",
        "--max-new-tokens",
        "2",
    ]
    bench_generate.main(args)
    out = capsys.readouterr().out
    rows = markdown_rows(out, "| variant |")
    cpu_variants = [v for v in bench_generate.VARIANTS if v not in bench_generate.CUDA_ONLY_VARIANTS]
    expected = {(v, b) for v in cpu_variants for b in (1, 2)} - {("naive", 1)}
    assert {(row["variant"], int(row["batch"])) for row in rows} == expected
    for row in rows:
        # captions/s = batch / latency, within the rounding of the two printed figures, at any machine speed.
        latency_ms, batch = row["latency (ms)"], int(row["batch"])
        half_step = 0.5 * 10.0 ** -len(latency_ms.partition(".")[2])
        assert float(latency_ms) > half_step
        fastest = batch / ((float(latency_ms) - half_step) / 1e3)
        slowest = batch / ((float(latency_ms) + half_step) / 1e3)
        assert slowest - 0.005 <= float(row["captions/s"]) <= fastest + 0.005
        assert 0 <= int(row["encoders' share"].rstrip("%")) <= 100
        assert row["captions = cached"] == ("reference" if row["variant"] == "cached" else "yes")
    assert re.search(r"^batch 2: naive / cached = [\d.]+x", out, re.MULTILINE)
    assert "device: cpu" in out and "beam 4" in out


def _tiny_generation_setup():
    tokenizer = word_level_tokenizer([])
    config = bench_generate.build_config("quick", tokenizer)
    torch.manual_seed(0)
    model = bench_generate.build_model(config, torch.device("cpu"), torch.float32)
    inputs = bench_generate.build_inputs(config, tokenizer, 2, torch.device("cpu"))
    kwargs = {
        "num_beams": 3,
        "max_new_tokens": 4,
        "min_new_tokens": 4,
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    return model, inputs, kwargs


@pytest.mark.parametrize(
    "variant, expected_calls",
    [
        ("cached", [2]),  # once, on the 2 clips before beam expansion
        ("per-beam-prefill", [2]),  # the same encoding; only the prompt is read once per beam
        ("beam-copies", [6]),  # once, on batch * beams = 2 * 3 clips
        ("naive", [6, 6, 6, 6]),  # prefill + every one of the 3 later steps
    ],
)
def test_encoder_calls_per_variant(variant, expected_calls):
    """The baselines do what the benchmark says: count the media encodings (`get_multimodal_features`) and their
    batch sizes."""
    model, inputs, kwargs = _tiny_generation_setup()
    calls = []
    encode = model.model.get_multimodal_features

    def counted_encode(*args, **kwargs):
        output = encode(*args, **kwargs)
        calls.append(output.multimodal_embeds.shape[0])
        return output

    model.model.get_multimodal_features = counted_encode
    sequences = bench_generate.variant_call(variant, model, inputs, **kwargs)()
    assert calls == expected_calls
    assert sequences.shape[0] == 2
    # The naive wrapper is removed afterwards: a plain generate() encodes once again.
    calls.clear()
    model.generate(**inputs, **kwargs)
    assert calls == [2]


def test_baseline_variants_match_generate():
    model, inputs, kwargs = _tiny_generation_setup()
    reference = model.generate(**inputs, **kwargs)  # prompt + 4 new tokens
    for variant in ("beam-copies", "naive"):
        assert torch.equal(bench_generate.variant_call(variant, model, inputs, **kwargs)(), reference), (
            variant
        )


def test_memory_bound_of_one_paper_sized_clip_matches_the_estimate_by_hand():
    """One clip, beam 4, 16 new tokens, bf16 at the H200's 4.8 TB/s: the decoder's 6.7 G parameters are 13.5 GB,
    read 16 times (prefill + 15 steps): 45 ms; the towers (CLIP ViT-L/14, CED-base) and a KV cache of 4 rows of
    about 120 tokens add about 1 ms. The bound must land there, and grow with the batch by the KV cache only."""
    tokenizer = word_level_tokenizer([])
    config = bench_generate.build_config("paper", tokenizer)
    model = bench_generate.build_model(config, "meta", torch.bfloat16)
    bound = functools.partial(bench_generate.memory_bound_seconds, model, config, beams=4, new_tokens=16)
    one = bound(clips=1, prompt_length=120, bandwidth=4.8e12)
    assert 0.045 < one < 0.048
    thirty_two = bound(clips=32, prompt_length=120, bandwidth=4.8e12)
    kv_per_row = (thirty_two - one) / (31 * 4)  # seconds of KV reads per beam row
    layers, kv_width = 32, 2 * 32 * 128 * 2  # K and V, 32 heads of 128, bf16
    expected = layers * kv_width * sum(range(120, 135)) / 4.8e12
    assert kv_per_row == pytest.approx(expected, rel=1e-6)
    assert bench_generate.memory_bound_seconds(model, config, 1, 4, 120, 16, None) is None


def test_paper_size_builds_on_meta_and_fails_clearly_without_gpu(capsys):
    with pytest.raises(SystemExit) as raised:
        bench_generate.main(["--paper-size", "--device", "cpu"])
    assert "--paper-size needs a CUDA GPU" in str(raised.value.code)
    out = capsys.readouterr().out
    llama = re.search(r"LLaMA: 4096-d x 32 layers, vocab 32000 \(([\d,]+) params\)", out)
    assert llama and int(llama.group(1).replace(",", "")) == LLAMA_2_7B_PARAMETERS
    assert "CLIP: 20 frames of 224 px / 14 px patches -> 257 tokens each, 1024-d x 24 layers" in out


# -- bench_features -------------------------------------------------------------------------------------------------


def test_bench_features_quick_prints_stages_and_loader_rows(capsys, tmp_path):
    args = ["--quick", "--num-clips", "2", "--duration", "1", "--batch-size", "1", "--repeats", "1"]
    bench_features.main([*args, "--workers", "0", "2", "--clips-dir", str(tmp_path)])
    out = capsys.readouterr().out
    stages = markdown_rows(out, "| stage |")
    assert [row["stage"] for row in stages] == [*bench_features.STAGES, "**all four**"]
    assert all(float(row["ms per clip"]) > 0 for row in stages)
    total_ms = float(stages[-1]["ms per clip"])
    per_core = float(re.search(r"per core: ([\d.]+) clips/s", out).group(1))
    assert per_core == pytest.approx(1e3 / total_ms, rel=0.02)
    loader = markdown_rows(out, "| collator |")
    assert {(row["collator"], int(row["workers"])) for row in loader} == {
        (c, w) for c in ("train", "eval") for w in (0, 2)
    }
    assert all(float(row["clips/s"]) > 0 and float(row["CPU ms per clip"]) > 0 for row in loader)
    assert len(list(tmp_path.glob("train/*.mp4"))) == 2


# -- bench_caption --------------------------------------------------------------------------------------------------


def test_bench_caption_quick_prints_the_bound_and_a_row_per_worker_count(capsys, tmp_path):
    # 3 clips cycling over 2 files, batch 2: two batches, the second holding a file of the first.
    bench_caption.main(
        [
            "--quick",
            "--num-clips",
            "3",
            "--distinct-clips",
            "2",
            "--workers",
            "0",
            "2",
            "--clips-dir",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    rows = markdown_rows(out, "| pipeline |")
    assert [(row["pipeline"], row["workers"]) for row in rows] == [
        ("decode + featurise only", "-"),
        ("model only (media pre-featurised)", "-"),
        ("lavcap caption", "0"),
        ("lavcap caption", "2"),
    ]
    rates = [float(row["clips/s"]) for row in rows]
    assert all(rate > 0 for rate in rates)
    bound = rates[1]

    def assert_share_of_bound(rate: float, share: str) -> None:
        # share = rate / model-only rate, within the rounding of the printed rates.
        low, high = (rate - 0.005) / (bound + 0.005), (rate + 0.005) / (bound - 0.005)
        assert round(100 * low) - 1 <= int(share.rstrip("%")) <= round(100 * high) + 1

    for row in rows[2:]:
        assert_share_of_bound(float(row["clips/s"]), row["of the bound"])
        later = float(row["clips/s after batch 1"])
        assert later > 0
        assert_share_of_bound(later, row["of the bound after batch 1"])
    serial = float(re.search(r"serial expectation without workers: ([\d.]+) clips/s", out).group(1))
    assert serial == pytest.approx(1 / (1 / rates[0] + 1 / bound), rel=0.02)
    needed = int(re.search(r"workers the model needs at one process's decode rate: (\d+)", out).group(1))
    ratios = ((bound - 0.005) / (rates[0] + 0.005), (bound + 0.005) / (rates[0] - 0.005))
    assert needed in {math.ceil(ratio) for ratio in ratios}
    assert "3 clips (2 files)" in out and "batch 2, beam 4" in out
    assert len(list(tmp_path.rglob("*.mp4"))) == 2


@pytest.mark.parametrize(
    ("device", "cuda_found", "reasons"),
    [
        ("cpu", False, ["got --device cpu (give --device cuda)", "no CUDA device"]),
        ("cuda", False, ["no CUDA device"]),
        ("cpu", True, ["got --device cpu (give --device cuda)"]),
    ],
)
def test_bench_caption_paper_size_without_cuda_exits_naming_cuda_before_writing_clips(
    device, cuda_found, reasons, monkeypatch, tmp_path
):
    # The test machines have no GPU: torch.cuda.is_available is set, so that the test takes the same path on one.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_found)
    with pytest.raises(SystemExit) as exited:
        bench_caption.main(["--paper-size", "--device", device, "--clips-dir", str(tmp_path)])
    message = str(exited.value.code)
    assert message.startswith("--paper-size needs a CUDA GPU (the bfloat16 weights alone take 13.3 GiB)")
    assert all(reason in message for reason in reasons)
    assert ("no CUDA device" in message) is not cuda_found
    assert not any(tmp_path.iterdir())


def test_bench_caption_paper_size_defaults():
    args = bench_caption.parse_args(["--paper-size", "--device", "cuda"])
    assert (args.profile, args.dtype, args.batch_size, args.workers) == (
        "paper",
        "bfloat16",
        16,
        [0, 2, 4, 8],
    )
    assert args.num_clips > args.distinct_clips and args.duration == 10.0
    assert bench_caption.parse_args(["--paper-size", "--dtype", "float16"]).dtype == "float16"
    assert bench_caption.parse_args([]).dtype == "float32"


# -- gradient checkpointing -----------------------------------------------------------------------------------------


def _training_batch(config, batch: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    audio_count, video_count = config.placeholder_counts
    prompt = [1] + [config.audio_token_id] * audio_count + [config.video_token_id] * video_count
    input_ids = torch.tensor([prompt + [5, 6, 7, 2]] * batch)
    labels = input_ids.clone()
    labels[:, : len(prompt)] = -100
    size = config.vision_config.image_size
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "input_features": torch.randn(batch, config.audio_config.target_length, 64, generator=generator),
        "pixel_values_videos": torch.randn(batch, config.num_frames, 3, size, size, generator=generator),
    }


FIRST_NORM = {CedBlock: "norm1", CLIPEncoderLayer: "layer_norm1", LlamaDecoderLayer: "input_layernorm"}
"""The first submodule each block type runs."""


def count_block_runs(model) -> dict[str, int]:
    """Live counts of block runs per block type, recomputations included.

    A run is seen as a call of the block's first norm (a forward pre-hook): recomputation may stop early, before
    post-hooks run, and Transformers 5 checkpoints a layer's `forward` inside its `__call__`, past the layer's own
    hooks.
    """
    counts: dict[str, int] = {}
    for module in model.modules():
        if type(module) in FIRST_NORM:
            name = type(module).__name__
            norm = getattr(module, FIRST_NORM[type(module)])
            norm.register_forward_pre_hook(
                lambda *_, name=name: counts.__setitem__(name, counts.get(name, 0) + 1)
            )
    return counts


def _loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and the gradients of all trainable parameters after one training forward + backward."""
    model.train()
    loss = model(**batch).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == trainable, f"no gradient for {sorted(trainable - set(grads))}"
    return loss.detach(), grads


def _model_pair(use_lora: bool):
    """A tiny model and a copy with gradient checkpointing on, with the paper's LoRA adapters when asked (without
    dropout, so that both see the same computation), and a training batch."""
    config = tiny_lavcap_config()
    torch.manual_seed(0)
    base = LavCapForConditionalGeneration(config)
    models = []
    for _ in range(2):
        model = copy.deepcopy(base)
        torch.manual_seed(1)  # the same random LoRA A matrices in both
        models.append(apply_lora(model, lavcap_lora_config(lora_dropout=0.0)) if use_lora else model)
    enable_activation_checkpointing(models[1])
    return models, _training_batch(config)


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_recomputes_trained_blocks_and_keeps_gradients(use_lora):
    (plain, checkpointed), batch = _model_pair(use_lora)
    plain_counts, counts = count_block_runs(plain), count_block_runs(checkpointed)
    reference_loss, reference_grads = _loss_and_grads(plain, batch)
    loss, grads = _loss_and_grads(checkpointed, batch)

    assert plain_counts == {"CedBlock": 2, "CLIPEncoderLayer": 2, "LlamaDecoderLayer": 2}
    # The two layers of CED and of the LLM run again in the backward pass.
    assert counts["CedBlock"] == counts["LlamaDecoderLayer"] == 4
    torch.testing.assert_close(loss, reference_loss)
    assert set(grads) == set(reference_grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], msg=name)


def test_frozen_vision_tower_stays_out_of_the_backward_pass_with_lora():
    """With the LoRA recipe CLIP has nothing to train: checkpointing must not pull it into the backward pass."""
    (_, checkpointed), batch = _model_pair(use_lora=True)
    counts = count_block_runs(checkpointed)
    checkpointed.train()
    checkpointed(**batch).loss.backward()
    assert counts["CLIPEncoderLayer"] == 2, "the frozen CLIP layers were recomputed for a backward pass"


# -- bench_memory ---------------------------------------------------------------------------------------------------


def paper_config_and_prompt():
    tokenizer = word_level_tokenizer([])
    config = bench_generate.build_config("paper", tokenizer)
    return config, bench_generate.build_inputs(config, tokenizer, 1, torch.device("cpu"))["input_ids"].shape[
        1
    ]


def test_bench_memory_estimates_the_paper_size_beside_the_cards(capsys):
    """Without a GPU the paper-sized table is estimated: every precision's weights, captioning at batch 1 and 8 and
    a training step at batch 4; the bf16 weights are the model's 13.3 GiB, 4-bit captions one clip within 8 GB and
    QLoRA trains at batch 4 within 16 GB (the issue's targets)."""
    rows = bench_memory.main(["--estimate"])
    out = capsys.readouterr().out
    assert out.startswith("estimates:")
    table = markdown_rows(out, "| decoder | what |")
    assert [(r["decoder"], r["batch"]) for r in table] == [
        (precision, batch) for precision in ("bf16", "8bit", "4bit") for batch in ("-", "1", "8", "4")
    ]
    gib = {(row.precision, row.what.split(",")[0], row.batch): row.gib for row in rows}
    assert gib[("bf16", "weights", None)] == pytest.approx(13.28, abs=0.01)
    assert (
        gib[("4bit", "weights", None)] < gib[("8bit", "weights", None)] < gib[("bf16", "weights", None)] / 1.8
    )
    assert gib[("4bit", "captioning", 1)] + bench_memory.CARD_RESERVE_GIB <= 8
    assert gib[("4bit", "QLoRA training step", 4)] + bench_memory.CARD_RESERVE_GIB <= 16
    for row in table:  # a card fits exactly when the figure and the reserve are within it
        expected = [
            "yes" if float(row["GiB"]) + bench_memory.CARD_RESERVE_GIB <= card else "no"
            for card in (8, 12, 16, 24)
        ]
        assert [row[f"{card} GB"] for card in (8, 12, 16, 24)] == expected


def test_bench_memory_estimates_match_the_measured_paper_size_figures():
    """The estimates' formulas against this page's measurements at paper size in bf16: captioning peaks above the
    weights of 276 and 1941 MiB (H200, beam 4, 16 new tokens, batch 1 and 8) and a LoRA step at batch 4 (H100, on
    embeddings, captions of about 8 tokens) of 15.53 GiB, 13.20 GiB with checkpointing, 7.64 M values trained."""
    config, prompt = paper_config_and_prompt()
    for batch, measured_mib in ((1, 276), (8, 1941)):
        estimate = bench_memory.captioning_bytes(config, "bf16", batch, 4, prompt, 16) / 2**20
        assert estimate == pytest.approx(measured_mib, rel=0.15), batch
    trainee_config = bench_memory.without_vision(config)
    trainee = bench_memory.build_model(trainee_config, "meta", torch.bfloat16)
    trainable = bench_memory.trainable_count(trainee)
    assert trainable == sum(p.numel() for p in apply_lora(trainee).parameters() if p.requires_grad)
    weights = bench_memory.weight_bytes(trainee, "bf16")
    for checkpointing, measured_gib in ((True, 13.20), (False, 15.53)):
        extra = bench_memory.training_bytes(trainee_config, "bf16", 4, prompt + 8, trainable, checkpointing)
        assert (weights + extra) / 2**30 == pytest.approx(measured_gib, rel=0.05), checkpointing


@pytest.mark.parametrize("precision", ["8bit", "4bit"])
def test_bench_memory_storage_formula_matches_bitsandbytes(precision):
    """The quantized weights' bytes from the formula equal those of a model that bitsandbytes quantized (CPU)."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes (the quantization extra) is not installed")
    import tempfile

    config = tiny_lavcap_config(width=64)
    with tempfile.TemporaryDirectory() as folder:
        bench_memory.build_model(config, "cpu", torch.bfloat16).save_pretrained(folder)
        loaded = bench_memory.load(folder, precision, torch.device("cpu"))
        stored = bench_memory.resident_bytes(loaded, torch.device("cpu"))
    estimate = bench_memory.weight_bytes(bench_memory.build_model(config, "meta", torch.bfloat16), precision)
    assert estimate == pytest.approx(stored, rel=0.01)


def test_bench_memory_measures_every_row_on_the_cpu(capsys):
    """The measuring path GPU sessions run, on the tiny config on the CPU: a model saved once, loaded at each
    precision through from_pretrained, captioning and a (Q)LoRA step run, every row printed."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes (the quantization extra) is not installed")
    args = ["--config", "quick", "--measure", "--device", "cpu", "--new-tokens", "2", "--batch-sizes", "2"]
    rows = bench_memory.main(args + ["--train-batch", "2", "--caption-tokens", "4"])
    out = capsys.readouterr().out
    assert out.startswith("measured on cpu")
    assert [(row.precision, row.batch) for row in rows] == [
        (precision, batch) for precision in ("bf16", "8bit", "4bit") for batch in (None, 2, 2)
    ]
    weights = {row.precision: row.gib for row in rows if row.batch is None}
    assert weights["4bit"] < weights["8bit"] < weights["bf16"]
    assert all(row.gib > 0 for row in rows)
