"""ResistanceReport: schema, summary arithmetic, lower-is-better metrics, divergence, files on disk."""

import json
import os

import pytest
from conftest import image_dataset, tiny_vit

from sophon_hf.attacks import AttackSpec, evaluate_finetuning_resistance
from sophon_hf.model_card import generate_model_card
from sophon_hf.report import ResistanceReport, area_under_curve

# The test machine's cores are shared: one intra-op thread avoids OpenMP contention (tiny steps 20x slower).
pytestmark = pytest.mark.usefixtures("one_thread")


def _record(name, protected, unprotected, scratch, diverged=None):
    curves = {"protected": protected, "unprotected": unprotected, "scratch": scratch}
    diverged = diverged or {}
    return {
        "name": name,
        "spec": {"strategy": "full"},
        "curves": curves,
        "diverged": {s: s in diverged for s in curves},
        "diverged_at": {s: diverged.get(s) for s in curves},
    }


def _report(higher_is_better=True, **kwargs):
    attacks = [
        _record("a", [[0, 0.2], [10, 0.3]], [[0, 0.2], [10, 0.9]], [[0, 0.2], [5, 0.6], [10, 0.7]]),
        _record("b", [[0, 0.2], [10, 0.75]], [[0, 0.2], [10, 0.95]], [[0, 0.2], [5, 0.5], [10, 0.7]]),
    ]
    return ResistanceReport("image-classification", "accuracy", higher_is_better, attacks, **kwargs)


def test_summary_arithmetic_by_hand():
    data = _report().to_dict()
    a, b = data["attacks"]
    assert a["final"] == {"protected": 0.3, "unprotected": 0.9, "scratch": 0.7}
    assert a["protected_minus_scratch"] == pytest.approx(-0.4)
    assert a["verdict"] == "no head start over scratch at the end"
    assert a["largest_head_start"] == {"value": 0.0, "step": 0}  # level at step 0, behind at step 10
    assert b["verdict"] == "head start of 0.05 accuracy over scratch"
    # AUC: mean of the trapezoids; scratch (0.2+0.6)/2*5 + (0.6+0.7)/2*5 = 5.25 over 10 steps.
    assert a["auc"]["scratch"] == pytest.approx(0.525)
    assert area_under_curve([[0, 1.0]]) == 1.0
    # Threshold: 0.9 of the way from scratch's 0.2 to its 0.7 = 0.65; scratch gets there at step 10.
    assert a["threshold"] == pytest.approx(0.65)
    assert a["steps_to_threshold"] == {"protected": None, "unprotected": 10, "scratch": 10}
    assert data["summary"]["worst_attack"] == "b"
    assert data["summary"]["worst_protected_minus_scratch"] == pytest.approx(0.05)
    assert data["summary"]["attacks_with_head_start"] == ["b"]


def test_lower_is_better_flips_every_comparison():
    # A denoising error: the attacker wants it low. Protected stays high in "a" (good), drops below scratch in "b".
    attacks = [
        _record("a", [[0, 1.0], [10, 0.9]], [[0, 1.0], [10, 0.3]], [[0, 1.0], [10, 0.5]]),
        _record("b", [[0, 1.0], [10, 0.4]], [[0, 1.0], [10, 0.3]], [[0, 1.0], [10, 0.5]]),
    ]
    report = ResistanceReport("diffusion", "denoising_error", False, attacks)
    data = report.to_dict()
    assert data["attacks"][0]["verdict"] == "no head start over scratch at the end"
    assert data["attacks"][1]["verdict"].startswith("head start of 0.1 ")
    assert data["summary"]["worst_attack"] == "b"
    assert data["summary"]["worst_protected_minus_scratch"] == pytest.approx(-0.1)
    assert data["attacks"][0]["steps_to_threshold"]["unprotected"] == 10  # 0.3 <= 0.55 (the threshold)


