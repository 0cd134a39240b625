"""The fine-tuning attack harness: strategies, optimizers, scratch, determinism, resume, bad input, distribution."""

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import SmallCNN, image_dataset, run_two_processes, text_dataset, tiny_bert, tiny_vit
from datasets import Dataset, DatasetDict, Value
from torch.utils.data import TensorDataset

from sophon_hf.attacks import (
    OPTIMIZERS,
    STRATEGIES,
    AttackSpec,
    build_scratch_model,
    default_lora_targets,
    evaluate_finetuning_resistance,
    resolve_attacks,
    run_attack,
)
from sophon_hf.report import ResistanceReport
from sophon_hf.tasks import get_task

# The test machine's cores are shared: one intra-op thread avoids OpenMP contention (tiny steps 20x slower).
pytestmark = pytest.mark.usefixtures("one_thread")


class MLP(nn.Module):
    """A plain 2-layer classifier on flattened 8x8 images."""

    def __init__(self, num_labels: int = 5, seed: int = 3):
        super().__init__()
        torch.manual_seed(seed)
        self.hidden = nn.Linear(64, 16)
        self.out = nn.Linear(16, num_labels)

    def forward(self, pixel_values):
        return self.out(torch.relu(self.hidden(pixel_values.flatten(1))))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(before, model):
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


def _prepared(model, n_train=24, n_test=16):
    task = get_task(model)
    train = task.prepare_dataset(image_dataset(n_train, seed=0), "train")
    test = task.prepare_dataset(image_dataset(n_test, seed=1), "test")
    return task, train[:], test


# ------------------------------------------------------------------------------------------------ strategies
@pytest.mark.parametrize("make_model", [SmallCNN, tiny_vit], ids=["cnn", "vit"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_trains_exactly_its_parameters(make_model, strategy):
    model = make_model()
    before = _state(model)
    task, train, test = _prepared(model)
    spec = AttackSpec(strategy=strategy, optimizer="adam", learning_rate=1e-2, steps=3, batch_size=8)
    run = run_attack(model, task, train, test, spec, return_model=True)
    assert [step for step, _ in run["curve"]] == [0, 1, 2, 3]
    assert not run["diverged"]
    _assert_same_state(before, model)  # the input model is never modified

    trained = dict(run["model"].named_parameters())
    head = task.head_name
    for name, param in trained.items():
        if strategy == "lora":
            original = before.get(name.removeprefix("base_model.model.").replace(".base_layer", ""))
            if "lora_" in name or name.startswith(f"base_model.model.{head}."):
                assert param.requires_grad, name
            else:
                assert not param.requires_grad and torch.equal(param, original), name
            continue
        original = before[name]
        should_train = strategy != "linear_probe" or name.startswith(f"{head}.")
        assert param.requires_grad == should_train, name
        if should_train:
            assert not torch.equal(param, original), f"{name} did not change"
        else:
            assert torch.equal(param, original), f"{name} changed although frozen"
    if strategy == "lora":
        assert any("lora_B" in n and p.abs().sum() > 0 for n, p in trained.items())  # adapters really trained


@pytest.mark.parametrize("make_model", [tiny_vit, tiny_bert, MLP], ids=["vit", "bert", "mlp"])
def test_a_fresh_head_is_initialised_as_a_fresh_models_head(make_model):
    model = make_model()
    task = get_task(model)
    heads = [task.fresh_head(model, torch.Generator().manual_seed(seed)) for seed in (0, 0, 1)]
    weight, bias = (heads[0][f"{task.head_name}.{n}"] for n in ("weight", "bias"))
    if make_model is MLP:  # plain modules: nn.Linear's own default, uniform in +-1/sqrt(fan_in)
        assert weight.abs().max() <= 1 / math.sqrt(weight.shape[1]) and bias.abs().sum() > 0
    else:  # what `from_pretrained(..., ignore_mismatched_sizes=True)` and the scratch model give: N(0, 0.02), zero bias
        assert weight.std().item() == pytest.approx(model.config.initializer_range, rel=0.3) and not bias.any()
        scratch_head = build_scratch_model(model, seed=0).get_submodule(task.head_name)
        assert scratch_head.weight.std().item() == pytest.approx(weight.std().item(), rel=0.3)
        assert not scratch_head.bias.any()
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])  # reproducible from the generator
    assert not torch.equal(heads[0][f"{task.head_name}.weight"], heads[2][f"{task.head_name}.weight"])


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_changes_the_weights(optimizer):
    model = MLP()
    task, train, test = _prepared(model)
    spec = AttackSpec(optimizer=optimizer, learning_rate=1e-2, steps=2, batch_size=8, weight_decay=0.01)
    trained = run_attack(model, task, train, test, spec, return_model=True)["model"]
    for name, param in trained.named_parameters():
        assert not torch.equal(param, model.get_parameter(name)), name


def test_lora_leaves_the_base_untouched_and_trains_the_head_copy():
    model = tiny_vit()
    before = _state(model)
    task, train, test = _prepared(model)
    spec = AttackSpec(strategy="lora", learning_rate=1e-2, steps=3, batch_size=8, lora_rank=2)
    peft_model = run_attack(model, task, train, test, spec, return_model=True)["model"]
    _assert_same_state(before, model)
    base = peft_model.get_base_model()
    assert default_lora_targets(model, task.head_name) == ["q_proj", "v_proj"]
    q_proj = base.vit.layers[0].attention.q_proj
    assert torch.equal(q_proj.base_layer.weight, before["vit.layers.0.attention.q_proj.weight"])
    assert not torch.equal(base.classifier.weight, before["classifier.weight"])  # the copy's head trained


