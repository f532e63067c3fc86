"""Fine-tuning a tiny LAVCap with the Trainer on synthesised clips: losses, what trains, checkpoints, merging, resume,
two-process DDP, and the YAML / command-line arguments."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import recorded_decoding, save_component_parts, save_scene_model
from transformers import TrainingArguments, pipeline
from transformers.trainer_utils import set_seed

from lavcap_hf import LavCapForConditionalGeneration, LavCapProcessor
from lavcap_hf.data.clips import group_clips, load_manifest
from lavcap_hf.data.collator import LavCapDataCollator
from lavcap_hf.data.dataset import LavCapDataset
from lavcap_hf.data.synthetic import generate_dataset
from lavcap_hf.lora import apply_lora, load_trained, merge_and_save, merge_checkpoint
from lavcap_hf.model.configuration_lavcap import RELEASED_DECODING
from lavcap_hf.training.arguments import parse_arguments
from lavcap_hf.training.compat import processor_kwarg
from lavcap_hf.training.run import resume_target, run_training
from lavcap_hf.training.trainer import LavCapTrainer

# Training runs, benchmarks and launched processes: the opt-in integration tier (pyproject.toml).
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SEED = 3


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Synthetic clips (mp4 with audio) + a manifest with precomputed visual embeddings + a tiny saved model.

    Clips last at most 1.27 s so that their fbank fits the tiny model's 128 frames.
    """
    root = tmp_path_factory.mktemp("training")
    generate_dataset(root / "data", num_train=12, num_test=4, seed=0, duration_range=(1.0, 1.25), size=32)
    config = save_scene_model(root / "model")
    # Precomputed-embedding variant of the training manifest: no frame decoding, no CLIP.
    rng = np.random.default_rng(0)
    rows = []
    for line in (root / "data" / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        embeds = f"features/{row['id']}.npy"
        (root / "data" / "features").mkdir(exist_ok=True)
        np.save(root / "data" / embeds, rng.standard_normal((config.num_frames, config.visual_embed_dim)))
        rows.append(json.dumps({**row, "video_embeds_path": embeds}))
    (root / "data" / "train_features.jsonl").write_text("\n".join(rows) + "\n")
    return root


def common_args(workspace: Path, output_dir: Path, manifest: str = "train.jsonl") -> list[str]:
    return [
        "--model_name_or_path", str(workspace / "model"),
        "--train_data", str(workspace / "data" / manifest),
        "--output_dir", str(output_dir),
        "--use_cpu", "true",
        "--seed", str(SEED),
        "--per_device_train_batch_size", "4",
        "--report_to", "none",
        "--disable_tqdm", "true",
    ]  # fmt: skip


def initial_model(workspace: Path):
    """The model `run_training` starts from: same seed, same LoRA initialisation."""
    set_seed(SEED)
    return apply_lora(LavCapForConditionalGeneration.from_pretrained(workspace / "model"))


def base_name(peft_name: str) -> str:
    """Name of the base-model tensor a peft parameter wraps (frozen copies keep the base weights)."""
    name = peft_name.removeprefix("base_model.model.")
    for wrapper in (".base_layer", ".original_module", ".modules_to_save.default"):
        name = name.replace(wrapper, "")
    return name


def eval_items(workspace: Path, config) -> list[dict]:
    """The test clips as the evaluation dataset gives them (one per clip)."""
    clips = group_clips(load_manifest(workspace / "data" / "test.jsonl"))
    dataset = LavCapDataset(clips, num_frames=config.num_frames)
    return [dataset[i] for i in range(len(dataset))]


def prompts(processor: LavCapProcessor, items: list[dict]) -> dict[str, torch.Tensor]:
    batch = LavCapDataCollator(processor, training=False)(items)
    batch.pop("clip_index")
    return batch


def test_fine_tune_logs_both_losses_trains_only_adapters_and_reloads(
    workspace, tmp_path, monkeypatch
) -> None:
    output = tmp_path / "run"
    args = common_args(workspace, output) + [
        "--eval_data", str(workspace / "data" / "test.jsonl"),
        "--max_steps", "30",
        "--learning_rate", "2e-2",
        "--lr_scheduler_type", "constant",
        "--logging_steps", "5",
        "--save_steps", "30",
        "--eval_strategy", "no",
        "--dataloader_num_workers", "1",
        "--generation_num_beams", "2",
        "--generation_max_new_tokens", "6",
    ]  # fmt: skip
    trainer = run_training(args)

    # Both losses are logged every 5 steps next to `loss`, which is their sum; lm_loss falls.
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [5, 10, 15, 20, 25, 30]
    for entry in logs:
        assert abs(entry["loss"] - (entry["lm_loss"] + entry["ot_loss"])) < 1e-3
    lm_losses = [entry["lm_loss"] for entry in logs]
    assert all(later < earlier for earlier, later in zip(lm_losses, lm_losses[1:], strict=False)), lm_losses
    assert lm_losses[-1] < lm_losses[0] - 0.2

    # Trainable tensors (LoRA, projector, logit scale) all moved; every frozen weight is bit-identical to the base.
    model = trainer.model.eval()
    start = dict(initial_model(workspace).named_parameters())
    base = LavCapForConditionalGeneration.from_pretrained(workspace / "model").state_dict()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("lora_B" in n for n in trainable) and any(n.endswith("logit_scale") for n in trainable)
    for name, parameter in model.named_parameters():
        if name in trainable:
            assert not torch.equal(parameter, start[name]), f"{name} did not train"
        else:
            assert torch.equal(parameter, base[base_name(name)]), f"frozen {name} changed"
    # CED's input BatchNorm statistics changed in training mode (as in the release) and are kept.
    stats = "base_model.model.model.audio_tower.init_bn.modules_to_save.default.running_mean"
    assert not torch.equal(model.state_dict()[stats], base["model.audio_tower.init_bn.running_mean"])

    # The checkpoint reloads into a model with identical logits and generations.
    processor = trainer.processing_class
    items = eval_items(workspace, model.config)
    batch = prompts(processor, items)
    greedy = {"max_new_tokens": 8, "do_sample": False, "num_beams": 1, "pad_token_id": 0, "eos_token_id": 2}
    with torch.no_grad():
        expected_logits = model(**batch).logits
        expected = model.generate(**batch, **greedy)
        reloaded = load_trained(output / "checkpoint-30").eval()
        torch.testing.assert_close(reloaded(**batch).logits, expected_logits, rtol=0, atol=0)
        assert torch.equal(reloaded.generate(**batch, **greedy), expected)

    # Evaluation generates a caption per test clip and scores it against that clip's references
    # (without java on PATH the scores use the python tokenizer: no 20 s METEOR start-up).
    monkeypatch.setenv("PATH", str(tmp_path))
    metrics = trainer.evaluate()
    references = {clip.id: list(clip.references) for clip in trainer.eval_dataset.clips}
    assert metrics["eval_num_clips"] == len(references) == 4
    assert {row["id"]: row["references"] for row in trainer.last_eval_predictions} == references
    assert "eval_BLEU_4" in metrics and "eval_CIDEr" in metrics and "eval_METEOR" not in metrics
    # Next to the captions, the teacher-forced loss and token accuracy on each clip's caption, as released.
    assert 0 <= metrics["eval_token_accuracy"] <= 1 and np.isfinite(metrics["eval_loss"])
    saved = (output / "captions-step30.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in saved] == trainer.last_eval_predictions

    # A merged plain folder loads with from_pretrained and in the pipeline, and behaves as the adapters do.
    merged_dir = tmp_path / "merged"
    merge_and_save(trainer.model, merged_dir, processor)
    # The checkpoint, the run's folder and the merged folder carry the released decoding settings.
    for folder in (output / "checkpoint-30", output, merged_dir):
        written = json.loads((folder / "generation_config.json").read_text())
        assert {k: written[k] for k in RELEASED_DECODING} == RELEASED_DECODING, folder
    merged = LavCapForConditionalGeneration.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected_logits, rtol=1e-4, atol=1e-5)
        assert torch.equal(merged.generate(**batch, **greedy), expected)
    from_checkpoint = merge_checkpoint(output / "checkpoint-30", tmp_path / "merged_from_checkpoint")
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(from_checkpoint.state_dict()[name], tensor, rtol=0, atol=0)
    captioner = pipeline(
        "audio-visual-captioning", model=merged, processor=LavCapProcessor.from_pretrained(merged_dir)
    )
    caption = captioner(str(workspace / "data" / "test" / "test-00000.mp4"), **greedy)[0]["caption"]
    single = prompts(processor, items[:1])
    with torch.no_grad():
        sequences = merged.generate(**single, **greedy)
    assert caption == processor.batch_decode(sequences, prompt_length=single["input_ids"].shape[1])[0]


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(workspace, tmp_path) -> None:
    """12 clips, batch 4: 3 steps per epoch, so step 4 is inside the second epoch (batches are skipped on resume).

    The uninterrupted run's checkpoint-4 is exactly what a run stopped after 4 steps writes (same seed, same
    data order, same augmentation); a fresh model resumed from it must end bit-identical to the uninterrupted run.
    SpecAugment, instruction draws and LoRA dropout are all active, and the data is decoded in a worker.
    """
    steps = ["--max_steps", "7", "--save_steps", "4", "--learning_rate", "1e-2", "--logging_steps", "1"]
    steps += ["--dataloader_num_workers", "1"]
    uninterrupted = run_training(common_args(workspace, tmp_path / "full", "train_features.jsonl") + steps)
    stopped = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full" / "checkpoint-4", stopped / "checkpoint-4")
    resumed = run_training(
        common_args(workspace, stopped, "train_features.jsonl")
        + steps
        + ["--resume_from_checkpoint", str(stopped / "checkpoint-4")]
    )
    # Steps 1-4 come from the checkpoint's trainer state, 5-7 were trained again: the losses match too.
    losses = [[e for e in run.state.log_history if "loss" in e] for run in (uninterrupted, resumed)]
    assert [e["step"] for e in losses[1]] == list(range(1, 8))
    assert losses[1] == losses[0]
    expected = uninterrupted.model.state_dict()
    final = resumed.model.state_dict()
    assert expected.keys() == final.keys()
    for name, tensor in expected.items():
        assert torch.equal(final[name], tensor), name
    start = dict(initial_model(workspace).named_parameters())
    assert not torch.equal(expected["base_model.model.model.multi_modal_projector.modules_to_save.default.weight"],
                           start["base_model.model.model.multi_modal_projector.modules_to_save.default.weight"])  # fmt: skip


DDP_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from lavcap_hf.training.run import run_training

trainer = run_training(sys.argv[2:])
model = trainer.accelerator.unwrap_model(trainer.model)
result = {
    "world_size": trainer.args.world_size,
    "backend": str(torch.distributed.get_backend()) if torch.distributed.is_initialized() else None,
    "parameters": {name: p.detach().clone() for name, p in model.named_parameters()},
    "state": model.state_dict(),
    "logs": trainer.state.log_history,
}
torch.save(result, f"{sys.argv[1]}/rank{trainer.args.process_index}.pt")
torch.distributed.destroy_process_group()  # as `lavcap train` does (lavcap_cli.leave_process_group)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_process_args(workspace: Path, output_dir: Path) -> list[str]:
    """The same 3 steps for DDP and FSDP: 2 x 2 clips per step, weight decay on (it needs the pre-wrap shapes).

    No gradient clipping, as in the released recipe. Clipping scales every gradient by max_norm / total norm, and the
    two wrappers sum that norm in different orders (FSDP: squares of each rank's flat shard, all-reduced; DDP: the norm
    of the per-parameter norms), so the factor differs in its last bit; AdamW turns that into a difference of ~1e-5
    relative wherever a gradient is near its epsilon (CED's first LoRA A at step 2, whose B was zero at step 1). The
    norms themselves are compared in the FSDP test.
    """
    return common_args(workspace, output_dir, "train_features.jsonl") + [
        "--per_device_train_batch_size", "2",
        "--max_steps", "3",
        "--learning_rate", "1e-2",
        "--weight_decay", "0.5",
        "--max_grad_norm", "0",
        "--logging_steps", "1",
        "--ddp_backend", "gloo",
    ]  # fmt: skip


def run_two_processes(launcher: list[str], script: str, folder: Path, args: list[str]) -> list[dict]:
    """Run `script` on 2 CPU processes; returns what each rank saved. The timeout turns a deadlock into a failure."""
    (folder / "train.py").write_text(textwrap.dedent(script))
    command = [sys.executable, "-m", *launcher, str(folder / "train.py"), str(folder), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=folder)
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


@pytest.fixture(scope="module")
def ddp_run(workspace, tmp_path_factory) -> tuple[Path, list[dict]]:
    """Two DDP processes (torch.distributed.run, gloo): the output folder and what each rank saved."""
    folder = tmp_path_factory.mktemp("ddp")
    launcher = ["torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]  # fmt: skip
    return folder / "run", run_two_processes(
        launcher, DDP_SCRIPT, folder, two_process_args(workspace, folder / "run")
    )


def test_two_process_ddp_ranks_end_with_identical_weights(workspace, ddp_run) -> None:
    _, ranks = ddp_run
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["backend"] for r in ranks] == ["gloo", "gloo"]
    start = dict(initial_model(workspace).named_parameters())
    moved = 0
    for name, tensor in ranks[0]["parameters"].items():
        assert torch.equal(ranks[1]["parameters"][name], tensor), name
        moved += not torch.equal(tensor, start[name])
    assert moved > 0
    # The logged losses are averaged over both processes, so the ranks log the same values.
    losses = [[(e["lm_loss"], e["ot_loss"]) for e in r["logs"] if "lm_loss" in e] for r in ranks]
    assert len(losses[0]) == 3 and losses[0] == losses[1]


FSDP_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType
from torch.distributed.fsdp import FullyShardedDataParallel, _state_dict_utils

accelerator_state_init = AcceleratorState.__init__


def init_allowing_cpu_fsdp(self, *args, fsdp_plugin=None, **kwargs):
    # accelerate turns a run into FSDP only from GPU-type process groups; with gloo it would train DDP.
    accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        # FSDP checks device_id against its compute device, "cpu"; accelerate names the CPU "cpu:0".
        self.device = PartialState._shared_state["device"] = torch.device("cpu")
        # As below for the optimizer state that checkpoints gather (it would be saved from freed memory).
        fsdp_plugin.optim_state_dict_config.offload_to_cpu = False


unshard = _state_dict_utils._unshard_fsdp_state_params


def unshard_without_cpu_to_cpu_offload(module, state, *, offload_to_cpu, **kwargs):
    # accelerate gathers full state dicts with offload_to_cpu=True; from a CPU, torch's FSDP1 frees what it
    # "offloads" (a segfault).
    return unshard(module, state, offload_to_cpu=offload_to_cpu and state.compute_device.type != "cpu", **kwargs)


AcceleratorState.__init__ = init_allowing_cpu_fsdp
_state_dict_utils._unshard_fsdp_state_params = unshard_without_cpu_to_cpu_offload

from lavcap_hf.training.run import run_training

trainer = run_training(sys.argv[2:])
model = trainer.model
result = {
    "world_size": trainer.args.world_size,
    "backend": str(torch.distributed.get_backend()),
    "distributed_type": trainer.accelerator.distributed_type.value,
    "root": type(model).__name__,
    "units": [type(unit.module).__name__ for unit in FullyShardedDataParallel.fsdp_modules(model)],
    "local_numel": sum(p.numel() for p in model.parameters()),
    "state": trainer.accelerator.get_state_dict(model),  # full weights, on rank 0 only
    "logs": trainer.state.log_history,
}
torch.save(result, f"{sys.argv[1]}/rank{trainer.args.process_index}.pt")
torch.distributed.destroy_process_group()  # as `lavcap train` does (lavcap_cli.leave_process_group)
"""


def fsdp_launcher() -> list[str]:
    """`accelerate launch` with examples/accelerate/fsdp_7b.yaml on 2 CPU processes, in fp32 (see FSDP_SCRIPT)."""
    return ["accelerate.commands.launch", "--config_file", str(ROOT / "examples/accelerate/fsdp_7b.yaml"),
            "--num_processes", "2", "--mixed_precision", "no", "--fsdp_sync_module_states", "false",
            "--main_process_port", str(free_port())]  # fmt: skip


@pytest.fixture(scope="module")
def fsdp_run(workspace, tmp_path_factory) -> tuple[Path, list[dict]]:
    """The DDP run's 3 steps under FSDP (see the test below), saving a checkpoint at step 2: the output folder and
    what each rank saved. One run serves the comparison with DDP and, as the uninterrupted run, the resume test."""
    folder = tmp_path_factory.mktemp("fsdp")
    args = two_process_args(workspace, folder / "run") + FSDP_SAVE_STEPS
    return folder / "run", run_two_processes(fsdp_launcher(), FSDP_SCRIPT, folder, args)


FSDP_SAVE_STEPS = ["--save_steps", "2"]


def test_two_process_fsdp_shards_the_model_and_ends_with_the_weights_of_ddp(
    workspace, ddp_run, fsdp_run
) -> None:
    """`accelerate launch` with examples/accelerate/fsdp_7b.yaml (FSDP1, full shard, CedBlock and LlamaDecoderLayer
    units, use_orig_params, full state dict) on 2 CPU processes (gloo), in fp32, then the DDP run's 3 steps.

    The script bypasses only accelerate's GPU-only gates, not the sharding: accelerate (1.16 and 1.10) makes a run
    FSDP only from a GPU-type process group (with gloo it silently trains DDP) and names the CPU device "cpu:0",
    which FSDP1 refuses as device_id; its full state dict offloads to the CPU, which from a CPU makes torch 2.13's
    FSDP1 read freed memory; and its plugin refuses `sync_module_states` on CPU (off here: every process loads the
    same weights). bf16 is off so that the weights can be compared with DDP's.
    """
    output, ranks = fsdp_run
    assert [(r["world_size"], r["backend"], r["distributed_type"]) for r in ranks] == [
        (2, "gloo", "FSDP")
    ] * 2
    # Sharded: an FSDP unit per CED block and per LLaMA layer inside the root; each rank holds about half.
    assert all(r["root"] == "FullyShardedDataParallel" for r in ranks)
    assert {"CedBlock", "LlamaDecoderLayer"} <= set(ranks[0]["units"])
    full = sum(p.numel() for p in initial_model(workspace).parameters())
    assert ranks[0]["local_numel"] + ranks[1]["local_numel"] == full
    assert all(r["local_numel"] < 0.6 * full for r in ranks)

    # The gathered weights equal DDP's: adapters, projector, logit scale (shape ()), BatchNorm copies and frozen
    # weights. FSDP reduce-scatters the gradients where DDP all-reduces them and sums the clipping norm over shards:
    # the same values up to float rounding (identical here), hence a tight tolerance rather than equality.
    ddp_output, ddp_ranks = ddp_run
    fsdp_state, ddp_state = ranks[0]["state"], ddp_ranks[0]["state"]
    assert fsdp_state.keys() == ddp_state.keys() and ranks[1]["state"] == {}
    start = initial_model(workspace).state_dict()
    trained = [name for name in ddp_state if "lora_" in name or ".modules_to_save." in name]
    assert any(name.endswith("logit_scale") for name in trained)
    for name, tensor in ddp_state.items():
        torch.testing.assert_close(fsdp_state[name], tensor, rtol=1e-5, atol=1e-7, msg=name)
    assert sum(not torch.equal(fsdp_state[name], start[name]) for name in trained) > 0
    losses = [[e["lm_loss"] for e in r["logs"] if "lm_loss" in e] for r in (ranks[0], ddp_ranks[0])]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], abs=1e-3)
    # The gradient norm over FSDP's shards is DDP's over whole tensors, up to the order of the sums (5.x logs it
    # without clipping; 4.55 only where it clips).
    norms = [[e["grad_norm"] for e in r["logs"] if "grad_norm" in e] for r in (ranks[0], ddp_ranks[0])]
    assert norms[0] == pytest.approx(norms[1], rel=1e-6) and len(norms[0]) in (0, 3)

    # The adapters saved from the full state dict (rank 0) load into a fresh model, as DDP's do.
    reloaded = {
        run: load_trained(folder).state_dict() for run, folder in (("fsdp", output), ("ddp", ddp_output))
    }
    for name in trained:
        assert torch.equal(reloaded["fsdp"][name], fsdp_state[name]), name
        torch.testing.assert_close(
            reloaded["fsdp"][name], reloaded["ddp"][name], rtol=1e-5, atol=1e-7, msg=name
        )


def test_resumed_fsdp_run_ends_with_the_weights_of_an_uninterrupted_fsdp_run(
    workspace, fsdp_run, tmp_path
) -> None:
    """The FSDP run's 3 steps, saving at step 2, then a fresh FSDP run resumed from that checkpoint-2 to step 3.

    The checkpoint's `pytorch_model_fsdp.bin`, which the Trainer restores under FSDP, lacks the LoRA weights (peft
    0.21): they must come from its adapters file, or the resumed run restarts LoRA from its initialisation.
    """
    full, uninterrupted = fsdp_run
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoint-2", resumed / "run" / "checkpoint-2")
    ranks = run_two_processes(
        fsdp_launcher(),
        FSDP_SCRIPT,
        resumed,
        two_process_args(workspace, resumed / "run")
        + FSDP_SAVE_STEPS
        + ["--resume_from_checkpoint", str(resumed / "run" / "checkpoint-2")],
    )
    assert [r["distributed_type"] for r in ranks] == ["FSDP"] * 2
    # Steps 1-2 come from the checkpoint's trainer state, step 3 was trained again.
    losses = [[e for e in r["logs"] if "lm_loss" in e] for r in (uninterrupted[0], ranks[0])]
    assert [e["step"] for e in losses[1]] == [1, 2, 3]
    assert [e["lm_loss"] for e in losses[1]] == pytest.approx([e["lm_loss"] for e in losses[0]], abs=1e-6)
    expected, final = uninterrupted[0]["state"], ranks[0]["state"]
    assert expected.keys() == final.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-6, atol=1e-8, msg=name)
    # LoRA moved from its initialisation (lora_B starts at zero) before the checkpoint, and after it.
    start = initial_model(workspace).state_dict()
    checkpointed = load_trained(full / "checkpoint-2").state_dict()
    lora = [name for name in expected if ".lora_B." in name]
    assert lora and all(not torch.equal(checkpointed[name], start[name]) for name in lora)
    assert all(not torch.equal(final[name], checkpointed[name]) for name in lora)


def test_yaml_config_gives_defaults_and_the_command_line_overrides_them(tmp_path, monkeypatch) -> None:
    # TrainingArguments(bf16=True) exports ACCELERATE_MIXED_PRECISION with transformers 4.x; keep it to this test.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    config = ROOT / "examples" / "configs" / "lavcap_audiocaps.yaml"
    arguments = parse_arguments(
        [
            "--config",
            str(config),
            "--use_cpu",
            "true",
            "--learning_rate",
            "1e-4",
            "--lora_r",
            "4",
            "--no_spec_augment",
        ]
    )
    training = arguments.training
    assert isinstance(training, TrainingArguments)
    assert (
        training.learning_rate == 1e-4 and arguments.lora.lora_r == 4 and arguments.data.spec_augment is False
    )
    # The paper's recipe as the YAML states it.
    assert training.weight_decay == 1e-6 and training.per_device_train_batch_size == 4 and training.bf16
    assert training.lr_scheduler_type.value == "cosine_with_min_lr" and training.lr_scheduler_kwargs == {
        "min_lr": 1e-8
    }
    warmup = getattr(training, "warmup_ratio", None) or training.warmup_steps
    assert warmup == 0.02
    # Evaluation captions decode as the model's generation_config says; the options override any setting.
    assert arguments.evaluation.generate_settings() == {}
    overridden = parse_arguments(
        ["--config", str(config), "--use_cpu", "true", "--generation_num_beams", "2"]
        + ["--generation_kwargs", '{"length_penalty": 0.5, "num_beams": 3}']
    )
    assert overridden.evaluation.generate_settings() == {"length_penalty": 0.5, "num_beams": 2}
    assert arguments.lora.lora_alpha == 32 and arguments.lora.lora_dropout == 0.1
    assert training.remove_unused_columns is False and arguments.gaudi is False

    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1e-5\nlearning_rat: 3\n")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['learning_rat'\]"):
        parse_arguments(["--config", str(bad)])


def test_evaluation_captions_decode_as_the_model_generation_config_says(workspace, tmp_path) -> None:
    """The Trainer's evaluation captions use the model's generation config (edited here to 3 beams and 5 tokens),
    and `generation_kwargs` (what the --generation_* options give) override any setting."""
    processor = LavCapProcessor.from_pretrained(workspace / "model")
    clips = group_clips(load_manifest(workspace / "data" / "test.jsonl"))
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False
    )
    used = {}
    for name, overrides in (("model's", None), ("overridden", {"num_beams": 2, "length_penalty": 0.5})):
        model = LavCapForConditionalGeneration.from_pretrained(workspace / "model")
        model.generation_config.num_beams, model.generation_config.max_new_tokens = 3, 5
        dataset = LavCapDataset(clips, num_frames=model.config.num_frames)
        trainer = LavCapTrainer(
            model=model,
            args=args,
            caption_metrics=False,
            generation_kwargs=overrides,
            **{processor_kwarg(LavCapTrainer): processor},
        )
        with recorded_decoding(model) as used[name]:
            sequences = trainer.predict(dataset).predictions[0]
        assert sequences.shape[1] <= model.generation_config.max_new_tokens
    assert {(c.num_beams, c.max_new_tokens, c.length_penalty) for c in used["model's"]} == {(3, 5, 1.0)}
    assert {(c.num_beams, c.max_new_tokens, c.length_penalty) for c in used["overridden"]} == {(2, 5, 0.5)}


def test_trainer_needs_the_raw_columns(workspace, tmp_path) -> None:
    model = apply_lora(LavCapForConditionalGeneration.from_pretrained(workspace / "model"))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        LavCapTrainer(
            model=model, args=args, processing_class=LavCapProcessor.from_pretrained(workspace / "model")
        )


def components_args(workspace: Path, parts: Path, output_dir: Path, *extra: str) -> list[str]:
    """A run built from components (`save_component_parts` written into `parts`) instead of a LAVCap folder."""
    save_component_parts(parts)
    return [
        *common_args(workspace, output_dir, "train_features.jsonl")[2:],  # no --model_name_or_path
        "--language_model", str(parts / "llm"), "--audio_encoder", str(parts / "ced.pt"),
        "--num_frames", "4", "--visual_embed_dim", "32", *extra,
    ]  # fmt: skip


def test_components_build_keeps_its_starting_model_as_the_adapters_base(workspace, tmp_path) -> None:
    """A run built from a CED checkpoint and a causal LM folder saves the model it starts from (its new token rows
    are drawn at random), and the finished run loads from its output folder alone."""
    output = tmp_path / "run"
    trainer = run_training(
        components_args(workspace, tmp_path, output, "--max_steps", "2", "--learning_rate", "1e-2")
    )
    assert (output / "base_model" / "model.safetensors").is_file()
    reloaded = load_trained(output).eval()
    assert reloaded.peft_config["default"].base_model_name_or_path == str((output / "base_model").resolve())
    item = LavCapDataset(load_manifest(workspace / "data" / "train_features.jsonl"), num_frames=4)[0]
    batch = LavCapDataCollator(trainer.processing_class, training=False)([item])
    batch.pop("clip_index")
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(**batch).logits, trainer.model.eval()(**batch).logits, rtol=0, atol=0
        )


def test_qlora_components_build_trains_on_the_4bit_reload_of_its_saved_starting_model(
    workspace, tmp_path
) -> None:
    """`--quantize 4bit` with components: the starting model is saved unquantized (the adapters' base), and training
    runs on it read back with a 4-bit decoder."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes (the quantization extra) is not installed")
    from lavcap_hf.quantization import quantized_module_names

    output = tmp_path / "run"
    trainer = run_training(
        components_args(workspace, tmp_path, output, "--max_steps", "1", "--quantize", "4bit")
    )
    base = LavCapForConditionalGeneration.from_pretrained(output / "base_model")
    assert not quantized_module_names(base)
    quantized = quantized_module_names(trainer.model)
    assert quantized and all(".language_model." in name for name in quantized)