def test_ahead_during_training_is_reported_and_float_noise_is_not_a_head_start():
    attacks = [
        # Ends below scratch, but was 0.57 ahead at step 10: an attacker keeping the best checkpoint gets that.
        _record(
            "early",
            [[0, 0.2], [10, 0.92], [20, 0.55]],
            [[0, 0.2], [10, 0.9], [20, 0.9]],
            [[0, 0.2], [10, 0.35], [20, 0.6]],
        ),
        # Level everywhere; the scratch mean of three initialisations carries float noise.
        _record("level", [[0, 0.2], [20, 0.346]], [[0, 0.2], [20, 0.9]], [[0, 0.2], [20, (0.346 * 3) / 3 - 5e-17]]),
    ]
    data = ResistanceReport("image-classification", "accuracy", True, attacks).to_dict()
    early, level = data["attacks"]
    assert early["verdict"] == "no head start over scratch at the end (but ahead by 0.57 at step 10)"
    assert early["largest_head_start"] == {"value": pytest.approx(0.57), "step": 10}
    assert level["head_start"] == 0 and level["verdict"] == "no head start over scratch at the end"
    assert data["summary"]["attacks_with_head_start"] == []
    assert data["summary"]["attacks_ahead_during_training"] == ["early"]
    assert data["summary"]["verdict"] == (
        "no head start over scratch at the end of any of 2 attacks, but 1 was ahead of it during training"
    )
    # With an attack that ends ahead, the others that led during training are "more".
    attacks.append(_record("late", [[0, 0.2], [20, 0.9]], [[0, 0.2], [20, 0.9]], [[0, 0.2], [20, 0.5]]))
    verdict = ResistanceReport("image-classification", "accuracy", True, attacks).summary["verdict"]
    assert verdict.endswith(
        "; 1 more ends no better than scratch for the attacker but was ahead of it during training"
    )


def test_ahead_during_training_for_an_error_metric_reads_in_the_attackers_direction():
    # Denoising error: lower is better for the attacker. The protected UNet ends worse (higher) than scratch but was
    # ahead (lower) at step 10; the wording must not say it "ends level or below".
    attacks = [
        _record(
            "lora",
            [[0, 0.9], [10, 0.2], [20, 0.5]],
            [[0, 0.9], [10, 0.2], [20, 0.2]],
            [[0, 0.9], [10, 0.6], [20, 0.35]],
        )
    ]
    data = ResistanceReport("unconditional-image-generation", "denoising_mse", False, attacks).to_dict()
    (record,) = data["attacks"]
    assert record["head_start"] == pytest.approx(-0.15)
    assert data["summary"]["attacks_ahead_during_training"] == ["lora"]
    assert data["summary"]["verdict"].endswith("any of 1 attacks, but 1 was ahead of it during training")
    card = generate_model_card(task="unconditional-image-generation", library_name="diffusers", report=data)
    assert "1 of the attacks that end no better than scratch for the attacker was ahead of it" in card.text
    assert "level" not in data["summary"]["verdict"] and "level with scratch or below" not in card.text


def test_diverged_runs_use_their_best_value_before_divergence():
    report = _report()
    report.attacks.append(
        _record("c", [[0, 0.2], [5, 0.8]], [[0, 0.2], [10, 0.9]], [[0, 0.2], [10, 0.7]], diverged={"protected": 7})
    )
    data = report.to_dict()
    c = data["attacks"][2]
    assert c["final"]["protected"] is None and c["effective_final"]["protected"] == 0.8
    assert "protected run diverged at step 7" in c["verdict"]
    assert data["summary"]["worst_attack"] == "c"  # the attacker keeps the checkpoint before the blow-up
    assert data["summary"]["diverged_attacks"] == ["c"]


def test_text_table_lists_worst_first_with_diverged_runs_marked():
    report = _report()
    report.attacks.append(
        _record("c", [[0, 0.2], [5, 0.8]], [[0, 0.2], [10, 0.9]], [[0, 0.2], [10, 0.7]], diverged={"protected": 7})
    )
    rows = report.to_text().splitlines()
    assert rows[0].split() == ["attack", "protected", "unprotected", "scratch", "head", "start", "largest", "lead"]
    assert [r.split()[0] for r in rows[1:4]] == ["c", "b", "a"]  # worst first
    assert rows[1].split()[1:] == ["0.8000*", "0.9000", "0.7000", "+0.1000", "+0.0000", "at", "step", "0"]
    assert rows[3].split()[1:5] == ["0.3000", "0.9000", "0.7000", "-0.4000"]
    assert rows[-2].startswith("* the run diverged")
    shortened = report.to_text(max_rows=1).splitlines()
    assert len(shortened) == 5 and shortened[2] == "... 2 more attacks in report.md"
    # Lower is better (denoising error): protected 0.1 against scratch 0.3 is a head start of +0.2, like its lead.
    record = _record("d", [[0, 0.5], [10, 0.1]], [[0, 0.5], [10, 0.05]], [[0, 0.5], [10, 0.3]])
    lower = ResistanceReport("unconditional-image-generation", "denoising_mse", False, [record])
    row = lower.to_text().splitlines()[1].split()[1:]
    assert row == ["0.1000", "0.0500", "0.3000", "+0.2000", "+0.2000", "at", "step", "10"]


