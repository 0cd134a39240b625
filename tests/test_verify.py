"""`sophon-hf verify`: a published claim is re-run with the real harness and holds, or is caught when it does not."""

import json
import shutil

import pytest
import torch
from datasets import Dataset, DatasetDict
from test_model_card import tiny_vit

from sophon_hf.attacks import AttackSpec, evaluate_finetuning_resistance
from sophon_hf.cli import main as cli_main
from sophon_hf.commands.verify import compare_reports
from sophon_hf.model_card import default_tolerance, write_model_card
from sophon_hf.report import ResistanceReport

ATTACKS = [
    AttackSpec(strategy="full", optimizer="adam", learning_rate=1e-2, steps=2, batch_size=8, eval_interval=2),
    AttackSpec(strategy="linear_probe", optimizer="sgd", learning_rate=1e-1, steps=2, batch_size=8, eval_interval=2),
]


def restricted_data(n: int, seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(5, (n,), generator=g)
    pixels = torch.rand(n, 1, 8, 8, generator=g) * 0.5 + labels.view(-1, 1, 1, 1) / 5
    return Dataset.from_dict({"pixel_values": pixels.numpy(), "labels": labels.numpy()})


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """A model folder as `sophon-hf attack --output` + the card leave it, and its restricted data on disk."""
    root = tmp_path_factory.mktemp("published")
    data = DatasetDict({"train": restricted_data(24, seed=0), "test": restricted_data(16, seed=1)})
    data_dir = root / "restricted"
    data.save_to_disk(str(data_dir))
    folder = root / "model"
    model = tiny_vit()
    model.save_pretrained(folder)
    report = evaluate_finetuning_resistance(model, data["train"], data["test"], attacks=ATTACKS)
    report.save(str(folder))
    write_model_card(folder, restricted_domain="bright digits")
    return folder, data_dir


@pytest.fixture
def published(measured, tmp_path):
    """A fresh copy per test (tests edit the folder); measuring once keeps the file fast."""
    folder, data_dir = measured
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    return copy, data_dir


def test_verify_reproduces_a_published_claim(published, capsys):
    folder, data_dir = published
    assert cli_main(["verify", "--model", str(folder), "--restricted-test", str(data_dir), "--tolerance", "1e-6"]) == 0
    out = capsys.readouterr().out
    for spec in ATTACKS:
        assert f"HOLDS         {spec.name}" in out
    assert "The published claim holds: 2 attack(s)" in out


def test_verify_does_not_re_run_a_reference_the_report_has_no_numbers_for(published, tmp_path, capsys):
    folder, data_dir = published
    tiny_vit(seed=5).save_pretrained(tmp_path / "reference")
    command = ["verify", "--model", str(folder), "--restricted-test", str(data_dir), "--tolerance", "1e-6"]
    assert cli_main([*command, "--reference-model", str(tmp_path / "reference")]) == 0
    out = capsys.readouterr().out
    assert "The report has no unprotected numbers to check: --reference-model" in out
    assert "unprotected" not in out.split("is not re-run.")[1]


def test_verify_catches_numbers_that_do_not_reproduce(published, capsys):
    folder, data_dir = published
    report = json.loads((folder / "report.json").read_text())
    attack = report["attacks"][0]
    # An optimistic publisher: the protected run "ended" much lower than it really does, with every derived number
    # recomputed from the edited curve, so that the report agrees with itself.
    attack["curves"]["protected"][-1][1] -= 0.5
    (folder / "report.json").write_text(json.dumps(ResistanceReport.from_dict(report).to_dict()))
    write_model_card(folder)  # the card agrees with the edited report: only the re-run can catch it

    assert cli_main(["verify", "--model", str(folder), "--restricted-test", str(data_dir)]) == 1
    out = capsys.readouterr().out
    assert f"DOES NOT HOLD {ATTACKS[0].name}" in out
    assert f"HOLDS         {ATTACKS[1].name}" in out
    assert "The published claim does NOT hold (1 problem(s))" in out


def test_verify_catches_a_report_of_other_weights_and_a_stale_card(published, capsys):
    folder, data_dir = published
    tiny_vit(seed=1).save_pretrained(folder)
    report = json.loads((folder / "report.json").read_text())
    report["attacks"][1]["effective_final"]["scratch"] = 0.123  # the card now publishes other numbers
    (folder / "report.json").write_text(json.dumps(report))
    code = cli_main(
        ["verify", "--model", str(folder), "--restricted-test", str(data_dir), "--attack", ATTACKS[0].name]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "report.json was not measured on these weights" in out
    assert "card: scratch result of" in out and "report.json says 0.123" in out


def test_verify_catches_a_report_that_drops_the_harness_warnings(published, capsys):
    folder, data_dir = published
    model = tiny_vit()
    with torch.no_grad():  # LayerNorm follows: a scale the harness flags
        for module in model.vit.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(100.0)
    model.save_pretrained(folder)
    data = DatasetDict.load_from_disk(str(data_dir))
    report = evaluate_finetuning_resistance(model, data["train"], data["test"], attacks=ATTACKS).to_dict()
    (warning,) = report["warnings"]
    command = ["verify", "--model", str(folder), "--restricted-test", str(data_dir), "--tolerance", "1e-6"]
    (folder / "README.md").unlink()
    (folder / "report.json").write_text(json.dumps({**report, "warnings": []}))
    assert cli_main(command) == 1
    assert f"the harness warns, and the published report does not: {warning}" in capsys.readouterr().out
    (folder / "report.json").write_text(json.dumps(report))
    assert cli_main(command) == 0
    assert f"with the report's own warning: {warning}" in capsys.readouterr().out


def test_verify_fails_on_a_published_attack_it_cannot_match(published, capsys):
    folder, data_dir = published
    report = json.loads((folder / "report.json").read_text())
    # Renamed (and its claim made rosier): the re-run names attacks from their specs, so this one is never matched.
    report["attacks"][0]["name"] = "renamed"
    report["attacks"][0]["curves"]["protected"][-1][1] = 0.0
    report = ResistanceReport.from_dict(report).to_dict()
    (folder / "report.json").write_text(json.dumps(report))
    write_model_card(folder)
    assert cli_main(["verify", "--model", str(folder), "--restricted-test", str(data_dir)]) == 1
    out = capsys.readouterr().out
    assert f"report.json names an attack 'renamed' whose spec describes {ATTACKS[0].name!r}" in out
    assert f"HOLDS         {ATTACKS[1].name}:" in out and "renamed:" not in out  # only the matched one re-runs
    assert "The published claim does NOT hold (1 problem(s))" in out
    # Nothing left to re-run: the verdict still fails, without training anything.
    report["attacks"] = report["attacks"][:1]
    (folder / "report.json").write_text(json.dumps(ResistanceReport.from_dict(report).to_dict()))
    write_model_card(folder)
    assert cli_main(["verify", "--model", str(folder), "--restricted-test", str(data_dir)]) == 1
    out = capsys.readouterr().out
    assert "Re-running" not in out and "The published claim does NOT hold (1 problem(s))" in out
    # And a re-run that lacks a published attack never passes it by.
    (row,) = compare_reports({"attacks": [_attack("a", 0.3, 0.8)]}, {"attacks": []}, tolerance=0.05)
    assert not row["holds"] and row["reason"].startswith("not re-run")


def test_verify_fails_on_a_summary_its_curves_do_not_give(published, capsys):
    folder, data_dir = published
    report = json.loads((folder / "report.json").read_text())
    report["attacks"][1]["head_start"] = -0.9
    (folder / "report.json").write_text(json.dumps(report))
    assert cli_main(["verify", "--model", str(folder), "--restricted-test", str(data_dir)]) == 1
    out = capsys.readouterr().out
    assert f"report.json: {ATTACKS[1].name}: head_start is -0.9, its curves give" in out


@pytest.mark.parametrize(
    "content, message",
    [
        ("{bad", r"report.json is not a valid sophon_hf report \(Expecting property name"),
        ("[]", r"report.json is not a valid sophon_hf report \(a JSON list, not an object\)"),
        (
            '{"attacks": [{"name": "a"}]}',
            r"report.json is not a valid sophon_hf report \(attack record\(s\) \[0\] lack",
        ),
    ],
    ids=["not-json", "not-an-object", "no-spec"],
)
def test_verify_a_malformed_report_is_a_message(published, content, message):
    folder, data_dir = published
    (folder / "report.json").write_text(content)
    with pytest.raises(SystemExit, match=message + r".*it makes no claim that can be verified"):
        cli_main(["verify", "--model", str(folder), "--restricted-test", str(data_dir)])


def test_verify_refuses_to_train_on_its_test_rows(published, tmp_path):
    folder, data_dir = published
    restricted_data(16, seed=1).save_to_disk(str(tmp_path / "single"))
    with pytest.raises(SystemExit, match="cannot both come from it: pass --restricted-train"):
        cli_main(["verify", "--model", str(folder), "--restricted-test", str(tmp_path / "single")])
    with pytest.raises(SystemExit, match="cannot both come from it: pass --restricted-test"):
        cli_main(["verify", "--model", str(folder), "--restricted-train", str(tmp_path / "single")])
    with pytest.raises(SystemExit, match="needs the restricted data: --restricted-test and/or --restricted-train"):
        cli_main(["verify", "--model", str(folder)])


def test_verify_takes_the_dataset_options_of_attack(published, capsys):
    # `sophon-hf attack --restricted-train DS` takes its test split from DS: verify accepts the same command line.
    folder, data_dir = published
    assert (
        cli_main(["verify", "--model", str(folder), "--restricted-train", str(data_dir), "--tolerance", "1e-6"]) == 0
    )
    assert "The published claim holds" in capsys.readouterr().out


def test_verify_a_hub_id_that_cannot_be_downloaded_is_a_message(published):
    folder, data_dir = published
    with pytest.raises(SystemExit, match="Cannot load the model 'nobody/not-a-model'.*downloading it from the Hub"):
        cli_main(["verify", "--model", "nobody/not-a-model", "--restricted-test", str(data_dir)])


def test_verify_without_a_report_or_with_unknown_attacks(published):
    folder, data_dir = published
    with pytest.raises(SystemExit, match="has no attack"):
        cli_main(["verify", "--model", str(folder), "--restricted-test", str(data_dir), "--attack", "nope"])
    (folder / "report.json").unlink()
    with pytest.raises(SystemExit, match="publishes no report.json"):
        cli_main(["verify", "--model", str(folder), "--restricted-test", str(data_dir)])


def _attack(name, protected, scratch, unprotected=None):
    final = {"protected": protected, "scratch": scratch}
    if unprotected is not None:
        final["unprotected"] = unprotected
    return {"name": name, "spec": {}, "final": final}


@pytest.mark.parametrize(
    "higher_is_better, published, reproduced, holds",
    [
        (True, (0.30, 0.80), (0.33, 0.78), True),  # within tolerance, still far below scratch
        (True, (0.30, 0.80), (0.40, 0.80), False),  # protected drifted by 0.10
        (True, (0.78, 0.80), (0.82, 0.76), False),  # each within 0.05, but now a head start of +0.06
        (False, (0.70, 0.48), (0.69, 0.47), True),  # denoising error: higher protected error is the claim
        (False, (0.70, 0.48), (0.45, 0.48), False),
    ],
)
def test_compare_reports(higher_is_better, published, reproduced, holds):
    before = {"higher_is_better": higher_is_better, "attacks": [_attack("a", *published)]}
    after = {"higher_is_better": higher_is_better, "attacks": [_attack("a", *reproduced)]}
    (row,) = compare_reports(before, after, tolerance=0.05)
    assert row["holds"] is holds, row


def test_verify_a_pushed_model_by_its_hub_id(published, tmp_path, monkeypatch, capsys):
    from test_hub import FakeHub

    from sophon_hf.hub import push_folder

    folder, data_dir = published
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    hub = FakeHub(tmp_path / "remote")
    hub.install(monkeypatch)
    push_folder(folder, "me/vit-sophon")
    requested = {}

    def snapshot_download(repo_id, *, revision=None, allow_patterns=None, **kwargs):
        # The download side of the fake Hub: what a user gets, filtered the way the Hub filters.
        requested["allow_patterns"] = allow_patterns
        return str(hub.branch_dir(repo_id, revision))

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    assert cli_main(["verify", "--model", "me/vit-sophon", "--restricted-test", str(data_dir)]) == 0
    assert "The published claim holds: 2 attack(s)" in capsys.readouterr().out
    assert "*.safetensors" in requested["allow_patterns"]
    assert not any(pattern.endswith((".bin", ".pt", ".pkl")) for pattern in requested["allow_patterns"])


def test_verify_a_diffusion_unet_with_its_scheduler(tmp_path, capsys):
    from diffusers import DDPMScheduler
    from test_model_card import tiny_unet

    g = torch.Generator().manual_seed(0)
    images = lambda n: Dataset.from_dict({"pixel_values": (torch.rand(n, 1, 16, 16, generator=g) * 2 - 1).numpy()})  # noqa: E731
    data = DatasetDict(train=images(16), test=images(8))
    data.save_to_disk(str(tmp_path / "restricted"))
    folder = tmp_path / "unet"
    unet = tiny_unet()
    unet.save_pretrained(folder)
    # A non-default schedule: verify must use the published one (scheduler_config.json), not DDPMScheduler().
    scheduler = DDPMScheduler(num_train_timesteps=100)
    scheduler.save_pretrained(folder)
    attacks = [
        AttackSpec(strategy="full", optimizer="adam", learning_rate=1e-3, steps=2, batch_size=8, eval_interval=2)
    ]
    report = evaluate_finetuning_resistance(
        unet, data["train"], data["test"], attacks=attacks, noise_scheduler=scheduler
    )
    report.save(str(folder))
    write_model_card(folder, restricted_domain="noise images")

    args = ["verify", "--model", str(folder), "--restricted-test", str(tmp_path / "restricted"), "--tolerance", "1e-6"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "denoising_mse: published -> re-run" in out and f"HOLDS         {attacks[0].name}" in out
    # Without --tolerance: 5% of the published denoising errors, not accuracy's 0.05.
    assert cli_main(args[:-2]) == 0
    expected = default_tolerance(report.to_dict())
    assert expected < 0.05 and f"(tolerance {expected:g})" in capsys.readouterr().out


def test_the_default_tolerance_follows_the_metric():
    assert default_tolerance({"metric": "accuracy", "attacks": [_attack("a", 0.3, 0.8)]}) == 0.05
    # A denoising error near 0.1: 0.05 would accept almost any re-run; 5% of the median published value does not.
    errors = {"metric": "denoising_mse", "attacks": [_attack("a", 0.12, 0.11, 0.10), _attack("b", 0.13, 0.11)]}
    assert default_tolerance(errors) == pytest.approx(0.05 * 0.11)


def test_compare_reports_at_zero_tolerance_and_without_a_protected_result():
    report = {"higher_is_better": True, "attacks": [_attack("a", 0.30, 0.80, 0.90)]}
    (row,) = compare_reports(report, report, tolerance=0.0)  # an exact reproduction holds at tolerance 0
    assert row["holds"] and set(row["checks"]) == {"protected", "unprotected", "scratch"}
    (row,) = compare_reports(report, {"attacks": [_attack("a", None, 0.80)]}, tolerance=0.05)
    assert not row["holds"] and "no final metric" in row["reason"]


class _Stop(Exception):
    """Raised by a stand-in harness once it has recorded what verify passed to it."""


def test_verify_re_runs_with_the_published_recipe_splits_and_reference(published, tmp_path, monkeypatch):
    from sophon_hf.utils import model_fingerprint

    folder, data_dir = published
    report = json.loads((folder / "report.json").read_text())
    # A report of a fixed-rate scratch baseline (as written before scratch was tuned by default).
    report["scratch_recipe"] = {**report["scratch_recipe"], "learning_rate": 0.0123, "initialisations": 2}
    del report["scratch_recipe"]["learning_rates"]
    # Unprotected numbers to check, so that the reference is re-run.
    report["attacks"][1]["curves"]["unprotected"] = report["attacks"][1]["curves"]["protected"]
    (folder / "report.json").write_text(json.dumps(report))
    reference = tiny_vit(seed=7)
    reference.save_pretrained(tmp_path / "reference")
    captured = {}

    def harness(model, train, test, **kwargs):
        captured.update(train=train, test=test, **kwargs)
        raise _Stop

    monkeypatch.setattr("sophon_hf.attacks.evaluate_finetuning_resistance", harness)
    with pytest.raises(_Stop):
        cli_main(
            ["verify", "--model", str(folder), "--restricted-test", str(data_dir), "--attack", ATTACKS[1].name,
             "--reference-model", str(tmp_path / "reference")]
        )  # fmt: skip
    assert [spec.name for spec in captured["attacks"]] == [ATTACKS[1].name]
    assert captured["scratch_recipe"]["learning_rate"] == 0.0123 and captured["scratch_inits"] == 2
    assert captured["include_scratch"] is True and captured["scratch_learning_rates"] is None
    assert (captured["train"].num_rows, captured["test"].num_rows) == (24, 16)  # "train" to attack, "test" to score
    assert model_fingerprint(captured["reference_model"]) == model_fingerprint(reference)


def test_verify_re_runs_a_tuned_scratch_baseline_with_its_learning_rates(published, monkeypatch):
    folder, data_dir = published
    report = json.loads((folder / "report.json").read_text())
    report["scratch_recipe"] = {**report["scratch_recipe"], "learning_rate": "tuned per budget"}
    report["scratch_recipe"]["learning_rates"] = [3e-4, 1e-2]
    (folder / "report.json").write_text(json.dumps(report))
    captured = {}

    def harness(model, train, test, **kwargs):
        captured.update(kwargs)
        raise _Stop

    monkeypatch.setattr("sophon_hf.attacks.evaluate_finetuning_resistance", harness)
    with pytest.raises(_Stop):
        cli_main(["verify", "--model", str(folder), "--restricted-test", str(data_dir)])
    assert captured["scratch_learning_rates"] == [3e-4, 1e-2]
    assert "learning_rate" not in captured["scratch_recipe"]  # the grid replaces it; the label is no number


def test_verify_refuses_a_negative_tolerance(published):
    folder, data_dir = published
    with pytest.raises(SystemExit, match="non-negative"):
        cli_main(["verify", "--model", str(folder), "--restricted-test", str(data_dir), "--tolerance", "-0.1"])


def test_verify_downloads_the_requested_revision_with_the_token(published, tmp_path, monkeypatch, capsys):
    from test_hub import FakeHub

    from sophon_hf.hub import push_folder

    folder, data_dir = published
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    hub = FakeHub(tmp_path / "remote")
    hub.install(monkeypatch)
    push_folder(folder, "me/vit-sophon", revision="v1")
    requested = {}

    def snapshot_download(repo_id, *, revision=None, token=None, **kwargs):
        requested.update(revision=revision, token=token)
        return str(hub.branch_dir(repo_id, revision))

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    args = ["verify", "--model", "me/vit-sophon", "--revision", "v1", "--token", "hf_reader"]
    assert cli_main([*args, "--restricted-test", str(data_dir)]) == 0
    assert requested == {"revision": "v1", "token": "hf_reader"}


def test_verify_catches_a_reference_model_other_than_the_measured_one(tmp_path, capsys):
    data = DatasetDict({"train": restricted_data(24, seed=0), "test": restricted_data(16, seed=1)})
    data.save_to_disk(str(tmp_path / "restricted"))
    model, reference = tiny_vit(), tiny_vit(seed=5)
    model.save_pretrained(tmp_path / "model")
    reference.save_pretrained(tmp_path / "reference")
    tiny_vit(seed=6).save_pretrained(tmp_path / "impostor")
    report = evaluate_finetuning_resistance(
        model, data["train"], data["test"], attacks=ATTACKS[:1], reference_model=reference, include_scratch=False
    )
    report.save(str(tmp_path / "model"))
    args = ["verify", "--model", str(tmp_path / "model"), "--restricted-test", str(tmp_path / "restricted")]
    assert cli_main([*args, "--reference-model", str(tmp_path / "reference"), "--tolerance", "1e-6"]) == 0
    capsys.readouterr()
    assert cli_main([*args, "--reference-model", str(tmp_path / "impostor")]) == 1
    assert "is not the unprotected model the report was measured against" in capsys.readouterr().out


def test_verify_downloads_a_reference_model_with_the_given_token(published, tmp_path, monkeypatch):
    folder, data_dir = published
    tiny_vit(seed=3).save_pretrained(tmp_path / "ref")
    requested = []

    def snapshot_download(repo_id, *, token=None, **kwargs):
        requested.append((repo_id, token))
        return str(tmp_path / "ref")

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    report = json.loads((folder / "report.json").read_text())
    report["attacks"][0]["curves"]["unprotected"] = report["attacks"][0]["curves"]["protected"]
    (folder / "report.json").write_text(json.dumps(report))  # unprotected numbers to check: the reference is needed
    args = ["verify", "--model", str(folder), "--restricted-test", str(data_dir), "--reference-model", "me/ref"]
    cli_main([*args, "--token", "hf_private"])
    assert requested == [("me/ref", "hf_private")]  # a private reference repo needs the token
