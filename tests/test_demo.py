"""The demo pipeline end to end in a seconds-long configuration, and the protect command on a shipped recipe."""

import json
import os

import PIL.Image
import torch
from datasets import load_from_disk
from huggingface_hub import ModelCard
from transformers import AutoImageProcessor, AutoModelForImageClassification

from sophon_hf.attacks import AttackSpec
from sophon_hf.cli import main
from sophon_hf.data import mnist_domains
from sophon_hf.demo import DemoSettings, run_demo, summary_table
from sophon_hf.report import ResistanceReport
from sophon_hf.utils import model_fingerprint


def test_demo_pipeline_writes_models_report_plots_and_card(tmp_path, capsys):
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
    timings = json.loads((out / "timings.json").read_text())
    assert all(timings[k] > 0 for k in ("pretraining_seconds", "protection_seconds", "attacks_seconds"))
    assert "x the" in printed and "s of pre-training" in printed
    saved = json.loads((out / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert set(saved["original"]) == {"unprotected", "protected"}
    assert [a["name"] for a in saved["attacks"]] == [AttackSpec.from_dict(spec).name for spec in settings.suite]
    assert all(set(a["final"]) == {"protected", "unprotected", "scratch"} for a in saved["attacks"])
    close = sum(a["largest_head_start"]["value"] <= 0.02 for a in saved["attacks"])
    assert f"within 2 points of scratch at every evaluation point in {close}/2 attacks" in printed
    protected = AutoModelForImageClassification.from_pretrained(out / "protected")
    assert saved["fingerprints"]["protected"] == model_fingerprint(protected)
    card = ModelCard.load(out / "protected" / "README.md")
    assert "MNIST digits 5-9" in card.text and "scratch" in card.text
    assert card.data.eval_results
    assert 'processor = AutoImageProcessor.from_pretrained("path/to/this/model")' in card.text


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
