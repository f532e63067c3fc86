"""The released training recipe from the example config: AdamW and its decay groups, the released learning-rate
schedule, teacher-forced token accuracy, the kept checkpoint, caption length and the CUDA release's precision.

Released facts (Hyeongkeun/LAVCap): optims.py `LinearWarmupCosineLRScheduler` / `warmup_lr_schedule` /
`cosine_lr_schedule` / `get_optimizer`, runner.py (`warmup_steps = warmup_epoch * iters_per_epoch`, the schedule
stepped before each optimizer step, `checkpoint_best` kept on the best validation `agg_metrics` = correct / n_token),
models/lavcaps.py (the `verbose` token accuracy, LLaMA loaded in fp16 under `torch.cuda.amp.autocast`) and
configs/config_best.yaml (init_lr 5e-6, warmup_start_lr 2e-9, min_lr 1e-8, warmup_epoch 2, max_epoch 100,
weight_decay 1e-6, beta2 0.999, max_txt_len 300, amp).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import save_component_parts, save_scene_model
from peft import get_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_utils import set_seed

from lavcap_hf import LavCapForConditionalGeneration, LavCapProcessor
from lavcap_hf.data.clips import group_clips, load_manifest
from lavcap_hf.data.collator import LavCapDataCollator
from lavcap_hf.data.dataset import LavCapDataset
from lavcap_hf.data.synthetic import generate_dataset
from lavcap_hf.lora import apply_lora
from lavcap_hf.model.processing_lavcap import TRAINING_INSTRUCTIONS
from lavcap_hf.training.arguments import ModelArguments, parse_arguments
from lavcap_hf.training.run import build_dataset, build_trainer, load_model_and_processor
from lavcap_hf.training.schedule import lavcap_lr_scheduler
from lavcap_hf.training.trainer import LavCapTrainer, token_accuracy_counts

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "lavcap_audiocaps.yaml"
SEED = 3


def released_lr(step: int, *, warmup: int, total: int, lr: float, start: float, minimum: float) -> float:
    """optims.py of the release: `warmup_lr_schedule` while `step < warmup_steps`, then `cosine_lr_schedule` with
    `epoch = step` and `max_epoch = max_epoch * iters_per_epoch` (the whole run)."""
    if step < warmup:
        return min(lr, start + (lr - start) * step / max(warmup, 1))
    return (lr - minimum) * 0.5 * (1.0 + math.cos(math.pi * step / total)) + minimum


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """12 training clips (with precomputed visual embeddings), 4 test clips, a tiny saved model and processor."""
    root = tmp_path_factory.mktemp("recipe")
    generate_dataset(root / "data", num_train=12, num_test=4, seed=0, duration_range=(1.0, 1.25), size=32)
    save_scene_model(root / "model")
    rng = np.random.default_rng(0)
    rows = []
    for line in (root / "data" / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        (root / "data" / "features").mkdir(exist_ok=True)
        np.save(root / "data" / f"features/{row['id']}.npy", rng.standard_normal((4, 32)))
        rows.append(json.dumps({**row, "video_embeds_path": f"features/{row['id']}.npy"}))
    (root / "data" / "train_features.jsonl").write_text("\n".join(rows) + "\n")
    return root


def common_args(workspace: Path, output_dir: Path) -> list[str]:
    return [
        "--model_name_or_path", str(workspace / "model"),
        "--train_data", str(workspace / "data" / "train_features.jsonl"),
        "--eval_data", str(workspace / "data" / "test.jsonl"),
        "--output_dir", str(output_dir),
        "--use_cpu", "true",
        "--seed", str(SEED),
        "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4",
        "--report_to", "none",
        "--disable_tqdm", "true",
    ]  # fmt: skip


class LearningRates(TrainerCallback):
    """The lr each optimizer step runs at (read before the step)."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs) -> None:
        self.values.append(optimizer.param_groups[0]["lr"])