def test_lora_trains_the_head_and_nothing_named_like_it():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32, num_labels=5)
    model = DistilBertForSequenceClassification(config)  # its `pre_classifier` ends with the head's name
    task = get_task(model)
    train = task.prepare_dataset(text_dataset(24), "train")[:]
    test = task.prepare_dataset(text_dataset(16, seed=1), "test")
    spec = AttackSpec(strategy="lora", learning_rate=1e-2, steps=2, batch_size=8, lora_rank=2)
    trained = run_attack(model, task, train, test, spec, return_model=True)["model"]
    trainable = {n for n, p in trained.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable == {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}


def test_default_lora_targets_for_bert_and_plain_modules():
    assert default_lora_targets(tiny_bert(), "classifier") == ["query", "value"]
    assert default_lora_targets(MLP(), "out") == ["hidden"]


# ------------------------------------------------------------------------------------------------ scratch
@pytest.mark.parametrize("make_model", [SmallCNN, tiny_vit, MLP], ids=["cnn", "vit", "mlp"])
def test_scratch_starts_from_fresh_weights(make_model):
    model = make_model()
    with torch.no_grad():  # a "released" model: every tensor moved away from any initialisation
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1 + 0.5)
    before = _state(model)
    scratch = build_scratch_model(model, seed=0)
    _assert_same_state(before, model)
    assert type(scratch) is type(model)
    for name, param in scratch.named_parameters():
        assert param.shape == model.get_parameter(name).shape
        assert not torch.equal(param, model.get_parameter(name)), f"{name} was copied, not re-initialised"
    again = build_scratch_model(model, seed=0)
    other = build_scratch_model(model, seed=1)
    weights = [n for n, p in scratch.named_parameters() if p.dim() > 1]
    assert all(torch.equal(scratch.get_parameter(n), again.get_parameter(n)) for n in weights)
    assert all(not torch.equal(scratch.get_parameter(n), other.get_parameter(n)) for n in weights)


def test_harness_scratch_curve_is_the_mean_over_fresh_initialisations():
    model = MLP()
    spec = AttackSpec(steps=4, batch_size=8, eval_interval=2, seed=5)
    train, test_data = image_dataset(24), image_dataset(16, seed=1)
    task, _, test = _prepared(model)
    # Three initialisations (the default): seeds 5, 5 + 7919, 5 + 2 * 7919; the curve starts at their mean.
    report = evaluate_finetuning_resistance(model, train, test_data, attacks=[spec])
    fresh = [task.evaluate(build_scratch_model(model, seed=5 + 7919 * k), test) for k in range(3)]
    assert len(set(fresh)) > 1, "the initialisations should differ"
    assert report.attacks[0]["curves"]["scratch"][0][1] == pytest.approx(sum(fresh) / 3)
    assert report.scratch_recipe["initialisations"] == 3
    assert report.scratch_recipe["optimizer"] == "adam" and report.scratch_recipe["learning_rates"] == [
        1e-4,
        1e-3,
        1e-2,
    ]
    # One initialisation: exactly the fresh model's curve.
    single = evaluate_finetuning_resistance(model, train, test_data, attacks=[spec], scratch_inits=1)
    assert single.attacks[0]["curves"]["scratch"][0][1] == fresh[0]
    with pytest.raises(ValueError, match="scratch_inits must be >= 1"):
        evaluate_finetuning_resistance(model, train, test_data, attacks=[spec], scratch_inits=0)


def test_tuned_scratch_compares_each_attack_with_the_best_learning_rate_at_its_budget(tmp_output):
    model = MLP()
    train, test_data = image_dataset(24), image_dataset(16, seed=1)
    short, long = AttackSpec(steps=2, batch_size=8, seed=5), AttackSpec(steps=6, batch_size=8, seed=5)
    rates = [1e-4, 3e-2]
    tuned = evaluate_finetuning_resistance(
        model, train, test_data, [short, long], scratch_inits=2, scratch_learning_rates=rates, output_dir=tmp_output
    )
    for record in tuned.attacks:
        spec = AttackSpec.from_dict(record["spec"])
        # Each rate's curve is what a plain single-recipe scratch baseline at that rate gives.
        singles = {
            rate: evaluate_finetuning_resistance(
                model, train, test_data, [spec], scratch_inits=2, scratch_recipe={"learning_rate": rate}
            ).attacks[0]["curves"]["scratch"]
            for rate in rates
        }
        assert record["scratch_grid"] == [[rate, singles[rate][-1][1], False] for rate in rates]
        best = max(rates, key=lambda rate: singles[rate][-1][1])
        assert record["scratch_learning_rate"] == best
        assert record["curves"]["scratch"] == singles[best]
    # Every rate is trained once per budget and initialisation; the report says how scratch was chosen, and keeps it.
    runs = [f for f in os.listdir(os.path.join(tmp_output, "runs")) if f.startswith("scratch--")]
    assert len(runs) == 2 * 2 * 2
    assert tuned.scratch_recipe["learning_rates"] == rates
    assert tuned.scratch_recipe["learning_rate"] == "tuned per budget"
    saved = ResistanceReport.load(tmp_output).to_dict()
    assert [a["scratch_grid"] for a in saved["attacks"]] == [a["scratch_grid"] for a in tuned.attacks]
    assert [a["scratch_learning_rate"] for a in saved["attacks"]] == [
        a["scratch_learning_rate"] for a in tuned.attacks
    ]
    # report.md shows the rate each attack was compared with.
    markdown = tuned.to_markdown()
    assert "| scratch lr |" in markdown
    for record in tuned.attacks:
        row = next(line for line in markdown.splitlines() if line.startswith(f"| `{record['name']}`"))
        assert f" {record['scratch_learning_rate']:.4g} |" in row
    # With a fixed rate, no per-attack choice is recorded.
    fixed = evaluate_finetuning_resistance(
        model, train, test_data, [short], scratch_inits=1, scratch_recipe={"learning_rate": 3e-2}
    ).to_dict()
    assert "scratch_grid" not in fixed["attacks"][0] and fixed["scratch_recipe"]["learning_rate"] == 3e-2
    assert "scratch lr" not in ResistanceReport.from_dict(fixed).to_markdown()
    with pytest.raises(ValueError, match="not both"):
        evaluate_finetuning_resistance(
            model, train, test_data, [short], scratch_recipe={"learning_rate": 3e-2}, scratch_learning_rates=rates
        )
    for bad in ([], [1e-3, 1e-3], [0.0]):
        with pytest.raises(ValueError, match="scratch_learning_rates must be distinct positive"):
            evaluate_finetuning_resistance(model, train, test_data, [short], scratch_learning_rates=bad)


