"""Model cards: metadata round trip, honest text, folder reading, and the template shipped in the wheel."""

import copy
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import tiny_vit
from huggingface_hub import ModelCard

from sophon_hf.model_card import (
    CARD_METADATA_FILE,
    card_report_mismatches,
    final_metrics,
    generate_model_card,
    write_model_card,
)
from sophon_hf.report import ResistanceReport
from sophon_hf.utils import model_fingerprint

REPO_ROOT = Path(__file__).resolve().parents[1]


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    )


def classification_report(model=None, with_head_start: bool = True) -> ResistanceReport:
    """A report in the harness's own class: three attacks, one of which beats scratch, one diverged."""

    def curve(*values):
        return [[10 * i, v] for i, v in enumerate(values)]

    attacks = [
        {
            "name": "full-sgd_momentum-lr0.01",
            "spec": {"strategy": "full", "optimizer": "sgd_momentum", "learning_rate": 0.01, "steps": 20},
            "curves": {
                "protected": curve(0.2, 0.21, 0.22),
                "unprotected": curve(0.3, 0.8, 0.9),
                "scratch": curve(0.2, 0.5, 0.7),
            },
        },
        {
            "name": "full_reinit_head-adam-lr0.001",
            "spec": {"strategy": "full_reinit_head", "optimizer": "adam", "learning_rate": 0.001, "steps": 20},
            "curves": {
                "protected": curve(0.2, 0.6, 0.8 if with_head_start else 0.6),
                "unprotected": curve(0.2, 0.85, 0.95),
                "scratch": curve(0.2, 0.5, 0.7),
            },
        },
        {
            "name": "linear_probe-rmsprop-lr0.01",
            "spec": {"strategy": "linear_probe", "optimizer": "rmsprop", "learning_rate": 0.01, "steps": 20},
            "curves": {
                "protected": curve(0.2, 0.45, 0.1),
                "unprotected": curve(0.2, 0.7, 0.75),
                "scratch": curve(0.2, 0.5, 0.7),
            },
            "diverged": {"protected": True, "unprotected": False, "scratch": False},
            "diverged_at": {"protected": 20, "unprotected": None, "scratch": None},
        },
    ]
    return ResistanceReport(
        task="image-classification",
        metric="accuracy",
        higher_is_better=True,
        attacks=attacks,
        scratch_recipe={"optimizer": "adam", "learning_rate": 1e-3, "initialisations": 3},
        fingerprints={"protected": model_fingerprint(model) if model is not None else "0" * 64, "reference": None},
        original={"unprotected": 0.98, "protected": 0.97},
    )


SOPHON_CONFIG = {
    "restricted_loss": "kl_uniform",
    "simulation_strategies": ["full_reinit_head", "linear_probe"],
    "inner_optimizers": ["sgd", "adam:1e-3"],
    "inner_steps": 10,
    "fts_learning_rate": 1e-4,
    "learning_rate": 1e-4,
    "ntr_steps": 5,
    "max_steps": 600,
    "hub_token": "<HUB_TOKEN>",  # TrainingArguments.to_dict() noise: must not reach the card
}


def published(card: ModelCard) -> dict[tuple[str, str], float]:
    return {
        (r.metric_args.get("attack", "original"), r.metric_args["start"]): r.metric_value
        for r in card.data.eval_results
    }


def test_card_eval_results_round_trip_and_match_report(tmp_path):
    report = classification_report().to_dict()
    card = generate_model_card(
        model_name="vit-sophon",
        base_model="google/vit-base-patch16-224",
        task="image-classification",
        library_name="transformers",
        original_domain="MNIST digits 0-4",
        restricted_domain="MNIST digits 5-9",
        sophon_config=SOPHON_CONFIG,
        report=report,
        datasets=["ylecun/mnist"],
        repo_id="me/vit-sophon",
        tags=["mnist"],
    )
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")

    assert {"sophon", "non-fine-tunable", "image-classification", "mnist"} <= set(loaded.data.tags)
    assert loaded.data.base_model == "google/vit-base-patch16-224"
    assert loaded.data.library_name == "transformers"
    assert loaded.data.datasets == ["ylecun/mnist"]
    numbers = published(loaded)
    expected = {(a["name"], s): v for a in report["attacks"] for s, v in final_metrics(a).items() if v is not None}
    expected.update({("original", s): v for s, v in report["original"].items()})
    assert numbers == pytest.approx(expected)
    # The diverged protected run is published with its best value before divergence, as the harness compares it.
    assert numbers[("linear_probe-rmsprop-lr0.01", "protected")] == pytest.approx(0.45)
    assert card_report_mismatches(loaded, report) == []