def prepared_trainer(argv: list[str]):
    """What `run_training` builds before `train()`, so that a test can add callbacks."""
    arguments = parse_arguments(argv)
    set_seed(arguments.training.seed)
    model, processor = load_model_and_processor(arguments.model)
    model = apply_lora(model, arguments.lora.lora_config())
    train = build_dataset(
        arguments.data, model.config, processor, training=True, seed=arguments.training.seed
    )
    evaluation = build_dataset(arguments.data, model.config, processor, training=False)
    return build_trainer(arguments, model, processor, train, evaluation)


def eval_items(workspace: Path, config) -> list[dict]:
    clips = group_clips(load_manifest(workspace / "data" / "test.jsonl"))
    dataset = LavCapDataset(clips, num_frames=config.num_frames)
    return [dataset[i] for i in range(len(dataset))]


# -- learning-rate schedule --------------------------------------------------------------------------------------


def test_lavcap_schedule_is_the_released_formula_at_every_step() -> None:
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=5e-6)
    total, warmup = 1000, 20
    scheduler = lavcap_lr_scheduler(optimizer, total, warmup, warmup_start_lr=2e-9, min_lr=1e-8)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [
        released_lr(s, warmup=warmup, total=total, lr=5e-6, start=2e-9, minimum=1e-8) for s in range(total)
    ]
    np.testing.assert_allclose(rates, expected, rtol=1e-12, atol=0)
    assert rates[0] == pytest.approx(2e-9, rel=1e-12)
    assert rates[warmup - 1] == pytest.approx(2e-9 + (5e-6 - 2e-9) * 19 / 20, rel=1e-12)
    # The cosine's phase counts from step 0: right after the warm-up the lr is already below its peak.
    assert rates[warmup] == pytest.approx(
        1e-8 + (5e-6 - 1e-8) * 0.5 * (1 + math.cos(math.pi * 0.02)), rel=1e-12
    )
    assert rates[-1] == pytest.approx(
        1e-8 + (5e-6 - 1e-8) * 0.5 * (1 + math.cos(math.pi * 999 / 1000)), rel=1e-12
    )


# -- token accuracy ----------------------------------------------------------------------------------------------


def test_token_accuracy_counts_on_a_hand_made_batch() -> None:
    # Position t predicts label t + 1; only labels other than -100 count.
    labels = torch.tensor([[-100, -100, 2, 3, -100], [-100, 1, 1, 2, 0]])
    # The argmax at each position (the last position is never scored).
    predicted = torch.tensor([[0, 2, 0, 1, 3], [1, 1, 3, 0, 2]])
    logits = nn.functional.one_hot(predicted, num_classes=4).float() * 5 - 1
    counts = token_accuracy_counts(logits, labels)
    assert counts.tolist() == [[1, 2], [3, 4]]


def test_teacher_forced_evaluation_batches_keep_the_generation_prompts(workspace) -> None:
    processor = LavCapProcessor.from_pretrained(workspace / "model")
    items = eval_items(
        workspace, LavCapForConditionalGeneration.config_class.from_pretrained(workspace / "model")
    )
    prompts = LavCapDataCollator(processor, training=False)(items)
    scored = LavCapDataCollator(processor, training=False, teacher_forcing=True, max_caption_length=3)(items)
    for key in ("input_ids", "attention_mask", "clip_index", "input_features", "pixel_values_videos"):
        assert torch.equal(scored[key], prompts[key]), key
    expected = processor(
        audio=[item["audio"] for item in items],
        videos=[item["frames"] for item in items],
        captions=[item["caption"] for item in items],
        sampling_rate=items[0]["sampling_rate"],
        padding_side="right",
        max_caption_length=3,
    )
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(scored[f"caption_{key}"], expected[key]), key
    assert ((scored["caption_labels"] != -100).sum(dim=1) == 4).all()  # 3 caption tokens + EOS


# -- optimizer, schedule and best checkpoint in a run --------------------------------------------------------------