def test_best_scratch_run_follows_the_metric_direction_and_counts_diverged_runs_by_their_best_value():
    from sophon_hf.attacks import _best_scratch_run

    def run(*values, diverged=False):
        return {"curve": [[10 * k, v] for k, v in enumerate(values)], "diverged": diverged}

    candidates = [(1e-3, run(0.1, 0.2)), (1e-2, run(0.1, 0.4))]
    assert _best_scratch_run(candidates, higher_is_better=True)[0] == 1e-2
    assert _best_scratch_run(candidates, higher_is_better=False)[0] == 1e-3  # a denoising error: lower is better
    # A diverged run counts with its best value before diverging, as every run in the report does.
    reached_high = [(1e-3, run(0.1, 0.6)), (1e-2, run(0.1, 0.9, diverged=True))]
    assert _best_scratch_run(reached_high, higher_is_better=True)[0] == 1e-2
    reached_low = [(1e-3, run(0.9, 0.5)), (1e-2, run(0.9, 0.3, diverged=True))]
    assert _best_scratch_run(reached_low, higher_is_better=False)[0] == 1e-2
    everything_diverged = [(1e-3, run(0.1, 0.2, diverged=True)), (1e-2, run(0.1, 0.9, diverged=True))]
    assert _best_scratch_run(everything_diverged, higher_is_better=True)[0] == 1e-2
    assert _best_scratch_run([(1e-3, run(diverged=True))], higher_is_better=True)[0] == 1e-3


def test_scratch_is_trained_once_per_budget_seed_and_initialisation(tmp_output):
    specs = [AttackSpec(optimizer=o, learning_rate=1e-2, steps=3, batch_size=8) for o in ("sgd", "adam", "rmsprop")]
    specs.append(AttackSpec(steps=3, batch_size=8, seed=1))
    evaluate_finetuning_resistance(
        MLP(), image_dataset(24), image_dataset(16, seed=1), specs, output_dir=tmp_output, scratch_inits=2
    )
    scratch_runs = sorted(f for f in os.listdir(os.path.join(tmp_output, "runs")) if f.startswith("scratch--"))
    assert len(scratch_runs) == 2 * 2 * 3  # two budgets x two initialisations x the three default learning rates


def test_progress_bars_by_default_and_off_with_the_hub_switch(capsys, monkeypatch):
    import huggingface_hub.utils

    spec = AttackSpec(steps=2, batch_size=8)
    # The Hugging Face libraries' own switch (HF_HUB_DISABLE_PROGRESS_BARS=1, `disable_progress_bars()`), patched so
    # that the test neither depends on nor changes the environment's setting.
    for disabled in (False, True):
        monkeypatch.setattr(huggingface_hub.utils, "are_progress_bars_disabled", lambda *args, d=disabled: d)
        evaluate_finetuning_resistance(MLP(), image_dataset(16), image_dataset(8, seed=1), [spec], scratch_inits=1)
        assert ("attacks: 100%" in capsys.readouterr().err) is not disabled


# ------------------------------------------------------------------------------------------------ determinism
def test_same_model_as_protected_and_reference_gives_identical_curves():
    model = tiny_bert()  # dropout 0.1: the run's seeded RNG must make it repeat
    specs = [
        AttackSpec(strategy=s, learning_rate=1e-2, steps=4, batch_size=8, eval_interval=2, seed=7) for s in STRATEGIES
    ]
    report = evaluate_finetuning_resistance(
        model, text_dataset(24), text_dataset(16, seed=1), specs, reference_model=copy.deepcopy(model)
    )
    for record in report.attacks:
        assert record["curves"]["protected"] == record["curves"]["unprotected"], record["name"]
        assert len(record["curves"]["protected"]) == 3