def test_card_text_names_scratch_worst_attack_and_verdicts():
    report = classification_report().to_dict()
    text = generate_model_card(restricted_domain="MNIST digits 5-9", report=report, sophon_config=SOPHON_CONFIG).text
    worst = report["summary"]["worst_attack"]
    assert worst == "full_reinit_head-adam-lr0.001"
    assert f"**Worst case:** `{worst}`" in text
    assert "scratch" in text and "0.7000" in text and "0.8000" in text
    assert "head start of 0.1 accuracy over scratch" in text  # the harness's own verdict for the broken attack
    assert "1 of 3 measured attacks beat training from scratch" in text
    assert "the mean curve of 3 random initialisations" in text
    assert "diverged; best before" in text
    assert "Resistance is measured, not proven" in text
    assert "sophon-hf verify --model" in text and "@inproceedings{deng2024sophon" in text
    assert "| `restricted_loss` | `kl_uniform` |" in text and "| `fts_learning_rate` | 0.0001 |" in text
    assert "HUB_TOKEN" not in text


def test_card_describes_a_tuned_scratch_baseline():
    report = classification_report()
    report.scratch_recipe = {
        "optimizer": "adam",
        "learning_rate": "tuned per budget",
        "learning_rates": [3e-4, 1e-2],
        "initialisations": 3,
    }
    for attack, rate in zip(report.attacks, (3e-4, 1e-2, 1e-2)):
        attack["scratch_learning_rate"] = rate
    text = generate_model_card(report=report.to_dict(), sophon_config=SOPHON_CONFIG).text
    assert "the best of learning rates 0.0003, 0.01 at each budget (chosen on the test set; the table shows" in text
    assert "learning rate tuned" not in text
    # Each attack's scratch cell names the rate chosen for it.
    scratch_cells = [
        line.split("|")[8].strip() for line in text.splitlines() if line.startswith("| ") and "lr " in line
    ]
    assert [cell.split("(lr ")[1] for cell in scratch_cells] == ["0.0003)", "0.01)", "0.01)"]


def test_card_lists_what_was_not_tested():
    text = generate_model_card(report=classification_report().to_dict()).text
    untested = text.split("## What was not tested")[1].split("## Limitations")[0]
    assert "`lora`" in untested  # strategy absent from the report
    for optimizer in ("`adadelta`", "`adagrad`", "`adamw`", "`sgd_nesterov`"):
        assert optimizer in untested
    assert "`warmup_cosine`" in untested
    assert "budgets longer than 20 steps" in untested
    assert "more than one seed" in untested
    assert "prefix or prompt tuning" in untested  # a family the harness never runs
    assert "LoRA adapters" not in untested  # no LoRA attack ran: the strategy line covers it

    report = classification_report()
    report.attacks.append(copy.deepcopy(report.attacks[0]))
    report.attacks[-1]["name"], report.attacks[-1]["spec"] = "lora", {"strategy": "lora", "lora_rank": 8}
    untested = generate_model_card(report=report.to_dict()).text.split("## What was not tested")[1]
    assert "LoRA adapters on other modules than the harness's default targets" in untested  # an older report
    assert "LoRA ranks other than 8" in untested
    # Defaults resolved by the harness are named, or counted when they are every layer of a convolutional network.
    report.attacks[-1]["lora_targets"] = ["q_proj", "v_proj"]
    untested = generate_model_card(report=report.to_dict()).text.split("## What was not tested")[1]
    assert "LoRA adapters on other modules than `q_proj`, `v_proj`\n" in untested
    report.attacks[-1]["lora_targets"] = [f"resnet.stages.{i}.conv" for i in range(12)]
    untested = generate_model_card(report=report.to_dict()).text.split("## What was not tested")[1]
    assert "than the 12 linear and convolution layers below the head (the harness's default)\n" in untested
    del report.attacks[-1]["lora_targets"]
    report.attacks[-1]["spec"]["lora_target_modules"] = ["conv2", "to_q"]
    untested = generate_model_card(report=report.to_dict()).text.split("## What was not tested")[1]
    assert "LoRA adapters on other modules than `conv2`, `to_q`\n" in untested
    # Hand-made specs: one target as a string, the rank left at the harness's default, a second rank.
    report.attacks[-1]["spec"] = {"strategy": "lora", "lora_target_modules": "to_q"}
    report.attacks.append(copy.deepcopy(report.attacks[-1]))
    report.attacks[-1]["name"], report.attacks[-1]["spec"]["lora_rank"] = "lora-r4", 4
    untested = generate_model_card(report=report.to_dict()).text.split("## What was not tested")[1]
    assert "LoRA adapters on other modules than `to_q`\n" in untested
    assert "LoRA ranks other than 4, 8\n" in untested