def test_run_follows_the_released_schedule_and_keeps_the_most_accurate_epoch(
    workspace, tmp_path, monkeypatch
) -> None:
    """12 clips, batch 4: 3 steps per epoch, 4 epochs, warm-up over 2 epochs (6 steps). Evaluation every epoch is
    teacher-forced only (no caption metric asked), and the run ends on the checkpoint with the best accuracy."""
    output = tmp_path / "run"
    argv = common_args(workspace, output) + [
        "--num_train_epochs", "4",
        "--learning_rate", "0.2",  # high enough for the accuracy to change from epoch to epoch
        "--warmup_steps", "6",
        "--warmup_start_lr", "1e-4",
        "--lr_scheduler_type", "cosine_with_min_lr",
        "--lr_scheduler_kwargs", '{"min_lr": 2e-4}',
        "--eval_strategy", "epoch",
        "--save_strategy", "epoch",
        "--metric_for_best_model", "token_accuracy",
        "--load_best_model_at_end", "true",
        "--caption_metrics", "false",
        "--logging_steps", "1",
    ]  # fmt: skip
    trainer = prepared_trainer(argv)
    rates = LearningRates()
    trainer.add_callback(rates)
    trainer.train()

    expected = [released_lr(s, warmup=6, total=12, lr=0.2, start=1e-4, minimum=2e-4) for s in range(12)]
    np.testing.assert_allclose(rates.values, expected, rtol=1e-12, atol=0)
    assert rates.values[0] == pytest.approx(1e-4)  # step 0: the warm-up's start
    assert rates.values[5] == pytest.approx(1e-4 + (0.2 - 1e-4) * 5 / 6)  # the warm-up's last step
    assert rates.values[11] == pytest.approx(2e-4 + (0.2 - 2e-4) * 0.5 * (1 + math.cos(math.pi * 11 / 12)))

    evaluations = [e for e in trainer.state.log_history if "eval_token_accuracy" in e]
    assert [e["step"] for e in evaluations] == [3, 6, 9, 12] and all("eval_loss" in e for e in evaluations)
    accuracies = [e["eval_token_accuracy"] for e in evaluations]
    best = int(np.argmax(accuracies))  # the first of equals, as the release's strict `>`
    assert trainer.state.best_metric == accuracies[best]
    assert trainer.state.best_model_checkpoint == str(output / f"checkpoint-{evaluations[best]['step']}")
    # No caption was generated: evaluation was one teacher-forced forward pass per batch.
    assert trainer.last_eval_predictions == [] and not list(output.glob("captions-step*.jsonl"))

    # The model the run ends with is the best checkpoint (adapters, projector, logit scale, BatchNorm statistics).
    saved = load_file(str(Path(trainer.state.best_model_checkpoint) / "adapter_model.safetensors"))
    current = get_peft_model_state_dict(trainer.model)
    assert saved.keys() == current.keys()
    for name, tensor in saved.items():
        assert torch.equal(current[name].cpu(), tensor), name

    # Its accuracy, recomputed here over the 4 test clips' captions, is the best epoch's.
    monkeypatch.setenv("PATH", str(tmp_path))  # no METEOR start-up if anything scored captions
    model = trainer.model.eval()
    batch = LavCapDataCollator(trainer.processing_class, training=False, teacher_forcing=True)(
        eval_items(workspace, model.config)
    )
    media = {k: v for k, v in batch.items() if k in ("input_features", "pixel_values_videos")}
    labels = batch["caption_labels"]
    with torch.no_grad():
        logits = model(
            **media, input_ids=batch["caption_input_ids"], attention_mask=batch["caption_attention_mask"]
        ).logits
    correct = scored = 0
    for row in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[row, t + 1] != -100:
                scored += 1
                correct += int(logits[row, t].argmax() == labels[row, t + 1])
    assert trainer.evaluate()["eval_token_accuracy"] == pytest.approx(correct / scored, abs=1e-12)
    assert correct / scored == pytest.approx(trainer.state.best_metric, abs=1e-12)