def test_harness_equals_a_hand_written_finetuning_loop():
    """Batch order, optimizer, clipping, weight decay, warmup+cosine and evaluation against plain PyTorch."""
    from transformers import get_cosine_schedule_with_warmup

    model = SmallCNN()
    train, test = image_dataset(20, seed=0), image_dataset(12, seed=1)
    spec = AttackSpec(
        optimizer="sgd_momentum",
        learning_rate=0.05,
        steps=9,
        batch_size=8,
        weight_decay=0.01,
        max_grad_norm=0.5,
        schedule="warmup_cosine",
        warmup_ratio=0.3,
        eval_interval=4,
        seed=11,
    )
    report = evaluate_finetuning_resistance(model, train, test, [spec], include_scratch=False)

    # Hand-written: seeded permutations, torch.optim, the transformers schedule, argmax accuracy.
    x = torch.tensor(train["pixel_values"])
    y = torch.tensor(train["labels"])
    x_test, y_test = torch.tensor(test["pixel_values"]), torch.tensor(test["labels"])
    hand = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(spec.seed)

    def epoch():  # the documented batch order: one seeded permutation per epoch, cut into batches of 8
        order = torch.randperm(len(y), generator=generator)
        return [(x[order[i : i + 8]], y[order[i : i + 8]]) for i in range(0, len(y), 8)]

    optimizer = torch.optim.SGD(hand.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=3, num_training_steps=9)

    def accuracy():
        hand.eval()
        with torch.no_grad():
            correct = (hand(x_test).argmax(-1) == y_test).sum().item() / len(y_test)
        hand.train()
        return correct

    curve, step = [[0, accuracy()]], 0
    while step < spec.steps:
        for xb, yb in epoch():
            step += 1
            optimizer.zero_grad()
            nn.functional.cross_entropy(hand(xb), yb).backward()
            torch.nn.utils.clip_grad_norm_(hand.parameters(), 0.5)
            optimizer.step()
            schedule.step()
            if step % 4 == 0 or step == spec.steps:
                curve.append([step, accuracy()])
            if step == spec.steps:
                break
    harness_curve = report.attacks[0]["curves"]["protected"]
    assert [s for s, _ in harness_curve] == [0, 4, 8, 9]
    assert [v for _, v in harness_curve] == pytest.approx([v for _, v in curve], abs=1e-9)
    # Accuracy can hide small differences: compare the weights of an identical harness run.
    task, columns, test_prepared = _prepared(model, 20, 12)
    trained = run_attack(model, task, columns, test_prepared, spec, return_model=True)["model"]
    for name, param in hand.named_parameters():
        torch.testing.assert_close(trained.get_parameter(name), param, rtol=1e-5, atol=1e-6)
    for name, buffer in hand.named_buffers():  # BatchNorm running statistics follow the same batches
        torch.testing.assert_close(trained.get_buffer(name), buffer, rtol=1e-5, atol=1e-6)


def test_the_harness_is_task_agnostic_a_denoiser_reports_its_error():
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    before = _state(unet)
    images = Dataset.from_dict({"pixel_values": (torch.rand(16, 1, 8, 8) * 2 - 1).numpy()})
    scheduler = DDPMScheduler(num_train_timesteps=100)
    specs = [AttackSpec(strategy=s, steps=2, batch_size=8, eval_interval=1) for s in ("full", "lora")]
    report = evaluate_finetuning_resistance(unet, images, images, specs, noise_scheduler=scheduler)
    _assert_same_state(before, unet)
    data = report.to_dict()
    assert data["higher_is_better"] is False and data["metric"] == task_metric(unet, scheduler)
    for attack in data["attacks"]:
        assert all(len(curve) == 3 and curve[-1][1] > 0 for curve in attack["curves"].values())
    with pytest.raises(ValueError, match="has no classification head"):
        evaluate_finetuning_resistance(
            unet, images, images, [AttackSpec(strategy="linear_probe")], noise_scheduler=scheduler
        )


def task_metric(model, scheduler):
    return get_task(model, noise_scheduler=scheduler).metric_name


# ------------------------------------------------------------------------------------------------ resume
def test_resume_skips_finished_runs(tmp_output):
    model, train, test = MLP(), image_dataset(24), image_dataset(16, seed=1)
    first = AttackSpec(steps=3, batch_size=8)
    evaluate_finetuning_resistance(model, train, test, [first], reference_model=model, output_dir=tmp_output)
    # Tamper with a finished run: if the rerun reads it instead of retraining, the tampered value shows up.
    path = os.path.join(tmp_output, "runs", f"{first.name}--protected.json")
    with open(path) as f:
        run = json.load(f)
    run["curve"][-1][1] = 0.123
    with open(path, "w") as f:
        json.dump(run, f)
    second = AttackSpec(optimizer="sgd", steps=3, batch_size=8)
    report = evaluate_finetuning_resistance(
        model, train, test, [first, second], reference_model=model, output_dir=tmp_output
    )
    by_name = {a["name"]: a for a in report.attacks}
    assert by_name[first.name]["curves"]["protected"][-1][1] == 0.123
    assert by_name[second.name]["curves"]["protected"][-1][1] != 0.123
    assert os.path.exists(os.path.join(tmp_output, "runs", f"{second.name}--unprotected.json"))
    with open(os.path.join(tmp_output, "report.json")) as f:
        assert [a["name"] for a in json.load(f)["attacks"]] == [first.name, second.name]


def test_resume_measures_again_when_the_label_count_changes(tmp_output):
    model, train, test = MLP(), image_dataset(24), image_dataset(16, seed=1)
    spec = AttackSpec(strategy="full_reinit_head", steps=3, batch_size=8)
    path = os.path.join(tmp_output, "runs", f"{spec.name}--protected.json")

    def tampered_run_reused(**kwargs):
        # Mark the finished run: a resumed job that reads it instead of retraining shows the mark.
        with open(path) as f:
            run = json.load(f)
        run["curve"][-1][1] = 0.123
        with open(path, "w") as f:
            json.dump(run, f)
        report = evaluate_finetuning_resistance(
            model, train, test, [spec], include_scratch=False, output_dir=tmp_output, **kwargs
        )
        return report.attacks[0]["curves"]["protected"][-1][1] == 0.123

    evaluate_finetuning_resistance(model, train, test, [spec], include_scratch=False, output_dir=tmp_output)
    assert tampered_run_reused()  # the same setting: the finished run is reused
    assert not tampered_run_reused(num_labels=7)  # a 7-way fresh head is another attack


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("make_model", [tiny_vit, MLP], ids=["vit", "mlp"])
def test_head_size_mismatch_allowed_only_when_the_head_is_reinitialised(make_model):
    model = make_model(num_labels=3)
    head = model.get_submodule(get_task(model).head_name)
    train, test = image_dataset(24, num_labels=5), image_dataset(16, num_labels=5, seed=1)
    for strategy in ("full", "lora"):
        with pytest.raises(ValueError, match="keeps the head, which has 3 outputs, but the restricted data has 5"):
            evaluate_finetuning_resistance(model, train, test, [AttackSpec(strategy=strategy, steps=2)])
    specs = [AttackSpec(strategy=s, steps=2, batch_size=8) for s in ("full_reinit_head", "linear_probe")]
    report = evaluate_finetuning_resistance(model, train, test, specs)
    assert head.out_features == 3 and head is model.get_submodule(get_task(model).head_name)  # input not resized
    assert all(len(a["curves"]["scratch"]) == 3 for a in report.attacks)