def test_card_shows_the_spread_of_attacks_run_at_several_seeds():
    report = classification_report()
    assert "Across attack seeds" not in generate_model_card(report=report.to_dict()).text  # one run per attack
    for seed, final in ((1, 0.65), (2, 0.75)):  # the fresh-head attack (0.8 at seed 0) at two more seeds
        again = copy.deepcopy(report.attacks[1])
        again["name"] += f"-seed{seed}"
        again["spec"]["seed"] = seed
        again["curves"]["protected"][-1][1] = final
        report.attacks.append(again)
    text = generate_model_card(report=report.to_dict()).text
    assert "**Across attack seeds.**" in text
    row = "| `full_reinit_head-adam-lr0.001` | 0, 1, 2 | +0.1000, -0.0500, +0.0500 | +0.0333 | -0.0500 | +0.1000 |"
    assert row in text
    # The other two attacks ran once: the card still says so, for them.
    untested = text.split("## What was not tested")[1]
    assert "more than one seed for 2 of the 3 attack settings" in untested
    assert "more than one seed per attack" not in untested
    # A report written before its summary carried the spread is grouped by the card itself.
    data = report.to_dict()
    del data["summary"]["across_seeds"]
    assert row in generate_model_card(report=data).text


def test_unmeasured_card_says_so_and_claims_nothing(tmp_path):
    card = generate_model_card(model_name="vit-sophon", restricted_domain="faces")
    assert "Resistance has not been measured yet" in card.text
    assert "not measured yet" in card.text.split("## How to use")[0]
    assert not card.data.eval_results
    assert "## Measured resistance" in card.text and "| attack |" not in card.text


def test_card_of_a_report_without_attacks_claims_nothing():
    report = ResistanceReport("image-classification", "accuracy", True, attacks=[]).to_dict()
    assert report["summary"]["verdict"] == "no attacks were run: head start not measured"
    card = generate_model_card(report=report)
    assert "**not measured**: the report lists no attacks" in card.text
    assert "no recorded start" in card.text and not card.data.eval_results


def test_card_names_the_order_of_the_meta_gradient():
    assert "its first-order meta-gradient" in generate_model_card(sophon_config={"first_order": True}).text
    second = generate_model_card(sophon_config={"first_order": False}).text
    assert "its exact second-order meta-gradient" in second and "first-order meta-gradient pushes" not in second