def test_caption_metric_as_best_metric_generates_captions(workspace, tmp_path, monkeypatch) -> None:
    model = apply_lora(LavCapForConditionalGeneration.from_pretrained(workspace / "model"))
    processor = LavCapProcessor.from_pretrained(workspace / "model")
    dataset = LavCapDataset(group_clips(load_manifest(workspace / "data" / "test.jsonl")), num_frames=4)
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False,
        metric_for_best_model="CIDEr", per_device_eval_batch_size=4,
    )  # fmt: skip
    with pytest.raises(ValueError, match="caption_metrics=True"):
        LavCapTrainer(model=model, args=args, processing_class=processor, caption_metrics=False)
    trainer = LavCapTrainer(
        model=model, args=args, processing_class=processor, eval_dataset=dataset,
        generation_kwargs={"num_beams": 1, "max_new_tokens": 4},
    )  # fmt: skip
    monkeypatch.setenv("PATH", str(tmp_path))  # python tokenizer instead of a 20 s METEOR start-up
    metrics = trainer.evaluate()
    assert {"eval_CIDEr", "eval_token_accuracy", "eval_loss"} <= metrics.keys()
    assert len(trainer.last_eval_predictions) == 4


class FirstEvaluationIsBest(TrainerCallback):
    """Makes the first evaluation the best one (the metrics dict is the one the Trainer then compares), so that
    restoring the best checkpoint must change the weights the run ended with."""

    def __init__(self) -> None:
        self.evaluations = 0

    def on_evaluate(self, args, state, control, metrics=None, **kwargs) -> None:
        metrics["eval_token_accuracy"] = 1.0 if self.evaluations == 0 else 0.0
        self.evaluations += 1


def test_a_full_model_run_ends_on_its_best_checkpoint(workspace, tmp_path) -> None:
    """Trained without LoRA (as the demo's small models are), the run ends with every weight of its best checkpoint:
    the Trainer reads that checkpoint's file straight into the model, and 5.x saved it in the older key layout."""
    model = LavCapForConditionalGeneration.from_pretrained(workspace / "model")
    processor = LavCapProcessor.from_pretrained(workspace / "model")
    dataset = LavCapDataset(group_clips(load_manifest(workspace / "data" / "test.jsonl")), num_frames=4)
    output = tmp_path / "run"
    args = TrainingArguments(
        output_dir=str(output), use_cpu=True, report_to="none", remove_unused_columns=False, max_steps=3,
        per_device_train_batch_size=2, per_device_eval_batch_size=4, learning_rate=5e-2, eval_strategy="steps",
        eval_steps=1, save_strategy="steps", save_steps=1, load_best_model_at_end=True,
        metric_for_best_model="token_accuracy", seed=SEED, disable_tqdm=True,
    )  # fmt: skip
    trainer = LavCapTrainer(
        model=model, args=args, processing_class=processor, train_dataset=dataset, eval_dataset=dataset,
        data_collator=LavCapDataCollator(processor, spec_augment=False), caption_metrics=False,
        callbacks=[FirstEvaluationIsBest()],
    )  # fmt: skip
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(output / "checkpoint-1")
    best = LavCapForConditionalGeneration.from_pretrained(output / "checkpoint-1").state_dict()
    last = LavCapForConditionalGeneration.from_pretrained(output / "checkpoint-3").state_dict()
    ended = trainer.model.state_dict()
    assert best.keys() == ended.keys()
    for name, tensor in best.items():
        assert torch.equal(ended[name], tensor), name
    changed = [name for name in best if not torch.equal(best[name], last[name])]
    assert any(name.startswith("model.language_model.") for name in changed) and "lm_head.weight" in changed


# -- the example config ------------------------------------------------------------------------------------------