def test_data_of_another_modality_is_refused_by_the_harness():
    with pytest.raises(ValueError, match=r"`restricted_train` holds image-classification data .* takes 'input_ids'"):
        evaluate_finetuning_resistance(tiny_bert(), image_dataset(16), image_dataset(16), [AttackSpec(steps=2)])


@pytest.mark.parametrize(
    "reference, message",
    [
        (lambda: tiny_vit(num_labels=3), r"other parameters \(classifier.weight: \(5, 16\) against \(3, 16\)\)"),
        (lambda: tiny_bert(), r"it is a BertForSequenceClassification where the protected model is a ViTFor"),
    ],
    ids=["other-head", "other-architecture"],
)
def test_a_reference_model_of_another_architecture_is_refused_before_any_attack(reference, message):
    with pytest.raises(ValueError, match=r"reference_model must be the unprotected original .*" + message):
        evaluate_finetuning_resistance(
            tiny_vit(), image_dataset(16), image_dataset(16), [AttackSpec(steps=2)], reference_model=reference()
        )


@pytest.mark.parametrize("recipe", [{"lr": 1e-2}, {"strategy": "lora"}], ids=["misspelt", "set-per-attack"])
def test_scratch_recipe_keys_are_checked(recipe):
    with pytest.raises(ValueError, match=rf"scratch_recipe has \['{next(iter(recipe))}'\]; it takes \['optimizer'"):
        evaluate_finetuning_resistance(
            MLP(), image_dataset(16), image_dataset(16), [AttackSpec(steps=2)], scratch_recipe=recipe
        )


def test_num_labels_smaller_than_the_labels_names_num_labels():
    # The head has 5 outputs; the caller's num_labels=3 is what does not fit the labels, and the message says so.
    with pytest.raises(
        ValueError, match=r"`restricted_train` has label ids up to 4 but num_labels=3. Pass num_labels=5"
    ):
        evaluate_finetuning_resistance(
            MLP(), image_dataset(16), image_dataset(16, seed=1), [AttackSpec(steps=2)], num_labels=3
        )


def test_a_sample_that_lacks_the_top_class_keeps_the_head():
    # Few-shot restricted data with labels 0-3 only, for a 5-way head: the labels fit, nothing is resized.
    train = image_dataset(24, num_labels=4)
    report = evaluate_finetuning_resistance(
        MLP(), train, image_dataset(16, seed=1), [AttackSpec(steps=2, batch_size=8)]
    )
    assert report.to_dict()["attacks"][0]["final"]["protected"] is not None


def test_a_class_label_task_smaller_than_the_head_keeps_the_head():
    from datasets import ClassLabel

    # A 2-class restricted task (ClassLabel) on a 5-way head: head-kept attacks run on the existing head.
    train = image_dataset(24, num_labels=2).cast_column("labels", ClassLabel(num_classes=2))
    test = image_dataset(16, num_labels=2, seed=1).cast_column("labels", ClassLabel(num_classes=2))
    report = evaluate_finetuning_resistance(MLP(), train, test, [AttackSpec(strategy="full", steps=2, batch_size=8)])
    assert report.to_dict()["attacks"][0]["final"]["protected"] is not None


def test_missing_columns_are_reported():
    no_labels = image_dataset(8).rename_column("labels", "label")
    with pytest.raises(ValueError, match="rename_column"):
        evaluate_finetuning_resistance(MLP(), no_labels, image_dataset(8), [AttackSpec(steps=1)])
    no_inputs = Dataset.from_dict({"image": [[0.0]] * 4, "labels": [0, 1, 0, 1]})
    with pytest.raises(ValueError, match="pixel_values"):
        evaluate_finetuning_resistance(MLP(), image_dataset(8), no_inputs, [AttackSpec(steps=1)])


def test_inputs_that_cannot_be_measured_are_refused_with_the_fix():
    good = image_dataset(8)
    raw = Dataset.from_dict({"pixel_values": [[[[255] * 8] * 8]] * 8, "labels": good["labels"]})
    with pytest.raises(ValueError, match="int64 'pixel_values' \\(raw images.*image processor"):
        evaluate_finetuning_resistance(MLP(), raw, good, [AttackSpec(steps=1)])
    strings = good.cast_column("labels", Value("string"))
    with pytest.raises(ValueError, match="string labels.*class_encode_column"):
        evaluate_finetuning_resistance(MLP(), strings, good, [AttackSpec(steps=1)])
    with pytest.raises(ValueError, match=r"DatasetDict with splits \['train'\].*restricted_train\['train'\]"):
        evaluate_finetuning_resistance(MLP(), DatasetDict(train=good), good, [AttackSpec(steps=1)])
    with pytest.raises(ValueError, match="TensorDataset, not a `datasets.Dataset`"):
        evaluate_finetuning_resistance(MLP(), good, TensorDataset(torch.zeros(2, 1)), [AttackSpec(steps=1)])
    transformed = good.with_transform(lambda b: b)
    with pytest.raises(ValueError, match="on-the-fly transform.*map"):
        evaluate_finetuning_resistance(MLP(), transformed, good, [AttackSpec(steps=1)])


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"strategy": "prompt_tuning"}, "Unknown attack strategy"),
        ({"schedule": "constant", "warmup_ratio": 0.5}, "has no effect with schedule='constant'"),
        ({"optimizer": "lion"}, "Unknown optimizer"),
        ({"schedule": "linear"}, "Unknown schedule"),
        ({"steps": 0}, "steps must be at least 1"),
        ({"learning_rate": -1.0}, "learning_rate must be positive"),
        ({"lora_rnk": 4}, "Unknown AttackSpec field"),
        ({"max_grad_norm": -1.0}, "max_grad_norm must be positive"),
        ({"batch_size": "many"}, "batch_size='many' is not a number"),
        ({"optimizer": "adamw"}, r"optimizer='adamw' with weight_decay=0 is Adam: set weight_decay"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
    ],
)
def test_bad_specs_are_rejected(fields, message):
    with pytest.raises(ValueError, match=message):
        resolve_attacks([fields])