def test_write_model_card_reads_the_folder_and_keeps_publisher_fields(tmp_path):
    model = tiny_vit()
    model.save_pretrained(tmp_path)
    write_model_card(
        tmp_path, restricted_domain="digits 5-9", original_domain="digits 0-4", sophon_config=SOPHON_CONFIG
    )
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.pipeline_tag == "image-classification" and card.data.library_name == "transformers"
    assert "ViTForImageClassification" in card.text
    assert "Resistance has not been measured yet" in card.text
    assert "hub_token" not in (tmp_path / CARD_METADATA_FILE).read_text()

    # The attacks ran afterwards: the regenerated card picks up the report, plots and the publisher's words.
    classification_report(model).save(str(tmp_path))
    write_model_card(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert "](attack_curves.png)" in card.text and "(report.md)" in card.text
    assert "digits 5-9" in card.text and "| `ntr_steps` | 5 |" in card.text
    assert model_fingerprint(model) in card.text
    report = json.loads((tmp_path / "report.json").read_text())
    assert card_report_mismatches(card, report) == []


def test_new_publisher_details_replace_the_stored_ones(tmp_path):
    tiny_vit().save_pretrained(tmp_path)
    write_model_card(tmp_path, restricted_domain="digits 5-9", original_domain="digits 0-4")
    write_model_card(tmp_path, restricted_domain="street signs")
    text = (tmp_path / "README.md").read_text()
    assert "street signs" in text and "digits 5-9" not in text and "digits 0-4" in text
    stored = json.loads((tmp_path / CARD_METADATA_FILE).read_text())
    assert (stored["restricted_domain"], stored["original_domain"]) == ("street signs", "digits 0-4")


def test_trainer_card_leaves_out_a_report_of_earlier_weights(tmp_path):
    from conftest import image_dataset

    from sophon_hf import SophonConfig, SophonTrainer

    model = tiny_vit()
    args = SophonConfig(
        output_dir=str(tmp_path), max_steps=2, inner_steps=2, per_device_train_batch_size=8, use_cpu=True,
        report_to="none", save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = SophonTrainer(
        model, args=args, train_dataset=image_dataset(16), restricted_dataset=image_dataset(16, seed=1)
    )
    trainer.train()
    trainer.save_model()
    classification_report(model).save(str(tmp_path))  # measured on the saved weights
    trainer.save_model()
    measured = model_fingerprint(model)
    assert measured in (tmp_path / "README.md").read_text()
    trainer.train()  # trained further (a second run of max_steps): the report is now about other weights
    trainer.save_model()
    text = (tmp_path / "README.md").read_text()
    assert "Resistance has not been measured yet" in text and measured not in text


def test_diffusion_card_for_a_unet_folder(tmp_path):
    tiny_unet().save_pretrained(tmp_path)
    report = {
        "task": "unconditional-image-generation",
        "metric": "denoising_mse",
        "higher_is_better": False,
        "attacks": [
            {
                "name": "full-adam-lr0.0001",
                "spec": {"strategy": "full", "optimizer": "adam", "learning_rate": 1e-4, "steps": 50},
                "final": {"protected": 0.705, "unprotected": 0.445, "scratch": 0.479},
            }
        ],
        "summary": {"worst_attack": "full-adam-lr0.0001"},
    }
    (tmp_path / "report.json").write_text(json.dumps(report))
    write_model_card(tmp_path, restricted_domain="CelebA faces", original_domain="CIFAR-100")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert "UNet2DModel.from_pretrained" in card.text and "DDPMPipeline" in card.text
    # Sampling uses the noise schedule the UNet was trained with, saved next to it, not a default one.
    assert 'DDPMScheduler.from_pretrained("path/to/this/model")' in card.text
    assert "DDPMScheduler(num_train_timesteps" not in card.text
    # Lower is better for the attacker: 0.705 against 0.479 from scratch is no head start (-0.226).
    assert "-0.2260" in card.text and "no head start over scratch" in card.text
    assert "lower is better for the attacker" in card.text
    assert published(card)[("full-adam-lr0.0001", "scratch")] == pytest.approx(0.479)
    assert "![Images generated by this UNet]" not in card.text  # no samples.png in the folder
    (tmp_path / "samples.png").write_bytes(b"\x89PNG")
    write_model_card(tmp_path)
    assert "![Images generated by this UNet](samples.png)" in ModelCard.load(tmp_path / "README.md").text
    # Its limitations speak of denoisers (no heads, no probes) and say that no original-domain cost is stated.
    limitations = card.text.split("## Limitations")[1].split("\n## ")[0]
    assert "linear probes" not in limitations and "this card does not state it" in limitations
    with_cost = generate_model_card(
        task="unconditional-image-generation",
        library_name="diffusers",
        report={**report, "original": {"protected": 0.09, "unprotected": 0.087}},
    )
    assert "compare the original-domain numbers above" in with_cost.text
    assert "does not state it" not in with_cost.text


def test_card_report_mismatches_catch_a_stale_or_edited_card():
    report = classification_report().to_dict()
    card = generate_model_card(report=report)
    edited = json.loads(json.dumps(report))
    edited["attacks"][0]["effective_final"]["protected"] = 0.99
    assert any("card says 0.22" in problem for problem in card_report_mismatches(card, edited))
    unmeasured = generate_model_card()
    assert card_report_mismatches(unmeasured, report)  # the report's numbers are not on the card
    assert card_report_mismatches(card, None) == ["the card publishes resistance numbers but there is no report.json"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"task": "object-detection"}, "task='object-detection' is not supported"),
        ({"library_name": "timm"}, "library_name='timm' is not supported"),
        ({"task": "text-classification", "report": {"task": "image-classification"}}, "pass the report"),
    ],
)
def test_bad_card_inputs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_model_card(**kwargs)