def test_accelerate_configs_are_valid_and_wrap_existing_layers(workspace) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {name: load_config_from_file(str(ROOT / "examples" / "accelerate" / f"{name}.yaml")) for name in
               ("ddp", "fsdp_7b", "deepspeed_zero2")}  # fmt: skip
    assert {name: c.distributed_type.value for name, c in configs.items()} == {
        "ddp": "MULTI_GPU",
        "fsdp_7b": "FSDP",
        "deepspeed_zero2": "DEEPSPEED",
    }
    assert all(c.mixed_precision == "bf16" for c in configs.values())
    fsdp = configs["fsdp_7b"].fsdp_config
    assert fsdp["fsdp_use_orig_params"] is True  # frozen and LoRA parameters in the same FSDP units
    model = LavCapForConditionalGeneration.from_pretrained(workspace / "model")
    layer_classes = {type(module).__name__ for module in model.modules()}
    assert set(fsdp["fsdp_transformer_layer_cls_to_wrap"].split(",")) <= layer_classes


KILLED_MID_SAVE = """
import os, signal, sys, torch
torch.set_num_threads(1)
from transformers import Trainer
from lavcap_hf.training.run import run_training


save_rng_state = Trainer._save_rng_state


def killed_mid_save(self, output_dir):
    # Fault injected: SIGKILL while checkpoint-6 is being written (weights, optimizer and scheduler are on disk, the
    # RNG and trainer state are not), as when a job is killed during a save.
    if self.state.global_step == 6:
        os.kill(os.getpid(), signal.SIGKILL)
    return save_rng_state(self, output_dir)


Trainer._save_rng_state = killed_mid_save
run_training(sys.argv[1:])
"""


def test_run_killed_mid_save_resumes_from_the_last_complete_checkpoint(workspace, tmp_path) -> None:
    steps = ["--max_steps", "7", "--save_steps", "3", "--learning_rate", "1e-2", "--logging_steps", "1"]
    killed = tmp_path / "killed"
    args = common_args(workspace, killed, "train_features.jsonl") + steps
    result = subprocess.run(
        [sys.executable, "-c", KILLED_MID_SAVE, *args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert (killed / "checkpoint-6" / "adapter_model.safetensors").exists()
    assert not (killed / "checkpoint-6" / "trainer_state.json").exists()

    resumed = run_training(args + ["--resume_from_checkpoint", "last"])
    assert [e["step"] for e in resumed.state.log_history if "loss" in e][:3] == [1, 2, 3]  # from checkpoint-3
    uninterrupted = run_training(common_args(workspace, tmp_path / "full", "train_features.jsonl") + steps)
    expected, final = uninterrupted.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == final.keys()
    for name, tensor in expected.items():
        assert torch.equal(final[name], tensor), name


def test_resume_last_without_a_complete_checkpoint_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resume_target("last", tmp_path)
    assert resume_target("false", tmp_path) is None