def test_spec_numbers_from_files_are_converted():
    # YAML reads 1e-3 as a string, JSON writers turn 300 into 300.0.
    (spec,) = resolve_attacks([{"learning_rate": "1e-3", "steps": 300.0, "batch_size": "16", "eval_interval": 30.0}])
    assert (spec.learning_rate, spec.steps, spec.batch_size, spec.eval_interval) == (1e-3, 300, 16, 30)
    assert isinstance(spec.steps, int) and spec.name == AttackSpec(steps=300, batch_size=16, eval_interval=30).name
    with pytest.raises(ValueError, match="steps_scale must be positive"):
        resolve_attacks("quick", steps_scale=0)


def test_duplicate_and_unknown_suites_are_rejected():
    with pytest.raises(ValueError, match="Duplicate attacks"):
        resolve_attacks([AttackSpec(), AttackSpec()])
    with pytest.raises(ValueError, match="Unknown attack suite"):
        resolve_attacks("everything")


@pytest.mark.parametrize("targets", [["query_key_value"], ["q_proj", "valeu"]], ids=["none-match", "one-misspelt"])
def test_lora_targets_that_match_nothing(targets):
    # A report must not name an attack on "valeu" that adapted q_proj alone.
    spec = AttackSpec(strategy="lora", steps=1, lora_target_modules=targets)
    with pytest.raises(ValueError, match=rf"\['{targets[-1]}'\] match no module"):
        evaluate_finetuning_resistance(tiny_vit(), image_dataset(8), image_dataset(8), [spec])


def test_output_folder_of_a_different_model_is_refused(tmp_output):
    train, test = image_dataset(16), image_dataset(8, seed=1)
    spec = AttackSpec(steps=1, batch_size=8)
    evaluate_finetuning_resistance(MLP(seed=1), train, test, [spec], include_scratch=False, output_dir=tmp_output)
    with pytest.raises(ValueError, match="different protected model"):
        evaluate_finetuning_resistance(MLP(seed=2), train, test, [spec], include_scratch=False, output_dir=tmp_output)
    os.remove(os.path.join(tmp_output, "report.json"))  # an interrupted job: only run files are left
    with pytest.raises(ValueError, match="different model"):
        evaluate_finetuning_resistance(MLP(seed=2), train, test, [spec], include_scratch=False, output_dir=tmp_output)
    with pytest.raises(ValueError, match="different restricted data"):
        evaluate_finetuning_resistance(
            MLP(seed=1), image_dataset(16, seed=9), test, [spec], include_scratch=False, output_dir=tmp_output
        )


def test_a_corrupt_report_or_run_record_in_the_output_folder_is_named(tmp_output):
    train, test = image_dataset(16), image_dataset(8, seed=1)
    spec = AttackSpec(steps=1, batch_size=8)
    evaluate_finetuning_resistance(MLP(seed=1), train, test, [spec], include_scratch=False, output_dir=tmp_output)
    run_path = next(Path(tmp_output, "runs").glob("*.json"))
    run_path.write_text('{"fingerprint": ')  # e.g. a disk that filled up
    Path(tmp_output, "report.json").write_text("[]")
    with pytest.raises(ValueError, match=r"report.json is not a valid report \(a JSON list, not an object\): move it"):
        evaluate_finetuning_resistance(MLP(seed=1), train, test, [spec], include_scratch=False, output_dir=tmp_output)
    Path(tmp_output, "report.json").unlink()
    with pytest.raises(ValueError, match=rf"{run_path.name} is not a valid attack run record .*: delete it"):
        evaluate_finetuning_resistance(MLP(seed=1), train, test, [spec], include_scratch=False, output_dir=tmp_output)


def test_nan_during_an_attack_is_recorded_as_diverged_and_the_rest_continues(tmp_output):
    model = MLP()
    exploding = AttackSpec(optimizer="sgd", learning_rate=1e30, steps=6, batch_size=8, eval_interval=2)
    fine = AttackSpec(optimizer="adam", steps=6, batch_size=8, eval_interval=2)
    report = evaluate_finetuning_resistance(
        model, image_dataset(24), image_dataset(16, seed=1), [exploding, fine], output_dir=tmp_output
    )
    bad, good = report.to_dict()["attacks"]
    assert bad["diverged"]["protected"] and bad["final"]["protected"] is None
    assert bad["diverged_at"]["protected"] in (2, 4, 6)
    assert bad["curves"]["protected"][-1][0] < bad["diverged_at"]["protected"]
    assert all(math.isfinite(v) for _, v in bad["curves"]["protected"])
    assert "diverged" in bad["verdict"] and bad["effective_final"]["protected"] is not None
    assert not good["diverged"]["protected"] and len(good["curves"]["protected"]) == 4
    assert report.summary["diverged_attacks"] == [exploding.name]
    with open(os.path.join(tmp_output, "report.json")) as f:
        json.load(f)  # strict JSON: no NaN leaked into the file