def test_small_head_starts_keep_their_digits_and_lower_is_better_reads_as_a_head_start():
    # A denoising error 0.08840 against scratch's 0.08844: a head start of 4e-05, which must not print as +0.0000.
    record = _record("tiny", [[0, 1.0], [10, 0.08840]], [[0, 1.0], [10, 0.08]], [[0, 1.0], [10, 0.08844]])
    report = ResistanceReport("unconditional-image-generation", "denoising_mse", False, [record])
    assert report.to_text().splitlines()[1].split()[4] == "+4.00e-05"
    assert report.summary["verdict"].endswith("worst: tiny (a head start of 4e-05 in denoising_mse)")


def test_step_0_leads_say_they_are_before_fine_tuning():
    record = _record("released", [[0, 0.5], [10, 0.3]], [[0, 0.2], [10, 0.9]], [[0, 0.1], [10, 0.9]])
    verdict = ResistanceReport("image-classification", "accuracy", True, [record]).to_dict()["attacks"][0]["verdict"]
    assert verdict == "no head start over scratch at the end (but ahead by 0.4 at step 0, before fine-tuning)"


def test_rows_without_scratch_come_after_those_with_one_as_in_the_summary():
    attacks = [
        {"name": "no_scratch", "spec": {}, "curves": {"protected": [[0, 0.1], [5, 0.9]]}},
        _record("with_scratch", [[0, 0.2], [10, 0.5]], [[0, 0.2], [10, 0.9]], [[0, 0.2], [10, 0.7]]),
    ]
    report = ResistanceReport("image-classification", "accuracy", True, attacks)
    assert report.summary["worst_attack"] == "with_scratch"
    assert [r["name"] for r in report._worst_first()] == ["with_scratch", "no_scratch"]
    assert report.to_text().splitlines()[1].startswith("with_scratch")


def test_without_scratch_the_worst_attack_is_the_best_protected_result():
    attacks = [
        {"name": "a", "spec": {}, "curves": {"protected": [[0, 0.1], [5, 0.4]]}},
        {"name": "b", "spec": {}, "curves": {"protected": [[0, 0.1], [5, 0.6]]}},
    ]
    summary = ResistanceReport("image-classification", "accuracy", True, attacks).summary
    assert summary["worst_attack"] == "b" and summary["worst_protected_minus_scratch"] is None
    assert summary["verdict"].startswith("no scratch baseline")