def test_write_model_card_needs_a_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        write_model_card(tmp_path)


def test_template_ships_in_the_wheel_and_renders_from_an_install(tmp_path):
    # Build from a copy: an in-tree build writes build/ into the repository other processes are using.
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("sophon_hf", "trainers", "model_cards"):
        shutil.copytree(REPO_ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("sophon_hf-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "sophon_hf/model_cards/sophon_model_card.md.jinja" in names
    assert "sophon_hf/trainers/__init__.py" in names
    # Every shipped recipe and accelerate config travels with the package, like the template.
    for recipe in [*source.glob("trainers/configs/*.yaml"), *source.glob("trainers/accelerate_configs/*.yaml")]:
        assert f"sophon_hf/{recipe.relative_to(source).as_posix()}" in names

    # The installed copy (not this checkout) finds its template through importlib.resources. `-S` skips the
    # .pth files, among them the editable install's finder, which would otherwise import this checkout instead.
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    path = os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]])
    script = (
        "import sophon_hf.model_card as m, sys; "
        f"assert m.__file__.startswith({str(target)!r}), m.__file__; "
        "print(m.generate_model_card(model_name='x').text.splitlines()[-1])"
    )
    result = subprocess.run(
        [sys.executable, "-S", "-c", script],
        env={"PYTHONPATH": path},
        cwd=tmp_path,  # `python -c` puts the working directory first on sys.path: not the checkout
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "```"


def test_seen_in_simulation_compares_the_step_size_too():
    from sophon_hf.model_card import _simulated

    config = {"simulation_strategies": ["full"], "inner_optimizers": ["adam:1e-3", "sgd"], "inner_learning_rate": 1e-2}
    assert _simulated({"strategy": "full", "optimizer": "adam", "learning_rate": 1e-3}, config) == "yes"
    assert _simulated({"strategy": "full", "optimizer": "sgd", "learning_rate": 0.01}, config) == "yes"  # default lr
    assert _simulated({"strategy": "full", "optimizer": "adam", "learning_rate": 1e-4}, config).startswith(
        "optimizer only"
    )
    assert _simulated({"strategy": "lora", "optimizer": "adam", "learning_rate": 1e-3}, config) == "no"
    assert _simulated({"strategy": "full", "optimizer": "rmsprop", "learning_rate": 1e-3}, config) == "no"


def test_text_card_loads_the_shipped_tokenizer_or_says_there_is_none():
    text = generate_model_card(model_name="bert-sophon", task="text-classification", has_tokenizer=True).text
    assert 'AutoTokenizer.from_pretrained("path/to/this/model")' in text and "tokenizer(text" in text
    assert "AutoTokenizer" not in generate_model_card(model_name="vit-sophon").text
    # Without one, AutoTokenizer would build an empty tokenizer from config.json and map every word to [UNK].
    without = generate_model_card(model_name="bert-sophon", task="text-classification").text
    assert "AutoTokenizer" not in without and "No tokenizer ships with this model" in without


def test_image_card_prepares_inputs_with_the_shipped_processor_or_says_there_is_none():
    with_processor = generate_model_card(model_name="vit-sophon", has_image_processor=True).text
    assert 'processor = AutoImageProcessor.from_pretrained("path/to/this/model")' in with_processor
    without = generate_model_card(model_name="vit-sophon").text
    assert "AutoImageProcessor" not in without and "No image processor ships with this model" in without


def _table(text: str) -> list[dict[str, str]]:
    lines = [line for line in text.splitlines() if line.startswith("| attack | strategy |")]
    assert len(lines) == 1
    start = text.splitlines().index(lines[0])
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = []
    for line in text.splitlines()[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))))
    return rows