@pytest.mark.parametrize("role", ["restricted_train", "restricted_test"])
def test_nan_in_the_data_is_refused_before_any_attack(role):
    # Otherwise every run, scratch included, "diverges" and the verdict rests on untrained step-0 scores.
    poisoned = image_dataset(24).to_dict()
    poisoned["pixel_values"][5][0][1][2] = float("inf")
    data = {"restricted_train": image_dataset(24), "restricted_test": image_dataset(16, seed=1)}
    data[role] = Dataset.from_dict(poisoned)
    with pytest.raises(ValueError, match=rf"`{role}` has NaN or infinite values in 'pixel_values' \(1 of the rows"):
        evaluate_finetuning_resistance(MLP(), data["restricted_train"], data["restricted_test"], [AttackSpec(steps=2)])


# ------------------------------------------------------------------------------------------------ processes
def _two_process_attacks(output_dir, expected_path):
    specs = [AttackSpec(optimizer=o, steps=3, batch_size=8) for o in ("adam", "sgd", "rmsprop")]
    report = evaluate_finetuning_resistance(
        MLP(), image_dataset(24), image_dataset(16, seed=1), specs, output_dir=output_dir
    )
    with open(expected_path) as f:
        expected = json.load(f)
    for record, reference in zip(report.attacks, expected):
        for start, curve in reference["curves"].items():
            assert record["curves"][start] == curve, (record["name"], start)


def test_attacks_split_across_two_processes(tmp_path):
    specs = [AttackSpec(optimizer=o, steps=3, batch_size=8) for o in ("adam", "sgd", "rmsprop")]
    single = evaluate_finetuning_resistance(MLP(), image_dataset(24), image_dataset(16, seed=1), specs)
    expected_path = str(tmp_path / "expected.json")
    with open(expected_path, "w") as f:
        json.dump(single.attacks, f)
    output_dir = str(tmp_path / "out")
    run_two_processes(_two_process_attacks, output_dir, expected_path)
    ranks = set()
    for name in os.listdir(os.path.join(output_dir, "runs")):
        with open(os.path.join(output_dir, "runs", name)) as f:
            ranks.add(json.load(f)["rank"])
    assert ranks == {0, 1}
    with open(os.path.join(output_dir, "report.json")) as f:
        assert len(json.load(f)["attacks"]) == 3


def test_a_real_linear_probe_runs_the_body_in_eval_mode():
    model = SmallCNN()  # BatchNorm: train mode would move its running statistics on restricted data
    task, train, test = _prepared(model)
    spec = AttackSpec(strategy="linear_probe", optimizer="adam", learning_rate=1e-2, steps=3, batch_size=8)
    probe = run_attack(model, task, train, test, spec, return_model=True)["model"]
    for name, buffer in model.named_buffers():
        assert torch.equal(probe.get_buffer(name), buffer), f"{name} absorbed restricted data"


@pytest.mark.parametrize("strategy", ["full_reinit_head", "linear_probe"])
def test_head_strategies_replace_the_released_head(strategy):
    model = MLP()
    with torch.no_grad():  # a released head that carries nothing: a kept copy would stay (almost) zero
        model.out.weight.zero_()
        model.out.bias.zero_()
    task, train, test = _prepared(model)

    def head_after(seed):
        spec = AttackSpec(strategy=strategy, optimizer="sgd", learning_rate=1e-6, steps=1, batch_size=8, seed=seed)
        return run_attack(model, task, train, test, spec, return_model=True)["model"].out.weight.detach()

    assert head_after(0).abs().max() > 1e-2, "the attack kept the released head"
    assert not torch.equal(head_after(0), head_after(1))  # the fresh head follows the attack's seed


def test_sgd_nesterov_is_not_plain_momentum():
    model = MLP()
    task, train, test = _prepared(model)

    def trained(optimizer):
        spec = AttackSpec(optimizer=optimizer, learning_rate=0.1, steps=3, batch_size=8)
        return run_attack(model, task, train, test, spec, return_model=True)["model"]

    nesterov, momentum = trained("sgd_nesterov"), trained("sgd_momentum")
    assert any(not torch.equal(a, b) for a, b in zip(nesterov.parameters(), momentum.parameters()))


def test_scratch_does_not_recreate_a_model_built_under_the_same_seed():
    model = MLP(seed=3)  # built right after torch.manual_seed(3)
    scratch = build_scratch_model(model, seed=3)
    for name, param in scratch.named_parameters():
        assert not torch.equal(param, model.get_parameter(name)), name