def test_save_load_roundtrip_and_files(tmp_path):
    report = _report(original={"unprotected": 0.99, "protected": 0.985}, fingerprints={"protected": "ab" * 32})
    paths = report.save(str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["report.json", "report.md", "attack_curves.png"]
    with open(paths[2], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    markdown = open(paths[1]).read()
    assert "| `b` |" in markdown and "head start of 0.05 accuracy over scratch" in markdown
    assert markdown.index("| `b` |") < markdown.index("| `a` |")  # worst first
    loaded = ResistanceReport.load(str(tmp_path))
    assert loaded.to_dict() == report.to_dict()
    assert loaded.to_dict()["original"] == {"unprotected": 0.99, "protected": 0.985}


def test_a_report_that_cannot_be_written_leaves_the_previous_files_intact(tmp_path):
    _report().save(str(tmp_path))
    before = {name: (tmp_path / name).read_bytes() for name in ("report.json", "report.md")}
    with pytest.raises(ValueError, match="Out of range float"):
        _report(original={"protected": float("nan"), "unprotected": 0.9}).save(str(tmp_path))
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(tmp_path)) == ["attack_curves.png", "report.json", "report.md"]


def test_report_md_gives_the_head_start_in_the_attackers_direction():
    # Denoising error: protected 0.5 against scratch 0.55 is a head start of +0.05 for the attacker.
    attacks = [_record("a", [[0, 0.9], [10, 0.5]], [[0, 0.9], [10, 0.4]], [[0, 0.9], [10, 0.55]])]
    markdown = ResistanceReport("unconditional-image-generation", "denoising_mse", False, attacks).to_markdown()
    row = next(line for line in markdown.splitlines() if line.startswith("| `a` |"))
    assert "+0.0500" in row and "-0.05" not in row


def test_report_inconsistencies_name_every_derived_number_its_curves_do_not_give():
    from sophon_hf.report import report_inconsistencies

    data = _report().to_dict()
    assert report_inconsistencies(data) == []
    data["attacks"][0]["final"]["protected"] = 0.1
    data["attacks"][1]["head_start"] = -0.2
    data["summary"]["worst_attack"] = "a"
    data["summary"]["attacks_with_head_start"] = []
    problems = report_inconsistencies(data)
    assert problems == [
        "a: final.protected is 0.1, its curves give 0.3",
        "b: head_start is -0.2, its curves give 0.05",
        "summary.worst_attack is 'a', its curves give 'b'",
        "summary.attacks_with_head_start is [], its curves give ['b']",
    ]
    data["attacks"][1]["largest_head_start"]["value"] = 0.0
    assert "b: largest_head_start.value is 0.0, its curves give 0.05" in report_inconsistencies(data)
    # A hand-made report of final numbers only has no curves to check against; one that drops the curves of some
    # records (to hide their edits) or holds malformed ones is itself the problem.
    assert report_inconsistencies({"attacks": [{"name": "a", "final": {"protected": 0.3}}]}) == []
    del data["attacks"][0]["curves"]
    assert report_inconsistencies(data) == [
        "some attack records have curves and others do not: the numbers of those cannot be checked"
    ]
    malformed = _report().to_dict()
    malformed["attacks"][0]["spec"] = "full-adam"
    assert report_inconsistencies(malformed) == [
        "its attack records cannot be read back (a curve or a field is malformed)"
    ]


def test_real_report_follows_the_design_schema(tmp_path):
    model = tiny_vit(num_labels=5, seed=1)
    spec = AttackSpec(strategy="full", optimizer="adam", learning_rate=1e-3, steps=4, batch_size=8, eval_interval=2)
    report = evaluate_finetuning_resistance(
        model, image_dataset(24), image_dataset(16, seed=1), attacks=[spec], reference_model=tiny_vit(seed=2)
    )
    report.save(str(tmp_path))
    with open(tmp_path / "report.json") as f:
        data = json.load(f)
    assert data["task"] == "image-classification" and data["metric"] == "accuracy"
    assert data["higher_is_better"] is True
    (attack,) = data["attacks"]
    assert attack["name"] == "full-adam-lr0.001-steps4-bs8-eval2"
    assert attack["spec"]["strategy"] == "full" and attack["spec"]["optimizer"] == "adam"
    assert set(attack["curves"]) == set(attack["final"]) == {"protected", "unprotected", "scratch"}
    for start, curve in attack["curves"].items():
        assert [step for step, _ in curve] == [0, 2, 4]
        assert attack["final"][start] == curve[-1][1]
        assert 0.0 <= curve[-1][1] <= 1.0
    assert {"auc", "steps_to_threshold", "verdict", "diverged"} <= set(attack)
    assert data["summary"]["worst_attack"] == attack["name"]
    assert data["summary"]["worst_protected_minus_scratch"] == pytest.approx(
        attack["final"]["protected"] - attack["final"]["scratch"]
    )
    assert data["scratch_recipe"]["optimizer"] == "adam" and data["scratch_recipe"]["learning_rates"] == [
        1e-4,
        1e-3,
        1e-2,
    ]
    assert attack["scratch_learning_rate"] in (1e-4, 1e-3, 1e-2) and len(attack["scratch_grid"]) == 3
    assert data["fingerprints"]["protected"] != data["fingerprints"]["reference"]
    assert os.path.getsize(tmp_path / "attack_curves.png") > 1000


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_a_diverged_run_counts_with_its_best_value_not_its_last(higher_is_better):
    # Best before divergence differs from the last value, in the attacker's direction.
    best, last = (0.8, 0.5) if higher_is_better else (0.3, 0.6)
    record = _record(
        "c",
        [[0, 0.4], [5, best], [10, last]],
        [[0, 0.4], [10, 0.9]],
        [[0, 0.4], [10, 0.7]],
        diverged={"protected": 12},
    )
    summary = ResistanceReport("t", "m", higher_is_better, [record]).attack_summary(record)
    assert summary["final"]["protected"] is None
    assert summary["effective_final"]["protected"] == best


def test_tolerance_turns_a_small_head_start_into_none():
    report = _report(tolerance=0.1)  # "b" is 0.05 ahead of scratch at the end
    data = report.to_dict()
    assert data["attacks"][1]["head_start"] == pytest.approx(0.05)
    assert data["attacks"][1]["verdict"] == "no head start over scratch at the end"
    assert data["summary"]["attacks_with_head_start"] == []
    assert _report(tolerance=0.01).to_dict()["summary"]["attacks_with_head_start"] == ["b"]


def test_the_same_attack_at_several_seeds_is_grouped_with_its_spread():
    def run(name, seed, protected_final):
        record = _record(name, [[0, 0.2], [10, protected_final]], [[0, 0.2], [10, 0.9]], [[0, 0.2], [10, 0.7]])
        record["spec"] = {"strategy": name.split("-")[0], "optimizer": "adam", "learning_rate": 0.01, "seed": seed}
        if name.startswith("lora"):
            record["spec"]["lora_rank"] = 4
        return record

    attacks = [
        run("full-adam-lr0.01", 0, 0.8),
        run("full-adam-lr0.01-seed1", 1, 0.6),
        run("full-adam-lr0.01-seed2", 2, 0.75),
        run("lora-adam-lr0.01-seed1-r4", 1, 0.5),  # a seed before LoRA's own suffixes
        run("lora-adam-lr0.01-r4", 0, 0.6),
        run("linear_probe-adam-lr0.01", 0, 0.9),  # one seed only: not a group
    ]
    report = ResistanceReport("image-classification", "accuracy", True, attacks)
    groups = report.across_seeds()
    assert [g["attack"] for g in groups] == ["full-adam-lr0.01", "lora-adam-lr0.01-r4"]  # highest mean first
    full = groups[0]
    assert full["seeds"] == [0, 1, 2]
    assert full["head_starts"] == pytest.approx([0.1, -0.1, 0.05])
    assert (full["mean"], full["min"], full["max"]) == pytest.approx((0.05 / 3, -0.1, 0.1))
    assert groups[1]["seeds"] == [0, 1] and groups[1]["head_starts"] == pytest.approx([-0.1, -0.2])
    # The worst case stays the single worst run; the spread is added to the summary and to report.md.
    data = report.to_dict()
    assert data["summary"]["worst_attack"] == "linear_probe-adam-lr0.01"
    assert [g["attack"] for g in data["summary"]["across_seeds"]] == ["full-adam-lr0.01", "lora-adam-lr0.01-r4"]
    markdown = report.to_markdown()
    assert "## Across attack seeds" in markdown
    assert "| `full-adam-lr0.01` | 0, 1, 2 | 0.1, -0.1, 0.05 | 0.01667 | -0.1 | 0.1 |" in markdown
    assert "Across attack seeds" not in _report().to_markdown()  # every attack ran once

    # Grouped by settings, not by name: negative seeds, and LoRA targets whose names contain "seed".
    def lora(seed, targets, protected_final):
        record = run(f"lora-adam-lr0.01{f'-seed{seed}' if seed else ''}-targets-{targets}", seed, protected_final)
        record["spec"]["lora_target_modules"] = [targets]
        return record

    attacks = [lora(-1, "seed1", 0.8), lora(0, "seed1", 0.6), lora(1, "seed2", 0.7), lora(2, "seed2", 0.7)]
    groups = ResistanceReport("image-classification", "accuracy", True, attacks).across_seeds()
    assert [(g["attack"], g["seeds"]) for g in groups] == [
        ("lora-adam-lr0.01-targets-seed1", [-1, 0]),
        ("lora-adam-lr0.01-targets-seed2", [1, 2]),
    ]
