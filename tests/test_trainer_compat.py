"""TrainingArguments / Trainer features an HF user passes to SophonConfig / SophonTrainer: each works or is refused."""

import copy

import pytest
import torch
from conftest import SmallCNN, image_dataset, tiny_config, tiny_vit
from test_hub import FakeHub

from sophon_hf import SophonTrainer


def _config(tmp_output, **overrides):
    return tiny_config(tmp_output, **{"max_steps": 2, **overrides})


def _trainer(model, tmp_output, evaluation=False, **overrides):
    extra = {}
    if evaluation:
        extra = dict(
            eval_dataset=image_dataset(16, seed=3), restricted_eval_dataset=image_dataset(16, seed=4, shift=0.3)
        )
    return SophonTrainer(
        model,
        args=_config(tmp_output, **overrides),
        train_dataset=image_dataset(32, seed=1),
        restricted_dataset=image_dataset(32, seed=2, shift=0.3),
        **extra,
    )


def test_push_to_hub_argument_saves_and_pushes_once(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    hub = FakeHub(tmp_path / "remote")
    hub.install(monkeypatch)
    trainer = _trainer(tiny_vit(), str(tmp_path / "out"), push_to_hub=True, hub_model_id="me/vit-protected")
    trainer.train()
    trainer.save_model()  # with args.push_to_hub, Trainer.save_model pushes
    trainer.push_to_hub()
    assert hub.calls.count("create_commit") == 2
    assert "model.safetensors" in hub.files("me/vit-protected")


def _meta_gradient(model, tmp_output, **overrides):
    trainer = _trainer(model, tmp_output, max_steps=1, inner_optimizers=["adam:1e-2"], inner_steps=4, **overrides)
    captured = {}
    step = trainer._get_fts_optimizer().step

    def capture(*args, **kwargs):
        captured.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    trainer.fts_optimizer.step = capture
    trainer.train()
    return captured, trainer


@pytest.mark.parametrize("strategy", ["full", "full_reinit_head"])
def test_gradient_checkpointing_does_not_change_the_simulation(strategy, tmp_output, one_thread):
    base = tiny_vit()
    plain, _ = _meta_gradient(copy.deepcopy(base), tmp_output, simulation_strategies=[strategy])
    model = copy.deepcopy(base)
    checkpointed, trainer = _meta_gradient(
        model, tmp_output, simulation_strategies=[strategy], gradient_checkpointing=True
    )
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-7, msg=name)
    assert model.vit.layers[0].gradient_checkpointing  # normal training still checkpoints


def test_gradient_checkpointing_on_a_plain_module_is_refused(tmp_output):
    with pytest.raises(ValueError, match="gradient_checkpointing=True needs a Transformers or Diffusers model"):
        _trainer(SmallCNN(), tmp_output, gradient_checkpointing=True)


@pytest.mark.parametrize("make_model", [tiny_vit, SmallCNN], ids=["vit", "plain-module"])
def test_label_smoothing_applies_to_normal_training(make_model, tmp_output, one_thread):
    base = make_model()
    weights = {}
    for smoothing in (0.0, 0.5):
        model = copy.deepcopy(base)
        _trainer(model, tmp_output, label_smoothing_factor=smoothing, fts_learning_rate=0.0).train()
        weights[smoothing] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert not torch.equal(weights[0.0], weights[0.5])


def test_remove_unused_columns_keeps_labels_of_plain_modules(tmp_output, one_thread):
    trainer = _trainer(SmallCNN(), tmp_output, evaluation=True, remove_unused_columns=True)
    assert "eval_original_accuracy" in trainer.evaluate()
    trainer.train()
    assert trainer.state.global_step == 2


def test_num_train_epochs_without_max_steps_is_honoured(tmp_output, one_thread):
    trainer = _trainer(SmallCNN(), tmp_output, max_steps=None, num_train_epochs=1, ntr_steps=2)
    trainer.train()
    # 32 examples, batches of 8, two NTR batches per outer iteration: 2 outer iterations per epoch
    assert trainer.state.global_step == 2 and trainer.state.epoch == 1
    assert _config(tmp_output, max_steps=None).max_steps == 1000  # the documented default without epochs


@pytest.mark.parametrize("metric", ["accuracy", None])
def test_metric_for_best_model_is_checked_before_training(metric, tmp_output):
    # The example names the original domain's metric (the restricted one would keep the least protected checkpoint).
    with pytest.raises(ValueError, match=r"original_accuracy.*\(e.g. metric_for_best_model='original_accuracy'\)"):
        _trainer(
            SmallCNN(),
            tmp_output,
            evaluation=True,
            eval_strategy="steps",
            save_strategy="steps",
            load_best_model_at_end=True,
            metric_for_best_model=metric,
        )


def test_hyperparameter_search_is_refused(tmp_output):
    with pytest.raises(NotImplementedError, match="hyperparameter_search"):
        _trainer(SmallCNN(), tmp_output).hyperparameter_search(n_trials=1)


@pytest.mark.slow  # compiling takes about 30 s on 2 CPU cores (and needs a C compiler)
def test_torch_compile_trains_and_the_simulation_runs_on_the_module_itself(tmp_output):
    model = SmallCNN()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _trainer(model, tmp_output, torch_compile=True)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "fts/grad_norm" in entry]
    assert len(logged) == 2 and all(entry["fts/grad_norm"] > 0 for entry in logged)
    assert all(torch.isfinite(p).all() and not torch.equal(p, before[n]) for n, p in model.named_parameters())