def test_diverged_scratch_initialisations_are_left_out_of_the_mean():
    from sophon_hf.attacks import _mean_of_runs

    healthy = [{"curve": [[0, 0.2], [4, 0.6]], "diverged": False, "diverged_at": None}]
    healthy.append({"curve": [[0, 0.4], [4, 0.8]], "diverged": False, "diverged_at": None})
    broken = {"curve": [[0, 0.9], [4, 0.9]], "diverged": True, "diverged_at": 4}
    mean = _mean_of_runs([healthy[0], broken, healthy[1]])
    assert mean["curve"] == [[0, pytest.approx(0.3)], [4, pytest.approx(0.7)]] and not mean["diverged"]
    assert mean["inits_left_out"] == 1  # and the report says so
    record = {
        "name": "a",
        "spec": {},
        "curves": {"protected": [[0, 0.2], [4, 0.5]], "scratch": mean["curve"]},
        "scratch_inits_left_out": 1,
    }
    verdict = ResistanceReport("image-classification", "accuracy", True, [record]).to_dict()["attacks"][0]["verdict"]
    assert verdict.endswith("(1 scratch initialisation(s) diverged and are left out of its mean)")
    # Every initialisation diverged: all of them count, over the steps all reached, not the first one alone.
    runs = [
        {"curve": [[0, 0.1], [5, 0.3]], "diverged": True, "diverged_at": 10},
        {"curve": [[0, 0.1], [5, 0.5], [10, 0.9]], "diverged": True, "diverged_at": 15},
    ]
    mean = _mean_of_runs(runs)
    assert mean["curve"] == [[0, pytest.approx(0.1)], [5, pytest.approx(0.4)]]
    assert mean["diverged"] and mean["diverged_at"] == 10


@torch.no_grad()
def _scale_convolutions(model, factor):
    # Every convolution of a Transformers ResNet feeds a BatchNorm: scaling its weights (and the BatchNorm's running
    # statistics) leaves the function unchanged and makes every optimizer's steps tiny relative to the weights.
    for module in model.modules():
        if isinstance(getattr(module, "normalization", None), nn.BatchNorm2d):
            module.convolution.weight.mul_(factor)
            module.normalization.running_mean.mul_(factor)
            module.normalization.running_var.mul_(factor**2)


def test_weights_scaled_far_beyond_initialisation_are_flagged_in_the_report_and_card():
    from conftest import tiny_resnet

    from sophon_hf.attacks import audit_weight_scale
    from sophon_hf.model_card import generate_model_card

    model = tiny_resnet(num_labels=5).eval()
    assert audit_weight_scale(model) == [] and audit_weight_scale(MLP()) == []
    assert next(build_scratch_model(MLP(), device="meta").parameters()).is_meta  # the audit builds its copy on the CPU
    pixels = torch.rand(4, 1, 8, 8)
    before = model(pixel_values=pixels).logits
    _scale_convolutions(model, 100.0)
    torch.testing.assert_close(model(pixel_values=pixels).logits, before, rtol=1e-3, atol=1e-4)  # same function
    (warning,) = audit_weight_scale(model)
    assert "100x" in warning and "rescales the weights" in warning
    scaled = sum(m.convolution.weight.numel() for m in model.modules() if hasattr(m, "convolution"))
    assert f"({scaled / sum(p.numel() for p in model.parameters()):.0%} of the parameters)" in warning
    assert audit_weight_scale(model, threshold=200.0) == []
    # Normalisation scales count; other layers' biases do not (an output bias that moves is no scale symmetry).
    bias_only, norm_only = MLP(), tiny_resnet(num_labels=5)
    with torch.no_grad():
        bias_only.out.bias.mul_(100.0)
        norm_only.resnet.embedder.embedder.normalization.weight.mul_(100.0)
    assert audit_weight_scale(bias_only) == []
    assert "normalization.weight 100x" in audit_weight_scale(norm_only)[0]
    # 20x is caught with the default threshold too.
    twenty = tiny_resnet(num_labels=5)
    _scale_convolutions(twenty, 20.0)
    assert len(audit_weight_scale(twenty)) == 1

    # A config cannot hide the trap by inflating the fresh initialisation it is compared with (which would also give
    # the scratch baseline a bad start): that is a warning of its own.
    vit = tiny_vit()
    with torch.no_grad():
        for module in vit.vit.modules():
            if isinstance(module, nn.Linear):
                module.weight.mul_(100.0)
    vit.config.initializer_range = 2.0
    (inflated,) = audit_weight_scale(vit)
    assert inflated.startswith("[large initialisation]") and "initializer_range" in inflated
    vit.config.initializer_range = 0.02
    assert [w.split("]")[0] for w in audit_weight_scale(vit)] == ["[weight scale"]

    # A model the audit cannot re-initialise says so instead of staying silent, whatever the error.
    class NoReset(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))

    class BrokenReset(nn.Linear):
        def reset_parameters(self):
            if hasattr(self, "weight_initialised"):
                raise RuntimeError("cannot re-initialise")
            super().reset_parameters()
            self.weight_initialised = True

    for unresettable in (NoReset(), BrokenReset(4, 2)):
        (skipped,) = audit_weight_scale(unresettable)
        assert skipped.startswith("[audit skipped]") and "could not run" in skipped

    attack = AttackSpec(strategy="full", optimizer="adam", learning_rate=1e-3, steps=2, eval_interval=2)
    data = image_dataset(16, size=8)
    report = evaluate_finetuning_resistance(model, data, data, attacks=[attack], include_scratch=False)
    assert report.warnings == [warning] and report.to_dict()["warnings"] == [warning]
    assert f"Warning: {warning}" in report.to_text() and warning in report.to_markdown()
    assert type(report).from_dict(report.to_dict()).warnings == [warning]
    card = generate_model_card(report=report.to_dict())
    assert "The attack harness flagged this measurement" in str(card) and "100x" in str(card)
    # A card that does not carry the report's warnings is stale: `push` rewrites it, `verify` flags it.
    from sophon_hf.model_card import card_report_mismatches

    assert card_report_mismatches(card, report.to_dict()) == []
    (problem,) = card_report_mismatches(
        generate_model_card(report={**report.to_dict(), "warnings": []}), report.to_dict()
    )
    assert "the card does not say so" in problem
    clean = evaluate_finetuning_resistance(MLP(), data, data, attacks=[attack], include_scratch=False)
    assert clean.to_dict()["warnings"] == [] and "flagged" not in str(generate_model_card(report=clean.to_dict()))