def test_example_config_gives_the_released_recipe(workspace, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # bf16=True exports it with transformers 4.x
    argv = [
        "--config", str(CONFIG), "--use_cpu", "true", "--output_dir", str(tmp_path),
        "--model_name_or_path", str(workspace / "model"), "--eval_data", str(workspace / "data" / "test.jsonl"),
    ]  # fmt: skip
    arguments = parse_arguments(argv)
    training = arguments.training
    assert (training.learning_rate, training.adam_beta1, training.adam_beta2) == (5e-6, 0.9, 0.999)
    assert training.weight_decay == 1e-6 and training.num_train_epochs == 100
    assert arguments.schedule.warmup_start_lr == 2e-9 and training.lr_scheduler_kwargs == {"min_lr": 1e-8}
    assert (training.metric_for_best_model, training.greater_is_better) == ("token_accuracy", True)
    assert training.load_best_model_at_end and training.eval_strategy == training.save_strategy == "epoch"
    # runner.py never clips gradients; utils.get_dataloader drops the last partial training batch.
    assert training.max_grad_norm == 0 and training.dataloader_drop_last
    assert arguments.data.max_caption_length == 300 and arguments.evaluation.caption_metrics

    model, processor = load_model_and_processor(arguments.model)
    model = apply_lora(model, arguments.lora.lora_config())
    evaluation = build_dataset(arguments.data, model.config, processor, training=False)
    trainer = build_trainer(arguments, model, processor, None, evaluation)
    assert trainer.data_collator.max_caption_length == 300 == trainer.eval_data_collator.max_caption_length
    assert trainer.eval_data_collator.teacher_forcing

    # AdamW: decay 1e-6 on the trained matrices (LoRA A/B, projector and fusion weights), none on biases, norms, the
    # logit scale or any other 1-D tensor.
    optimizer = trainer.create_optimizer()
    assert type(optimizer).__name__ == "AdamW" and optimizer.defaults["betas"] == (0.9, 0.999)
    names = {id(p): name for name, p in model.named_parameters()}
    groups = {
        group["weight_decay"]: {names[id(p)] for p in group["params"]} for group in optimizer.param_groups
    }
    assert set(groups) == {1e-6, 0.0}
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert groups[1e-6] | groups[0.0] == trained and not groups[1e-6] & groups[0.0]
    parameters = dict(model.named_parameters())
    assert groups[1e-6] == {
        n
        for n in trained
        if parameters[n].ndim >= 2 and not any(k in n for k in ("bias", "norm", "logit_scale"))
    }
    assert any("lora_A" in n for n in groups[1e-6])
    assert any("multi_modal_projector" in n for n in groups[1e-6])
    assert any(n.endswith("logit_scale") for n in groups[0.0])
    assert any(n.endswith("bias") for n in groups[0.0])

    # The schedule for 100 epochs of 10 steps: warm-up over 2 epochs from 2e-9, cosine over all 1000 steps to 1e-8.
    scheduler = trainer.create_scheduler(num_training_steps=1000, optimizer=optimizer)
    rates = []
    for _ in range(1000):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradients: nothing moves
        scheduler.step()
    expected = [released_lr(s, warmup=20, total=1000, lr=5e-6, start=2e-9, minimum=1e-8) for s in range(1000)]
    np.testing.assert_allclose(rates, expected, rtol=1e-12, atol=0)


def test_example_config_counts_epochs_and_warm_up_as_released(workspace, tmp_path, monkeypatch) -> None:
    """At AudioCaps' size (49,838 training captions, batch 4) the release runs floor(49,838 / 4) = 12,459 steps per
    epoch (`drop_last`), warms up over 2 of those epochs (24,918 steps) and spans its cosine over 100 of them; the
    evaluation split keeps its last partial batch."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # bf16=True exports it with transformers 4.x
    argv = [
        "--config", str(CONFIG), "--use_cpu", "true", "--output_dir", str(tmp_path),
        "--model_name_or_path", str(workspace / "model"), "--dataloader_num_workers", "0",
    ]  # fmt: skip
    arguments = parse_arguments(argv)
    model, processor = load_model_and_processor(arguments.model)
    clip = load_manifest(workspace / "data" / "train_features.jsonl")[0]
    train = LavCapDataset([clip] * 49_838, num_frames=model.config.num_frames)  # only its length is read
    evaluation = LavCapDataset([clip] * 10, num_frames=model.config.num_frames)
    trainer = build_trainer(arguments, model, processor, train, evaluation)

    steps_per_epoch = len(trainer.get_train_dataloader())
    assert steps_per_epoch == 12_459
    assert len(trainer.get_eval_dataloader()) == 3  # 4 + 4 + 2 clips: evaluation drops none
    assert len(trainer.get_train_dataloader()) == 12_459  # and the training loader still drops its last batch
    # The Trainer's max_steps at gradient accumulation 1.
    total = steps_per_epoch * int(arguments.training.num_train_epochs)
    warmup = 2 * steps_per_epoch  # runner.py: warmup_epoch * iters_per_epoch
    assert arguments.training.get_warmup_steps(total) == warmup == 24_918
    scheduler = trainer.create_scheduler(num_training_steps=total, optimizer=trainer.create_optimizer())
    steps = [0, 1, warmup - 2, warmup - 1, warmup, warmup + 1, total // 2, total - 1]
    rates = [5e-6 * scheduler.lr_lambdas[0](step) for step in steps]
    expected = [released_lr(s, warmup=warmup, total=total, lr=5e-6, start=2e-9, minimum=1e-8) for s in steps]
    np.testing.assert_allclose(rates, expected, rtol=1e-12, atol=0)


# -- the released layout of a training batch -----------------------------------------------------------------------

RELEASED_TEMPLATE = "USER: {}\nASSISTANT:"  # configs/config_best.yaml `prompt_template`


def released_teacher_forced_loss(
    model: LavCapForConditionalGeneration,
    tokenizer,
    fused: torch.Tensor,
    instructions: list[str],
    captions: list[str],
) -> torch.Tensor:
    """The LM loss of models/lavcaps.py `forward` with `multi_prompt` (its `prompt_wrap`), from the fused vectors
    (B, N, d) of `encode_feature`: embeddings of BOS, `"USER: <Speech>"`, the fused vectors, the instruction piece
    right-padded to the batch's longest and `caption + "</s>"` right-padded, concatenated; the attention mask 0 on
    both paddings; labels -100 everywhere but the caption tokens (pad ids masked); the decoder's position ids
    0..L-1 whatever the mask (its LlamaModel's default), and the decoder's mean cross entropy."""
    tokenizer.padding_side = "right"  # as the release sets it
    before, after = zip(
        *(
            RELEASED_TEMPLATE.format(f"<Speech><SpeechHere></Speech> {i}").split("<SpeechHere>")
            for i in instructions
        ),
        strict=True,
    )
    embed = model.get_input_embeddings()
    before_tokens = tokenizer(list(before), return_tensors="pt", add_special_tokens=False)
    after_tokens = tokenizer(list(after), return_tensors="pt", padding="longest", add_special_tokens=False)
    text_tokens = tokenizer(
        [c + "</s>" for c in captions], return_tensors="pt", padding="longest", truncation=True,
        max_length=300, add_special_tokens=False,
    )  # fmt: skip
    batch_size = fused.shape[0]
    bos = torch.full((batch_size, 1), tokenizer.bos_token_id)
    wrapped = torch.cat([embed(before_tokens.input_ids), fused, embed(after_tokens.input_ids)], dim=1)
    wrapped_mask = torch.cat(
        [
            before_tokens.attention_mask,
            torch.ones(fused.shape[:2], dtype=torch.long),
            after_tokens.attention_mask,
        ],
        dim=1,
    )
    targets = text_tokens.input_ids.masked_fill(text_tokens.input_ids == tokenizer.pad_token_id, -100)
    targets = torch.cat([torch.full((batch_size, wrapped.shape[1] + 1), -100), targets], dim=1)
    inputs_embeds = torch.cat([embed(bos), wrapped, embed(text_tokens.input_ids)], dim=1)
    attention_mask = torch.cat([wrapped_mask[:, :1], wrapped_mask, text_tokens.attention_mask], dim=1)
    positions = torch.arange(inputs_embeds.shape[1])[None].expand(batch_size, -1)
    hidden = model.language_model(
        inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=positions
    ).last_hidden_state
    logits = model.lm_head(hidden).float()
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1), ignore_index=-100
    )


def training_items(workspace: Path, config) -> list[dict]:
    """The first 4 training examples of epoch 0: with seed SEED, their clips draw instructions of different
    lengths (the tests that use them check it)."""
    clips = load_manifest(workspace / "data" / "train_features.jsonl")
    dataset = LavCapDataset(clips, num_frames=config.num_frames, seed=SEED)
    return [dataset[i] for i in range(4)]


def drawn_instructions(tokenizer, batch: dict[str, torch.Tensor]) -> list[str]:
    """The training instruction of each row: the one whose released instruction piece ends the row's attended
    prompt tokens (those before its first label)."""
    pieces = {
        instruction: tokenizer(
            RELEASED_TEMPLATE.format(f"<Speech><SpeechHere></Speech> {instruction}").split("<SpeechHere>")[1],
            add_special_tokens=False,
        ).input_ids
        for instruction in TRAINING_INSTRUCTIONS
    }
    found = []
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True):
        start = int((labels != -100).int().argmax())
        prompt = ids[:start][mask[:start].bool()].tolist()
        (instruction,) = [i for i, piece in pieces.items() if prompt[-len(piece) :] == piece]
        found.append(instruction)
    return found


def test_mixed_instruction_batch_loss_equals_the_released_layout(workspace) -> None:
    """Clips of one batch that draw instructions of different lengths: the collator's rows give the teacher-forced
    loss the release computes on the same fused vectors (its padding in the middle moves the captions' positions)."""
    model = LavCapForConditionalGeneration.from_pretrained(workspace / "model").eval()
    processor = LavCapProcessor.from_pretrained(workspace / "model")
    items = training_items(workspace, model.config)
    batch = LavCapDataCollator(processor)(items)
    instructions = drawn_instructions(processor.tokenizer, batch)
    prompt_lengths = {len(processor.tokenizer(i, add_special_tokens=False).input_ids) for i in instructions}
    assert len(prompt_lengths) > 1, "the batch must mix instructions of different lengths"

    media = {k: batch[k] for k in ("input_features", "video_embeds")}
    with torch.no_grad():
        ours = model(**batch)
        fused = model.get_multimodal_features(**media)
        expected = released_teacher_forced_loss(
            model,
            processor.tokenizer,
            fused.multimodal_embeds,
            instructions,
            [item["caption"] for item in items],
        )
    torch.testing.assert_close(ours.lm_loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.loss, expected + fused.ot_loss, rtol=1e-5, atol=1e-6)
    # Every caption starts at one column, after the longest prompt; the shorter prompts are padded before it.
    first_label = (batch["labels"] != -100).int().argmax(dim=1)
    assert len(set(first_label.tolist())) == 1
    assert (batch["attention_mask"][:, : int(first_label[0])].sum(dim=1) < first_label).any()


def test_flash_attention_refuses_a_batch_padded_between_prompt_and_caption(workspace, tmp_path) -> None:
    """Flash attention leaves padded positions out, so the first caption token of a shorter prompt would be predicted
    from nothing: training says so instead of computing another loss. (flash-attn is not installed here: the
    decoder's attention setting is changed by hand; the check runs before the forward.)"""
    model = LavCapForConditionalGeneration.from_pretrained(workspace / "model")
    processor = LavCapProcessor.from_pretrained(workspace / "model")
    batch = LavCapDataCollator(processor)(training_items(workspace, model.config))
    mask = batch["attention_mask"]
    assert (mask[:, 1:] > mask[:, :-1]).any()  # padding before a caption
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False
    )
    trainer = LavCapTrainer(model=model, args=args, processing_class=processor, caption_metrics=False)
    model.train()
    model.config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="padded between prompts and captions.*flash_attention_2.*sdpa"):
        trainer.compute_loss(model, batch)
    model.config.text_config._attn_implementation = "sdpa"
    assert torch.isfinite(trainer.compute_loss(model, batch))


# -- the CUDA release's precision ------------------------------------------------------------------------------------


def test_float16_recipe_keeps_ced_float32_and_trains_under_fp16_autocast(workspace, tmp_path) -> None:
    """LLaMA (and CLIP) in fp16, CED in float32 read from the float32 checkpoint, fp16 autocast in training.

    Not exercised here: the grad scaler. Accelerate creates it for CUDA only; on this CPU-only machine fp16 mixed
    precision runs the autocast without loss scaling (`trainer.accelerator.scaler` is None).
    """
    stored = LavCapForConditionalGeneration.from_pretrained(
        workspace / "model"
    ).model.audio_tower.state_dict()
    argv = common_args(workspace, tmp_path / "run") + [
        "--dtype", "float16", "--audio_tower_float32", "true", "--fp16", "true",
        "--max_steps", "2", "--learning_rate", "1e-3", "--logging_steps", "1", "--caption_metrics", "false",
    ]  # fmt: skip
    trainer = prepared_trainer(argv)
    model = trainer.model
    base = model.base_model.model
    assert base.lm_head.weight.dtype == torch.float16
    assert base.model.vision_tower.vision_model.embeddings.patch_embedding.weight.dtype == torch.float16
    for name, tensor in base.model.audio_tower.state_dict().items():
        plain = name.replace(".base_layer", "").replace(".modules_to_save.default", "")
        if "lora_" in name or ".original_module." in name or "num_batches" in name:
            continue
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, stored[plain]), name  # read in float32, not cast back up from fp16

    seen: list[torch.dtype] = []

    def record_dtype(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        seen.append(output.dtype)

    hook = base.language_model.layers[0].self_attn.o_proj.register_forward_hook(record_dtype)
    trainer.train()
    hook.remove()
    assert trainer.accelerator.mixed_precision == "fp16" and set(seen) == {torch.float16}
    assert trainer.accelerator.scaler is None  # CPU: the CUDA grad scaler is not used here
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and np.isfinite(losses).all()
    lora = [p for n, p in model.named_parameters() if "audio_tower" in n and "lora_B" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora) and any(p.abs().sum() > 0 for p in lora)


def test_components_build_reads_ced_in_float32_beside_a_float16_llm(workspace, tmp_path) -> None:
    save_component_parts(tmp_path)
    components = {"language_model": str(tmp_path / "llm"), "audio_encoder": str(tmp_path / "ced.pt")}
    components.update(num_frames=4, visual_embed_dim=32, dtype="float16")
    kept, _ = load_model_and_processor(ModelArguments(**components, audio_tower_float32=True))
    cast, _ = load_model_and_processor(ModelArguments(**components))
    reference, _ = load_model_and_processor(ModelArguments(**{**components, "dtype": None}))
    assert kept.lm_head.weight.dtype == cast.lm_head.weight.dtype == torch.float16
    kept_weights = kept.model.audio_tower.state_dict()
    for name, tensor in reference.model.audio_tower.state_dict().items():
        assert torch.equal(kept_weights[name], tensor), (
            name
        )  # the converted CED weights, never rounded to fp16
    assert cast.model.audio_tower.blocks[0].attn.q_proj.weight.dtype == torch.float16
    assert kept.model.audio_tower.blocks[0].attn.q_proj.weight.dtype == torch.float32