def test_card_table_and_worst_case_put_each_start_in_its_own_place():
    report = classification_report().to_dict()
    text = generate_model_card(report=report, sophon_config=SOPHON_CONFIG).text
    rows = {row["attack"].strip("*"): row for row in _table(text)}
    for attack in report["attacks"]:
        values = final_metrics(attack)
        row = rows[attack["name"]]
        for start in ("protected", "unprotected", "scratch"):
            assert row[start].split()[0] == f"{values[start]:.4f}", (attack["name"], start)
    assert (
        "**Worst case:** `full_reinit_head-adam-lr0.001`: the protected start reached accuracy 0.8000 against 0.7000 "
        "from scratch and 0.9500 from the unprotected original" in text
    )
    assert "accuracy on original-domain test data: protected 0.9700; unprotected 0.9800." in text


def test_card_names_only_the_starts_the_report_has_and_a_tolerance_for_its_metric():
    report = {
        "metric": "denoising_mse",
        "higher_is_better": False,
        "attacks": [{"name": "a", "spec": {}, "final": {"protected": 0.12}, "curves": {"protected": [[0, 1.0]]}}],
    }
    text = generate_model_card(report=report, task="unconditional-image-generation", library_name="diffusers").text
    assert "started from 1 point: this **protected** model." in " ".join(text.split())
    assert "**unprotected** original" not in text and "(this measurement has no scratch baseline" in text
    assert "--tolerance 0.006" in text  # 5% of 0.12, not the 0.05 that suits accuracy


def test_card_applies_the_report_tolerance_to_its_headline():
    report = classification_report()
    report.tolerance = 0.2  # the only head start (0.1) is within it
    text = generate_model_card(report=report.to_dict()).text
    assert "no head start over training from scratch in any of 3 measured attacks" in text
    assert "beat training from scratch" not in text


def test_card_headline_names_attacks_that_led_scratch_during_training():
    # Every attack ends at or below scratch, but the fresh-head one led it by 0.1 at step 10.
    text = generate_model_card(report=classification_report(with_head_start=False).to_dict()).text
    headline = next(line for line in text.splitlines() if line.startswith("- **Resistance:**"))
    assert "no head start over training from scratch at the end of any of 3 measured attacks, but 1 was ahead of " in (
        headline
    )
    with_broken = classification_report()
    with_broken.attacks[2]["curves"]["protected"] = [[0, 0.2], [10, 0.6], [20, 0.1]]  # ends below, led at step 10
    headline = next(
        line
        for line in generate_model_card(report=with_broken.to_dict()).text.splitlines()
        if line.startswith("- **Resistance:**")
    )
    assert "measured attacks beat training from scratch; worst: " in headline
    assert "; 1 more was ahead of scratch during training." in headline


def test_card_without_a_summary_picks_the_largest_head_start_as_worst():
    report = {
        "metric": "accuracy",
        "higher_is_better": True,
        "attacks": [
            {"name": "mild", "spec": {}, "final": {"protected": 0.72, "scratch": 0.7}},
            {"name": "severe", "spec": {}, "final": {"protected": 0.9, "scratch": 0.7}},
            {"name": "held", "spec": {}, "final": {"protected": 0.1, "scratch": 0.7}},
        ],
    }
    text = generate_model_card(report=report).text
    assert "**Worst case:** `severe`" in text
