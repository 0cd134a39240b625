"""SophonTrainer on tiny models: strategies, state handling, resume, guards and bad input."""

import os
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import SmallCNN, image_dataset, text_dataset, tiny_bert, tiny_config, tiny_resnet, tiny_vit
from datasets import Dataset
from transformers import TrainerCallback

from sophon_hf import SophonTrainer
from sophon_hf.config import _has_accelerator

ALL_STRATEGIES = ["full", "full_reinit_head", "linear_probe", "lora"]


def _trainer(model, tmp_output, train=None, restricted=None, **overrides):
    train = train if train is not None else image_dataset(32, seed=1)
    restricted = restricted if restricted is not None else image_dataset(32, seed=2, shift=0.3)
    return SophonTrainer(
        model, args=tiny_config(tmp_output, **overrides), train_dataset=train, restricted_dataset=restricted
    )


@pytest.mark.parametrize(
    "make_model, data",
    [(tiny_vit, "image"), (tiny_resnet, "image"), (tiny_bert, "text"), (SmallCNN, "image")],
    ids=["vit", "resnet", "bert", "plain-cnn"],
)
def test_every_strategy_moves_every_parameter_through_the_suppression_step(make_model, data, tmp_output):
    make = image_dataset if data == "image" else text_dataset
    for strategy in ALL_STRATEGIES:
        model = make_model()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer = _trainer(
            model,
            tmp_output,
            train=make(32, seed=1),
            restricted=make(32, seed=2),
            max_steps=2,
            learning_rate=0.0,  # normal training moves nothing: every change is the suppression step's
            simulation_strategies=[strategy],
            inner_optimizers=["sgd", "sgd_momentum", "adam:1e-3", "rmsprop:1e-3", "adagrad"],
            restricted_loss="kl_uniform",
        )
        trainer.train()
        unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
        # Fresh-head attackers (full fine-tuning or a linear probe on a re-initialised head) never use the model's
        # own head, so the meta-gradient cannot reach it; every other parameter must move.
        head = trainer.task.head_name
        fresh_head = strategy in ("full_reinit_head", "linear_probe")
        expected = [n for n in before if n.startswith(head + ".")] if fresh_head else []
        assert len(expected) == 2 * fresh_head
        assert unchanged == expected, strategy
        logged = {k for entry in trainer.state.log_history for k in entry}
        assert {"fts/query_loss", "fts/query_accuracy", "fts/grad_norm", "ntr/loss"} <= logged


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_batchnorm_statistics_never_absorb_restricted_data(tmp_output, strategy):
    model = tiny_resnet()
    trainer = _trainer(model, tmp_output, simulation_strategies=[strategy])
    trainer.create_optimizer()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(2):
        trainer.state.global_step = step
        assert trainer._fine_tuning_simulation_step()
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    assert any(not torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_ntr_steps_take_separate_optimizer_steps(tmp_output):
    model = SmallCNN()
    trainer = _trainer(model, tmp_output, ntr_steps=3, max_steps=3, logging_steps=2)
    trainer.train()
    # Trainer's own loop steps once per outer iteration; the two extra NTR steps are ours.
    assert trainer.state.global_step == 3
    state = trainer.optimizer.state_dict()["state"]
    assert int(next(iter(state.values()))["step"]) == 3 * 3
    logs = [v for v in trainer.state.log_history if "ntr/loss" in v]
    # Trainer's `loss` is the mean of the normal-training losses (three per outer iteration), as `ntr/loss` is.
    assert len(logs) == 1 and logs[0]["loss"] == pytest.approx(logs[0]["ntr/loss"], abs=1e-4)
    # The third iteration's means are not passed off as the whole run's in the end-of-training summary.
    assert "train_runtime" in trainer.state.log_history[-1] and "ntr/loss" not in trainer.state.log_history[-1]


def test_persistent_attacker_continues_its_trajectory_and_restarts_after_the_horizon(tmp_output):
    model = tiny_resnet()
    trainer = _trainer(
        model,
        tmp_output,
        simulation_strategies=["full_reinit_head"],
        inner_optimizers=["adam:1e-3"],
        inner_steps=2,
        simulation_horizon=4,
        simulation_support_size=5,
    )
    trainer.create_optimizer()
    trainer.state.global_step = 0
    assert trainer._fine_tuning_simulation_step()
    first = trainer._attacker
    assert first.steps == 2 and first.optimizer.t == 2 and len(first.support_pool) == 5
    head = set(trainer.task.head_param_names)
    assert set(first.own) == head and set(first.offsets) == {n for n, _ in model.named_parameters()} - head
    # The offsets are the attacker's own progress: nonzero, and small next to the weights.
    assert all(first.offsets[n].abs().max() > 0 for n in first.offsets)
    own = {n: t.clone() for n, t in first.own.items()}

    # The second outer iteration starts from the attacker's head (not a fresh one) and keeps its optimizer state.
    supports, queries = trainer._restricted_batches(torch.Generator().manual_seed(0), first.support_pool)
    pool_rows = trainer._restricted_rows(first.support_pool)["pixel_values"]
    for batch in supports:
        assert all(any(torch.equal(row, p) for p in pool_rows) for row in batch["pixel_values"])
    for batch in queries:
        assert not any(torch.equal(row, p) for row in batch["pixel_values"] for p in pool_rows)
    trainer.state.global_step = 1
    assert trainer._fine_tuning_simulation_step()
    assert trainer._attacker is first and first.steps == 4 and first.optimizer.t == 4
    assert all(not torch.equal(own[n], first.own[n]) for n in own)

    # After the horizon a fresh attacker starts.
    trainer.state.global_step = 2
    assert trainer._fine_tuning_simulation_step()
    assert trainer._attacker is not first and trainer._attacker.steps == 2


@pytest.mark.parametrize("follows", [False, True])
def test_suppression_step_size_follows_the_schedule_only_when_asked(follows, tmp_output):
    trainer = _trainer(SmallCNN(), tmp_output, max_steps=4, fts_learning_rate=1e-3, fts_follows_lr_schedule=follows)
    trainer.train()
    # Linear decay over 4 steps: the last outer iteration ran at 1/4 of the initial learning rate.
    expected = 1e-3 * 0.25 if follows else 1e-3
    assert trainer.fts_optimizer.param_groups[0]["lr"] == pytest.approx(expected)


def _trainer_with_optimizer(model, config, optimizer, lr_lambda):
    """A trainer given the user's own optimizer and a LambdaLR schedule on it."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    return SophonTrainer(
        model,
        args=config,
        train_dataset=image_dataset(32, seed=1),
        restricted_dataset=image_dataset(32, seed=2),
        optimizers=(optimizer, scheduler),
    )


def test_suppression_step_follows_the_schedule_of_a_user_optimizer_at_its_own_rate(tmp_output):
    model = SmallCNN()
    config = tiny_config(tmp_output, max_steps=4, fts_learning_rate=1e-3, fts_follows_lr_schedule=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)  # not learning_rate (5e-5): only the schedule counts
    trainer = _trainer_with_optimizer(model, config, optimizer, lambda step: 1 - step / 4)
    trainer.train()
    assert trainer.fts_optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.25)


class _Interrupt(TrainerCallback):
    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            control.should_training_stop = True


PERSISTENT = {"simulation_horizon": 4, "simulation_support_size": 6}


@pytest.mark.parametrize(
    "persistent",
    [
        {},
        PERSISTENT,
        # Checkpointed mid-trajectory with Adam moments and the attacker's own fresh head, or its LoRA adapters.
        {**PERSISTENT, "simulation_strategies": ["full_reinit_head"], "inner_optimizers": ["adam:1e-3"]},
        {**PERSISTENT, "simulation_strategies": ["lora"], "inner_optimizers": ["adam:1e-3"]},
    ],
    ids=["fresh", "persistent", "persistent-adam-own-head", "persistent-adam-lora"],
)
def test_resume_from_checkpoint_continues_exactly(tmp_path, persistent):
    def run(output_dir, resume=None, interrupt_at=None):
        model = tiny_vit(seed=3)
        trainer = _trainer(
            model,
            str(output_dir),
            max_steps=6,
            save_strategy="steps",
            save_steps=3,
            **{"simulation_strategies": ALL_STRATEGIES, "inner_optimizers": ["sgd", "adam:1e-3"], **persistent},
        )
        if interrupt_at:
            trainer.add_callback(_Interrupt(interrupt_at))
        trainer.train(resume_from_checkpoint=resume)
        return model

    straight = run(tmp_path / "straight")
    run(tmp_path / "interrupted", interrupt_at=3)
    checkpoint = tmp_path / "interrupted" / "checkpoint-3"
    assert (checkpoint / "fts_optimizer.pt").is_file() and (checkpoint / "model.safetensors").is_file()
    # A persistent attacker is part of the state: at step 3 (inner_steps 2, horizon 4) one is mid-trajectory.
    assert (checkpoint / "simulated_attacker_rank0.safetensors").is_file() == bool(persistent)
    resumed = run(tmp_path / "interrupted", resume=str(checkpoint))
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_checkpoints_record_the_users_batch_size_with_several_ntr_steps(tmp_path):
    import json

    trainer = _trainer(SmallCNN(), str(tmp_path), max_steps=1, ntr_steps=2, save_strategy="steps", save_steps=1)
    trainer.train()
    # Trainer compares this with per_device_train_batch_size on resume (and warns of a mismatch if it differs).
    state = json.loads((tmp_path / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["train_batch_size"] == trainer.args.per_device_train_batch_size == 8


def _checkpointed_vit_run(output_dir, resume=None, **overrides):
    trainer = _trainer(
        tiny_vit(seed=3), str(output_dir), max_steps=3, save_strategy="steps", save_steps=1, **overrides
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_a_model_only_checkpoint_resumes_with_a_warning(tmp_path, caplog):
    # save_only_model=True drops every optimizer state: resume from the weights, as Trainer does, and say so.
    _checkpointed_vit_run(tmp_path, save_only_model=True)
    checkpoint = tmp_path / "checkpoint-2"
    assert not (checkpoint / "fts_optimizer.pt").exists()
    with caplog.at_level("WARNING", logger="sophon_hf.trainer"):
        trainer = _checkpointed_vit_run(tmp_path, resume=str(checkpoint), save_only_model=True)
    assert trainer.state.global_step == 3
    assert "holds the model only (written with save_only_model=True?)" in caplog.text


def test_resuming_refuses_a_foreign_checkpoint_and_pickle_weights(tmp_path):
    _checkpointed_vit_run(tmp_path)
    checkpoint = tmp_path / "checkpoint-2"
    (checkpoint / "fts_optimizer.pt").unlink()  # Trainer's optimizer state without SophonTrainer's
    with pytest.raises(FileNotFoundError, match="not written by SophonTrainer"):
        _checkpointed_vit_run(tmp_path, resume=str(checkpoint))
    checkpoint = tmp_path / "checkpoint-1"
    state = safetensors.torch.load_file(checkpoint / "model.safetensors")
    (checkpoint / "model.safetensors").unlink()
    torch.save(state, checkpoint / "pytorch_model.bin")
    with pytest.raises(OSError, match=r"only pickle weights \(pytorch_model.bin\), which sophon_hf never loads"):
        _checkpointed_vit_run(tmp_path, resume=str(checkpoint))
    with pytest.raises(FileNotFoundError, match=r"'checkpoint-9' is not a checkpoint folder\. Pass a `checkpoint-N`"):
        _checkpointed_vit_run(tmp_path, resume="checkpoint-9")


class _Pickled:
    """Anything but tensors and containers: `weights_only=True` refuses to unpickle it."""


def test_resuming_never_unpickles_objects_from_the_suppression_optimizer_state(tmp_path):
    _checkpointed_vit_run(tmp_path)
    checkpoint = tmp_path / "checkpoint-2"
    torch.save({"state": {}, "param_groups": [], "payload": _Pickled()}, checkpoint / "fts_optimizer.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        _checkpointed_vit_run(tmp_path, resume=str(checkpoint))


def test_recipe_scripts_resolve_the_checkpoint_to_resume_from(tmp_path):
    from sophon_hf.utils import resolve_resume_checkpoint

    for step in (2, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    assert resolve_resume_checkpoint(None, str(tmp_path)) is None
    assert resolve_resume_checkpoint("last", str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert resolve_resume_checkpoint("true", str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert resolve_resume_checkpoint(str(tmp_path / "checkpoint-2"), str(tmp_path)) == str(tmp_path / "checkpoint-2")
    assert resolve_resume_checkpoint("checkpoint-2", str(tmp_path)) == str(tmp_path / "checkpoint-2")  # as listed
    # YAML recipes give booleans.
    assert resolve_resume_checkpoint(True, str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert resolve_resume_checkpoint(False, str(tmp_path)) is None and resolve_resume_checkpoint("false", "x") is None
    with pytest.raises(FileNotFoundError, match=r"no such checkpoint folder.*\['checkpoint-2', 'checkpoint-10'\]"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-9"), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="holds no checkpoints"):
        resolve_resume_checkpoint("last", str(tmp_path / "empty"))


def test_a_plain_module_checkpoint_with_pickle_weights_is_refused(tmp_path):
    # Trainer would fall back to `pytorch_model.bin` for a plain nn.Module: sophon_hf does not.
    trainer = _trainer(SmallCNN(), str(tmp_path), max_steps=2, save_strategy="steps", save_steps=1)
    trainer.train()
    checkpoint = tmp_path / "checkpoint-1"
    state = safetensors.torch.load_file(checkpoint / "model.safetensors")
    (checkpoint / "model.safetensors").unlink()
    torch.save(state, checkpoint / "pytorch_model.bin")
    resumed = _trainer(SmallCNN(), str(tmp_path), max_steps=2, save_strategy="steps", save_steps=1)
    with pytest.raises(FileNotFoundError, match=r"has no model.safetensors. It holds only pickle weights"):
        resumed.train(resume_from_checkpoint=str(checkpoint))


def test_floor_guard_stops_and_restores_last_good_weights(tmp_output):
    accuracies = iter([0.9, 0.2])
    snapshots = []

    class Snapshot:
        def __call__(self, eval_prediction):
            snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
            return {"accuracy": next(accuracies)}

    model = SmallCNN()
    config = tiny_config(tmp_output, max_steps=10, eval_strategy="steps", eval_steps=2, original_accuracy_floor=0.8)
    trainer = SophonTrainer(
        model,
        args=config,
        train_dataset=image_dataset(32, seed=1),
        restricted_dataset=image_dataset(32, seed=2),
        eval_dataset=image_dataset(16, seed=3),
        compute_metrics=Snapshot(),
    )
    trainer.train()
    assert trainer.state.global_step == 4
    assert "original_accuracy_floor" in trainer.stop_reason and not trainer.diverged
    for name, p in model.named_parameters():
        assert torch.equal(p, snapshots[0][name])
        assert not torch.equal(p, snapshots[1][name])
    trainer.save_model()  # the guard's stop is a finished run (it may be pushed), and its card says when it stopped
    card = (Path(tmp_output) / "README.md").read_text()
    assert "**Protection stopped** after 4 of 10 outer iterations: original-domain accuracy 0.2000" in card


def test_floor_guard_refuses_metrics_without_accuracy(tmp_output):
    config = tiny_config(tmp_output, max_steps=4, eval_strategy="steps", eval_steps=1, original_accuracy_floor=0.9)
    trainer = SophonTrainer(
        SmallCNN(),
        args=config,
        train_dataset=image_dataset(32, seed=1),
        restricted_dataset=image_dataset(32, seed=2),
        eval_dataset=image_dataset(16, seed=3),
        compute_metrics=lambda prediction: {"f1": 0.0},
    )
    with pytest.raises(
        ValueError,
        match=r"reads `eval_original_accuracy`, but compute_metrics returned \['f1'\]: make it return 'accuracy'",
    ):
        trainer.train()


def test_non_finite_meta_gradient_stops_cleanly_and_keeps_finite_weights(tmp_output):
    model = SmallCNN()
    # A simulated attacker whose step size blows its weights up: the meta-gradient becomes non-finite.
    trainer = _trainer(model, tmp_output, max_steps=5, inner_optimizers=["sgd:1e30"])
    trainer.train()
    assert trainer.state.global_step == 1
    assert trainer.stop_reason.startswith("the suppression meta-gradient became non-finite")
    assert "sgd:1e+30 in inner_optimizers" in trainer.stop_reason
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_divergence_is_not_hidden_by_a_later_stop_and_a_new_run_starts_clean(tmp_output):
    trainer = _trainer(SmallCNN(), tmp_output, max_steps=5, inner_optimizers=["sgd:1e30"])
    trainer.train()
    assert trainer.diverged and trainer.stopped_at == 0
    trainer._stop("original-domain accuracy 0.1000 fell below original_accuracy_floor=0.9")  # e.g. a final evaluate
    assert trainer.diverged and trainer.stop_reason.startswith("the suppression meta-gradient became non-finite")
    assert trainer.stop_reason.endswith(
        "; then original-domain accuracy 0.1000 fell below original_accuracy_floor=0.9"
    )
    trainer.args.inner_optimizers = ["sgd:1e-3"]  # retried with a sane step size on the same trainer
    trainer.train()
    assert not trainer.diverged and trainer.stop_reason is None and trainer.stopped_at is None


@pytest.mark.parametrize("role", ["train_dataset", "restricted_dataset"])
def test_nan_in_the_data_is_reported_as_bad_data_not_as_a_step_size(tmp_output, role):
    poisoned = image_dataset(32, seed=2).to_dict()
    poisoned["pixel_values"][3][0][0][0] = float("nan")
    data = {"train" if role == "train_dataset" else "restricted": Dataset.from_dict(poisoned)}
    trainer = _trainer(SmallCNN(), tmp_output, max_steps=5, restricted_batch_size=32, **data)
    with pytest.raises(ValueError, match=rf"`{role}` has NaN or infinite values in 'pixel_values' \(1 of the rows"):
        trainer.train()
    assert trainer.stop_reason is None


def test_eval_on_original_and_restricted_is_namespaced(tmp_output):
    model = SmallCNN()
    original = image_dataset(16, seed=3)
    pixels, labels = torch.tensor(original["pixel_values"]), torch.tensor(original["labels"])
    with torch.no_grad():
        predicted = model.eval()(pixels).argmax(-1)
    expected = (predicted == labels).float().mean().item()
    assert expected < 1
    # The same images labelled with the model's own predictions: accuracy 1 there, so each set is told apart.
    restricted = original.remove_columns("labels").add_column("labels", predicted.tolist())
    trainer = SophonTrainer(
        model,
        args=tiny_config(tmp_output, max_steps=1),
        train_dataset=image_dataset(32, seed=1),
        restricted_dataset=image_dataset(32, seed=2),
        eval_dataset=original,
        restricted_eval_dataset=restricted,
    )
    metrics = trainer.evaluate()
    assert metrics["eval_original_accuracy"] == pytest.approx(expected)
    assert metrics["eval_restricted_accuracy"] == 1.0
    # Counted batch by batch, the default accuracy is the same (batches of 3 leave a smaller last batch).
    trainer.args.batch_eval_metrics, trainer.args.per_device_eval_batch_size = True, 3
    batched = trainer.evaluate()
    for key in ("eval_original_accuracy", "eval_restricted_accuracy"):
        assert batched[key] == pytest.approx(metrics[key])


def test_save_model_writes_safetensors_that_reload(tmp_output):
    from transformers import ViTForImageClassification

    model = tiny_vit()
    trainer = _trainer(model, tmp_output, max_steps=1)
    trainer.train()
    trainer.save_model()
    assert os.path.isfile(os.path.join(tmp_output, "model.safetensors"))
    assert not any(f.endswith((".bin", ".pt", ".pth")) and "training_args" not in f for f in os.listdir(tmp_output))
    reloaded = ViTForImageClassification.from_pretrained(tmp_output)
    for (n, a), (_, b) in zip(model.named_parameters(), reloaded.named_parameters()):
        assert torch.equal(a, b), n


# ---------------------------------------------------------------------- bad input
def test_missing_restricted_dataset(tmp_output):
    with pytest.raises(
        ValueError, match="needs `restricted_dataset`: the domain the model must become non-fine-tunable"
    ):
        SophonTrainer(SmallCNN(), args=tiny_config(tmp_output), train_dataset=image_dataset())


@pytest.mark.parametrize(
    "dataset, match",
    [
        (Dataset.from_dict({"pixel_values": [[[[0.0]]]], "label": [0]}), "rename_column"),
        (Dataset.from_dict({"image": [[0.0]], "labels": [0]}), "image processor"),
        (Dataset.from_dict({"pixel_values": [[[[0.0]]]] * 2, "labels": [0, 7]}), r"label ids in \[0, 7\]"),
        (Dataset.from_dict({"pixel_values": [], "labels": []}), "empty"),
        (Dataset.from_dict({"pixel_values": [[[[0.0]]]] * 2, "labels": [0, -1]}), r"negative label ids .*filter"),
        (Dataset.from_dict({"text": ["a b"], "labels": [0]}), r"to_model_inputs\(dataset, tokenizer\)"),
    ],
    ids=["label-not-labels", "raw-images", "labels-out-of-range", "empty", "unlabelled", "raw-text"],
)
def test_bad_restricted_datasets(dataset, match, tmp_output):
    with pytest.raises(ValueError, match=match):
        _trainer(SmallCNN(), tmp_output, restricted=dataset)


def _text_with(ids_fill=None, length=8):
    dataset = text_dataset(16, length=length, seed=2).to_dict()
    if ids_fill is not None:
        dataset["input_ids"][3][2] = ids_fill
    return Dataset.from_dict(dataset)


@pytest.mark.parametrize(
    "make_model, data, match",
    [
        (tiny_vit, lambda: text_dataset(16), r"holds text-classification data \('input_ids'\) but ViTForImage"),
        (tiny_bert, lambda: image_dataset(16), r"holds image-classification data \('pixel_values'\) but BertFor"),
        (
            tiny_bert,
            lambda: _text_with(ids_fill=60),
            "has token ids up to 60 but BertForSequenceClassification has a vocabulary of 50",
        ),
        (
            tiny_bert,
            lambda: _text_with(length=32),
            r"has sequences of 32 tokens .* at most 16: tokenize with `truncation",
        ),
    ],
    ids=["text-for-vit", "images-for-bert", "token-outside-vocabulary", "too-long-for-positions"],
)
def test_data_the_model_cannot_take_is_refused_before_training(make_model, data, match, tmp_output):
    # Otherwise these fail deep inside the model's forward (an AttributeError, an index error, a shape mismatch).
    with pytest.raises(ValueError, match=rf"`restricted_dataset` {match}"):
        train = text_dataset(16) if make_model is tiny_bert else image_dataset(16)  # the model's own kind
        _trainer(make_model(), tmp_output, train=train, restricted=data())


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"simulation_strategies": ["prompt_tuning"]}, "Unknown simulation strategy"),
        ({"restricted_loss": "gradient_ascent"}, "Unknown restricted_loss"),
        ({"inner_optimizers": ["lbfgs"]}, "Unknown inner optimizer"),
        ({"inner_learning_rate": -1.0}, r"inner_learning_rate must be positive, got -1.0"),
        ({"fts_learning_rate": -1e-3}, r"fts_learning_rate must be >= 0 \(0 turns the suppression step off\), got"),
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps=1"),
        ({"inner_steps": 0}, "inner_steps"),
        ({"simulation_horizon": 1}, "shorter than inner_steps"),
        ({"simulation_horizon": 4, "first_order": False}, "needs first_order=True"),
        ({"simulation_support_size": 0}, "simulation_support_size must be"),
        ({"simulation_horizon": 5}, "not a multiple of inner_steps"),
        ({"fts_max_grad_norm": -0.5}, "fts_max_grad_norm must be >= 0"),
        ({"feature_suppression_weight": -1.0}, "feature_suppression_weight must be >= 0"),
    ],
)
def test_bad_config(overrides, match, tmp_output):
    with pytest.raises(ValueError, match=match):
        tiny_config(tmp_output, **overrides)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"restricted_batch_size": 1}, "restricted_batch_size must be >= 2"),
        ({"original_accuracy_floor": 1.5}, r"original_accuracy_floor must be in \(0, 1\]"),
        ({"original_accuracy_floor": 0.0}, r"original_accuracy_floor must be in \(0, 1\]"),
        ({"fsdp": "full_shard"}, "not FSDP or DeepSpeed"),
        ({"diffusion_timestep_range": [1, 5, 9]}, r"must be \[low, high\]"),
        ({"simulation_strategies": []}, "simulation_strategies is empty"),
        ({"inner_optimizers": []}, "inner_optimizers is empty"),
        ({"ntr_steps": 0}, "ntr_steps must be >= 1"),
        ({"lora_r": 0}, "lora_r must be >= 1"),
        ({"lora_alpha": 0}, "lora_alpha must be positive"),
        ({"auto_find_batch_size": True}, "does not support auto_find_batch_size"),
        ({"fts_follows_lr_schedule": True, "learning_rate": 0.0}, "set learning_rate > 0 or fts_follows_lr_schedule"),
    ],
)
def test_more_bad_configs(overrides, match, tmp_output):
    with pytest.raises(ValueError, match=match):
        tiny_config(tmp_output, **overrides)


@pytest.mark.skipif(_has_accelerator(), reason="with a GPU the processes train on it")
def test_several_processes_without_a_gpu_need_use_cpu(tmp_output, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as `accelerate launch --num_processes 2` sets it in each process
    with pytest.raises(ValueError, match=r"2 processes were launched on a machine without a GPU.*Set use_cpu=True"):
        tiny_config(tmp_output, use_cpu=False)


def test_single_strategy_and_optimizer_strings_become_lists(tmp_output):
    args = tiny_config(tmp_output, simulation_strategies="linear_probe", inner_optimizers="adam:1e-3")
    assert (args.simulation_strategies, args.inner_optimizers) == (["linear_probe"], ["adam:1e-3"])


def test_support_size_that_leaves_no_query_examples(tmp_output):
    with pytest.raises(ValueError, match="leaves no held-out query examples"):
        _trainer(SmallCNN(), tmp_output, simulation_support_size=32, simulation_horizon=4)


def test_a_dataset_missing_an_input_column_of_the_others_is_refused(tmp_output):
    no_mask = text_dataset(8, seed=3).remove_columns("attention_mask")
    with pytest.raises(ValueError, match=r"`eval_dataset` has no \['attention_mask'\] column"):
        SophonTrainer(
            tiny_bert(),
            args=tiny_config(tmp_output),
            train_dataset=text_dataset(),
            restricted_dataset=text_dataset(seed=2),
            eval_dataset=no_mask,
        )


def test_a_later_dataset_with_an_input_column_the_first_lacks_is_refused(tmp_output):
    # Without this the restricted data's mask was dropped and its padding reported as "no attention_mask".
    no_mask = text_dataset(8, seed=3).remove_columns("attention_mask")
    with pytest.raises(
        ValueError, match=r"`restricted_dataset` has \['attention_mask'\] column\(s\) that `train_dataset`"
    ):
        _trainer(tiny_bert(), tmp_output, train=no_mask, restricted=text_dataset(seed=2))


def test_a_dict_of_eval_datasets_is_refused_with_what_to_do(tmp_output):
    with pytest.raises(ValueError, match=r"dict of datasets \(\['a', 'b'\]\).*trainer.evaluate"):
        SophonTrainer(
            SmallCNN(),
            args=tiny_config(tmp_output),
            train_dataset=image_dataset(),
            restricted_dataset=image_dataset(seed=2),
            eval_dataset={"a": image_dataset(8), "b": image_dataset(8, seed=1)},
        )


def test_unpadded_text_is_refused_with_the_fix(tmp_output):
    ragged = Dataset.from_dict(
        {"input_ids": [[1, 2, 3], [4, 5, 6, 7]], "attention_mask": [[1, 1, 1], [1, 1, 1, 1]], "labels": [0, 1]}
    )
    with pytest.raises(ValueError, match="padding='max_length'"):
        _trainer(tiny_bert(), tmp_output, train=text_dataset(), restricted=ragged)


def test_padded_text_without_an_attention_mask_is_refused(tmp_output):
    padded = text_dataset(8, seed=3).remove_columns("attention_mask")
    ids = [row[:5] + [0, 0, 0] for row in padded["input_ids"]]  # BERT's pad token id is 0
    padded = padded.remove_columns("input_ids").add_column("input_ids", ids)
    with pytest.raises(ValueError, match=r"padded 'input_ids' \(pad token id 0\) but no 'attention_mask'"):
        _trainer(tiny_bert(), tmp_output, train=padded, restricted=padded)
    # Unpadded ids need no mask, and a decoder classifier (GPT-2) reads the last real token, which never sees the
    # padding after it.
    unpadded = text_dataset(8, seed=3).remove_columns("attention_mask")
    _trainer(tiny_bert(), tmp_output, train=unpadded, restricted=unpadded)
    from transformers import GPT2Config, GPT2ForSequenceClassification

    gpt2 = GPT2ForSequenceClassification(
        GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16, num_labels=5, pad_token_id=0)
    )
    _trainer(gpt2, tmp_output, train=padded, restricted=padded)


def test_ntr_steps_survive_a_last_batch_smaller_than_their_count(tmp_output):
    # A Trainer batch holds 8 rows x 3 NTR steps: with 25 rows the second outer iteration gets the 1 row left, which
    # splits into one chunk of 1 row and two empty ones (an empty chunk's loss is NaN and used to stop training).
    trainer = _trainer(SmallCNN(), tmp_output, train=image_dataset(25, seed=1), ntr_steps=3, max_steps=2)
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.stop_reason is None


def _scripted_eval_trainer(tmp_output, accuracies, **overrides):
    """A ViT trainer that evaluates and checkpoints every 3 steps; evaluations report `accuracies` in turn."""
    values = iter(accuracies)
    args = tiny_config(
        tmp_output,
        **{
            "max_steps": 6,
            "eval_strategy": "steps",
            "eval_steps": 3,
            "save_strategy": "steps",
            "save_steps": 3,
            **overrides,
        },
    )
    return SophonTrainer(
        tiny_vit(),
        args=args,
        train_dataset=image_dataset(32, seed=1),
        restricted_dataset=image_dataset(32, seed=2),
        eval_dataset=image_dataset(16, seed=3),
        compute_metrics=lambda _: {"accuracy": next(values)},
    )


def _fingerprint_of(folder):
    from transformers import ViTForImageClassification

    from sophon_hf.utils import model_fingerprint

    return model_fingerprint(ViTForImageClassification.from_pretrained(folder))


def test_trainers_early_stopping_and_optim_apply_to_normal_training(tmp_output):
    from transformers import EarlyStoppingCallback

    # The original accuracy falls at the second evaluation: patience 1 stops training there, at step 6 of 9.
    trainer = _scripted_eval_trainer(
        tmp_output,
        [0.9, 0.5, 0.4],
        max_steps=9,
        optim="sgd",
        load_best_model_at_end=True,
        metric_for_best_model="eval_original_accuracy",
    )
    trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=1))
    trainer.train()
    assert trainer.state.global_step == 6
    assert isinstance(getattr(trainer.optimizer, "optimizer", trainer.optimizer), torch.optim.SGD)
    assert isinstance(trainer.fts_optimizer, torch.optim.Adam)  # the suppression step keeps its own Adam


def test_load_best_model_at_end_loads_every_tensor_of_the_best_checkpoint(tmp_output):
    from sophon_hf.utils import model_fingerprint

    trainer = _scripted_eval_trainer(
        tmp_output, [0.9, 0.1], load_best_model_at_end=True, metric_for_best_model="eval_original_accuracy"
    )
    trainer.train()
    # ViT checkpoints carry transformers' legacy attention key names: a raw state-dict load would skip them.
    assert model_fingerprint(trainer.model) == _fingerprint_of(os.path.join(tmp_output, "checkpoint-3"))


def test_accuracy_floor_restores_the_same_weights_after_a_resume(tmp_output):
    from sophon_hf.utils import model_fingerprint

    first = _scripted_eval_trainer(tmp_output, [0.9, 0.1], original_accuracy_floor=0.5)
    first.train()
    best = _fingerprint_of(os.path.join(tmp_output, "checkpoint-3"))
    assert model_fingerprint(first.model) == best
    resumed = _scripted_eval_trainer(tmp_output, [0.1], original_accuracy_floor=0.5)
    resumed.train(resume_from_checkpoint=os.path.join(tmp_output, "checkpoint-3"))
    assert "restored the weights" in resumed.stop_reason
    assert model_fingerprint(resumed.model) == best


def test_predict_and_evaluate_take_ordinary_datasets(tmp_output):
    trainer = _trainer(tiny_vit(), tmp_output, max_steps=1)
    trainer.train()
    extra = image_dataset(8, seed=4).add_column("file", [f"img{i}.png" for i in range(8)])  # a string column
    assert 0 <= trainer.evaluate(extra)["eval_accuracy"] <= 1
    unlabelled = trainer.predict(image_dataset(8, seed=4).remove_columns("labels"))
    assert unlabelled.predictions.shape == (8, 5) and unlabelled.label_ids is None


@pytest.mark.parametrize("strategy, expected_mode", [("linear_probe", False), ("full", True)])
def test_simulated_probe_sees_the_body_in_eval_mode_like_the_real_probe(strategy, expected_mode, tmp_output):
    model = SmallCNN()
    modes = []
    trainer = _trainer(model, tmp_output, max_steps=1, simulation_strategies=[strategy])
    handle = model.body.register_forward_pre_hook(lambda module, _: modes.append(module.training))
    trainer._fine_tuning_simulation_step()
    handle.remove()
    assert modes and set(modes) == {expected_mode}  # BatchNorm statistics and dropout as in `attacks.run_attack`
    assert model.training  # restored for normal training


def test_simulated_lora_attacker_trains_in_train_mode_and_holds_no_copy_of_the_weights(tmp_output):
    # `from_pretrained` returns a model in eval mode; the real LoRA attack trains in train mode whatever it was given.
    model = SmallCNN().eval()
    trainer = _trainer(model, tmp_output, max_steps=1, simulation_strategies=["lora"])
    lora_model, _, _ = trainer._lora
    assert all(t.is_meta for t in [*lora_model.parameters(), *lora_model.buffers()])  # no second copy in memory
    modes = []
    body = lora_model.get_submodule("base_model.model.body")
    handle = body.register_forward_pre_hook(lambda module, _: modes.append(module.training))
    trainer.create_optimizer()
    assert trainer._fine_tuning_simulation_step()
    handle.remove()
    assert modes and set(modes) == {True}
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("targets", [["nope"], ["q_proj", "valeu"]], ids=["none-match", "one-misspelt"])
def test_lora_targets_matching_nothing(tmp_output, targets):
    # One misspelt name among valid ones would otherwise adapt fewer layers than asked for, silently.
    with pytest.raises(ValueError, match=rf"\['{targets[-1]}'\] match no module of ViTForImageClassification"):
        _trainer(tiny_vit(), tmp_output, simulation_strategies=["lora"], lora_target_modules=targets)


def test_model_that_is_not_a_classifier(tmp_output):
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="not a classifier"):
        _trainer(model, tmp_output, train=text_dataset(), restricted=text_dataset())


def test_a_token_classifier_is_refused_with_the_class_to_use(tmp_output):
    from transformers import BertConfig, BertForTokenClassification

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_labels=5)
    with pytest.raises(ValueError, match="classifies every token.*AutoModelForSequenceClassification"):
        _trainer(BertForTokenClassification(config), tmp_output, train=text_dataset(), restricted=text_dataset())


def test_diffusion_loss_on_classifier(tmp_output):
    with pytest.raises(ValueError, match="denial_of_service"):
        _trainer(SmallCNN(), tmp_output, restricted_loss="denial_of_service")


def test_floor_without_eval_dataset(tmp_output):
    with pytest.raises(ValueError, match="original_accuracy_floor needs"):
        _trainer(SmallCNN(), tmp_output, original_accuracy_floor=0.8)


def test_head_is_found_and_overridable(tmp_output):
    assert _trainer(tiny_resnet(), tmp_output).task.head_name == "classifier.1"
    assert _trainer(SmallCNN(), tmp_output).task.head_name == "fc"
    with pytest.raises(ValueError, match="not a module"):
        _trainer(SmallCNN(), tmp_output, head_name="classifier")


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_feature_suppression_term_reaches_the_meta_gradient(strategy, tmp_output):
    def query_losses(weight):
        model = tiny_resnet(seed=5)
        trainer = _trainer(model, tmp_output, simulation_strategies=[strategy], feature_suppression_weight=weight)
        trainer.create_optimizer()
        assert trainer._fine_tuning_simulation_step()
        return trainer._metrics["fts/query_loss"][-1], model

    plain, plain_model = query_losses(0.0)
    with_features, feature_model = query_losses(10.0)
    # Same batches and attacker (seeded by step): the difference is the feature term, which is positive.
    assert with_features > plain
    assert any(not torch.equal(a, b) for a, b in zip(plain_model.parameters(), feature_model.parameters()))


def test_bf16_autocast_runs_the_simulation_and_normal_training(tmp_output):
    model = SmallCNN()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _trainer(model, tmp_output, bf16=True, simulation_strategies=ALL_STRATEGIES, max_steps=4)
    trainer.train()
    assert trainer.stop_reason is None
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all() and not torch.equal(p, before[name]), name


def test_user_supplied_optimizer_keeps_a_separate_suppression_state(tmp_output):
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    trainer = _trainer_with_optimizer(model, tiny_config(tmp_output, max_steps=2), optimizer, lambda step: 1.0)
    trainer.train()
    assert isinstance(trainer.fts_optimizer, torch.optim.Adam) and trainer.fts_optimizer is not optimizer
    assert trainer.state.global_step == 2


class _Spy:
    """Calls the real function and keeps what it returned (the project code still runs unchanged)."""

    def __init__(self, function):
        self.function, self.results = function, []

    def __call__(self, *args, **kwargs):
        self.results.append(self.function(*args, **kwargs))
        return self.results[-1]


@pytest.mark.parametrize("strategy", ["full_reinit_head", "linear_probe"])
def test_simulated_head_strategies_start_from_a_fresh_head_and_adapt_what_they_claim(strategy, tmp_output):
    import math

    model = SmallCNN()
    with torch.no_grad():  # the released head predicts uniformly: kept as it is, its first loss is exactly log(5)
        model.fc.weight.zero_()
        model.fc.bias.zero_()
    trainer = _trainer(
        model,
        tmp_output,
        simulation_strategies=[strategy],
        inner_steps=1,
        simulation_horizon=2,
        inner_optimizers=["sgd:0.5"],
    )
    trainer.create_optimizer()
    assert trainer._fine_tuning_simulation_step()
    first_support_loss = trainer._metrics["fts/support_loss"][-1]
    assert abs(first_support_loss - math.log(5)) > 1e-3, "the simulated attacker kept the released head"
    attacker = trainer._attacker
    head = set(trainer.task.head_param_names)
    body = {n for n, _ in model.named_parameters()} - head
    assert set(attacker.own) == head  # the attacker's own, fresh head
    # A probe moves no body weight; full_reinit_head moves every body weight.
    assert set(attacker.offsets) == (set() if strategy == "linear_probe" else body)
    # The fresh head's gradient never reaches the model's head: it gets no suppression update.
    assert torch.equal(model.fc.weight, torch.zeros_like(model.fc.weight))


def test_simulated_lora_attacker_trains_adapters_and_the_released_head(tmp_output):
    # The real LoRA attack (attacks.run_attack) trains the kept head with the adapters: the simulated one must too.
    model = SmallCNN()
    trainer = _trainer(
        model,
        tmp_output,
        simulation_strategies=["lora"],
        inner_steps=2,
        simulation_horizon=4,
        inner_optimizers=["adam"],
    )
    trainer.create_optimizer()
    assert trainer._fine_tuning_simulation_step()
    attacker = trainer._attacker
    head = set(trainer.task.head_param_names)
    # The head moved away from the model's (an offset from it, like a full attacker's body); the adapters are its own.
    _, base_map, adapters = trainer._lora
    assert {base_map[n] for n in attacker.offsets} == head
    assert all(attacker.offsets[n].abs().sum() > 0 for n in attacker.offsets)
    assert set(attacker.own) == set(adapters)
    # An attacker checkpointed before the head was trained has no offset for it: it resumes from the model's head.
    attacker.offsets = {}
    trainer.state.global_step = 1
    assert trainer._fine_tuning_simulation_step() and trainer._attacker is attacker and attacker.steps == 4


def test_suppression_step_is_adam_on_the_clipped_meta_gradient(tmp_output, monkeypatch):
    import sophon_hf.trainer as trainer_module

    spy = _Spy(trainer_module.simulate_finetuning)
    monkeypatch.setattr(trainer_module, "simulate_finetuning", spy)
    model = SmallCNN()
    trainer = _trainer(model, tmp_output, simulation_strategies=["full"], fts_max_grad_norm=1e-3)
    trainer.create_optimizer()
    assert trainer._fine_tuning_simulation_step()
    (result,) = spy.results
    names = [n for n, _ in model.named_parameters()]
    meta = torch.cat([result.meta_grads[n].reshape(-1) for n in names])
    assert meta.norm() > 1e-3  # so clipping is active
    assert trainer._metrics["fts/grad_norm"][-1] == pytest.approx(meta.norm().item(), rel=1e-5)
    # Adam's first moment after one step is (1 - beta1) * grad: the gradient the suppression optimizer received.
    state = trainer.fts_optimizer.state
    applied = torch.cat([state[p]["exp_avg"].reshape(-1) / 0.1 for _, p in model.named_parameters()])
    expected = meta * (1e-3 / (meta.norm() + 1e-6))  # same direction (descent on the suppression loss), norm clipped
    torch.testing.assert_close(applied, expected, rtol=1e-4, atol=1e-9)
    # The normal-training optimizer took no step.
    assert not trainer.optimizer.state


def test_first_order_false_reaches_the_simulation(tmp_output):
    def grad_norm(first_order):
        trainer = _trainer(SmallCNN(), tmp_output, simulation_strategies=["full"], first_order=first_order)
        trainer.create_optimizer()
        assert trainer._fine_tuning_simulation_step()
        return trainer._metrics["fts/grad_norm"][-1]

    # Same seed, batches and attacker: only the order of the meta-gradient differs.
    assert grad_norm(True) != pytest.approx(grad_norm(False), rel=1e-4)


def test_second_order_needs_attention_with_a_second_derivative(tmp_output):
    vit = tiny_vit()
    vit.config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        _trainer(vit, tmp_output, first_order=False)
    vit.config._attn_implementation = "eager"
    trainer = _trainer(vit, tmp_output, simulation_strategies=["full"], first_order=False)
    trainer.create_optimizer()
    assert trainer._fine_tuning_simulation_step()
    _trainer(tiny_resnet(), tmp_output, first_order=False)  # no attention, nothing to refuse


def test_every_outer_iteration_simulates_on_new_restricted_batches(tmp_output):
    trainer = _trainer(SmallCNN(), tmp_output, restricted_batch_size=4)
    drawn = []
    for step in (0, 1):
        trainer.state.global_step = step
        supports, _ = trainer._restricted_batches(trainer._generator(salt=0))
        drawn.append(torch.cat([b["pixel_values"] for b in supports]))
    assert not torch.equal(drawn[0], drawn[1])


def test_persistent_attacker_resumes_from_its_offsets_head_and_support_pool(tmp_output):
    model = SmallCNN()
    trainer = _trainer(
        model,
        tmp_output,
        simulation_strategies=["full_reinit_head"],
        inner_optimizers=["sgd:0.1"],
        simulation_horizon=4,
        simulation_support_size=5,
    )
    trainer.create_optimizer()
    trainer.state.global_step = 0
    assert trainer._fine_tuning_simulation_step()
    attacker = trainer._attacker
    offsets = {n: t.clone() for n, t in attacker.offsets.items()}
    own = {n: t.clone() for n, t in attacker.own.items()}
    pool_rows = trainer._restricted_rows(attacker.support_pool)["pixel_values"]
    expected_start = {n: model.get_parameter(n).detach() + offsets[n] for n in offsets} | own

    calls = []
    real_loss = trainer.task.loss

    def recording_loss(m, batch, params=None, generator=None):
        calls.append((batch, params))
        return real_loss(m, batch, params, generator=generator)

    trainer.task.loss = recording_loss  # records, then runs the real task loss
    trainer.state.global_step = 1
    assert trainer._fine_tuning_simulation_step()
    _, first_params = calls[0]
    for name, value in expected_start.items():
        torch.testing.assert_close(first_params[name], value, msg=name)
    for batch, _ in calls:  # the attacker still fine-tunes on its few examples only
        assert all(any(torch.equal(row, p) for p in pool_rows) for row in batch["pixel_values"])


class _RecordingTrainer(SophonTrainer):
    def _ntr_loss(self, model, batch, generator):
        self.ntr_batches = [*getattr(self, "ntr_batches", []), batch]
        return super()._ntr_loss(model, batch, generator)


def test_ntr_steps_split_the_batch_into_disjoint_chunks(tmp_output):
    trainer = _RecordingTrainer(
        SmallCNN(),
        args=tiny_config(tmp_output, ntr_steps=3, max_steps=1),
        train_dataset=image_dataset(32, seed=1),
        restricted_dataset=image_dataset(32, seed=2, shift=0.3),
    )
    trainer.train()
    rows = torch.cat([b["pixel_values"].reshape(len(b["pixel_values"]), -1) for b in trainer.ntr_batches])
    assert len(trainer.ntr_batches) == 3 and len(rows) == 24  # 3 steps x a full per-device batch of 8
    assert len(torch.unique(rows, dim=0)) == 24  # no row trained twice


def test_intermediate_ntr_steps_are_clipped_like_the_last(tmp_output):
    model = SmallCNN()
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    trainer = SophonTrainer(
        model,
        args=tiny_config(tmp_output, ntr_steps=3, max_steps=1, max_grad_norm=1e-3, fts_learning_rate=1e-12),
        train_dataset=image_dataset(32, seed=1),
        restricted_dataset=image_dataset(32, seed=2, shift=0.3),
        optimizers=(optimizer, scheduler),
    )
    trainer.train()
    moved = (torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - before).norm()
    # Three SGD steps of lr 1 on gradients clipped to 1e-3 (plus a negligible suppression step).
    assert moved <= 3 * 1e-3 + 1e-6
