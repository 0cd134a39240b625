"""`sophon-hf verify`: re-run a published model's attacks and check that its claim still holds.

Usage:
    sophon-hf verify --model my-name/vit-sophon-protected --restricted-test restricted_dir [--restricted-train DIR] \\
        [--reference-model original_dir] [--tolerance T] [--output verify_dir]

The model (a Hub id or a local folder) must publish a `report.json` (written by `sophon-hf attack` and uploaded by
`sophon-hf push`). Verification checks, in order:
1. the report was measured on exactly these weights (its fingerprint) and the card publishes the report's numbers;
2. every attack of the report, re-run with the same specs on your data, ends within `--tolerance` of the published
   final metric for the protected start (and for scratch, and for the unprotected start when you pass
   `--reference-model`);
3. where the report claims "no head start over scratch", the re-run shows none beyond `--tolerance` either.
The exit code is 0 when everything holds and 1 otherwise. Attacks are seeded, so the same data on the same kind of
machine reproduces the numbers closely; other data or hardware needs a looser tolerance.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    from .attack import add_hub_dataset_options

    parser = subparsers.add_parser(
        "verify",
        help="re-run a published model's attacks and check its resistance claim",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="the published model: a Hub id or a local folder")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit of --model")
    parser.add_argument("--token", default=None, help="Hub token, for private models")
    parser.add_argument(
        "--restricted-test",
        default=None,
        help="held-out restricted data (save_to_disk folder or Hub; default: --test-split of --restricted-train)",
    )
    parser.add_argument(
        "--restricted-train",
        default=None,
        help="attacker's training data (default: --train-split of --restricted-test); give at least one of the two, "
        "as with `sophon-hf attack`",
    )
    parser.add_argument("--train-split", default="train", help="split of --restricted-train (default: train)")
    parser.add_argument("--test-split", default="test", help="split of --restricted-test (default: test)")
    add_hub_dataset_options(parser)
    parser.add_argument("--label-column", default=None, help="column holding the labels (renamed to 'labels')")
    parser.add_argument(
        "--input-column", default=None, help="column holding the inputs (image tensors, raw images or text)"
    )
    parser.add_argument(
        "--reference-model", default=None, help="the unprotected original, to re-check its numbers too"
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="largest accepted difference in the metric (default: 0.05 for accuracy; for other metrics, such as a "
        "denoising error, 5%% of the published values' median)",
    )
    parser.add_argument("--attack", action="append", default=None, help="verify only this attack (repeatable)")
    parser.add_argument("--output", default=None, help="keep the re-run's report (and resumable runs) here")
    parser.add_argument(
        "--head-name", default=None, help="module name of the output layer, if not found automatically"
    )
    parser.add_argument("--device", default=None, help="e.g. cpu or cuda:0 (default: automatic)")
    parser.set_defaults(func=run)


def compare_reports(published: dict[str, Any], reproduced: dict[str, Any], tolerance: float) -> list[dict[str, Any]]:
    """Per attack: does the re-run reproduce the published numbers and the published verdict?

    Args:
        published (`dict`): the model's `report.json`.
        reproduced (`dict`): the re-run's report (`ResistanceReport.to_dict()`), same attacks.
        tolerance (`float`): largest accepted difference of a final metric, and of a head start over scratch.

    Returns:
        `list[dict]`: one entry per published attack with `name`, `checks` (start -> (published, reproduced,
        holds)), `head_start` (published, reproduced), `holds` and a `reason` when it does not.

    Example:
    ```python
    >>> rows = compare_reports(report, rerun.to_dict(), tolerance=0.05)
    >>> all(row["holds"] for row in rows)
    True
    ```
    """
    from ..model_card import attack_advantage, final_metrics

    higher_is_better = bool(published.get("higher_is_better", True))
    published_tolerance = float(published.get("tolerance") or 0.0)
    reran = {attack["name"]: attack for attack in reproduced.get("attacks", [])}
    rows = []
    for attack in published.get("attacks", []):
        name = attack["name"]
        if name not in reran:
            # An attack the re-run did not reproduce is a claim left unchecked, never a pass.
            rows.append(
                {
                    "name": name,
                    "checks": {},
                    "head_start": (attack_advantage(attack, higher_is_better), None),
                    "holds": False,
                    "reason": "not re-run (the re-run has no attack of this name)",
                }
            )
            continue
        before, after = final_metrics(attack), final_metrics(reran[name])
        checks, reasons = {}, []
        for start in ("protected", "unprotected", "scratch"):
            if before[start] is None or after[start] is None:
                continue
            holds = abs(after[start] - before[start]) <= tolerance
            checks[start] = (before[start], after[start], holds)
            if not holds:
                reasons.append(f"{start} ended at {after[start]:.4g}, published {before[start]:.4g}")
        head_before = attack_advantage(attack, higher_is_better)
        head_after = attack_advantage(reran[name], higher_is_better)
        if head_before is not None and head_after is not None and head_before <= published_tolerance:
            # The published claim is "no head start": the re-run must not show one beyond the tolerance.
            if head_after > published_tolerance + tolerance:
                reasons.append(f"published no head start over scratch, re-run shows {head_after:+.4g}")
        if "protected" not in checks:
            reasons.append("the protected run has no final metric to compare (diverged or missing)")
        rows.append(
            {
                "name": name,
                "checks": checks,
                "head_start": (head_before, head_after),
                "holds": not reasons,
                "reason": "; ".join(reasons),
            }
        )
    return rows


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from huggingface_hub import ModelCard

    from ..attacks import (
        AUDIT_SKIPPED,
        DEFAULT_SCRATCH_RECIPE,
        SCRATCH_RECIPE_KEYS,
        AttackSpec,
        evaluate_finetuning_resistance,
    )
    from ..model_card import card_report_mismatches, detect_model_folder
    from ..report import report_inconsistencies
    from ..utils import model_fingerprint, read_json_object
    from .attack import (
        check_device,
        check_labels,
        load_model,
        load_noise_scheduler,
        load_restricted,
        model_folder,
        model_inputs,
    )

    if args.restricted_test is None and args.restricted_train is None:
        raise SystemExit("sophon-hf verify needs the restricted data: --restricted-test and/or --restricted-train.")
    if args.tolerance is not None and args.tolerance < 0:
        raise SystemExit(f"--tolerance must be non-negative, got {args.tolerance}.")
    folder = Path(model_folder(args.model, args.revision, args.token))
    report_path = folder / "report.json"
    if not report_path.is_file():
        raise SystemExit(
            f"{args.model} publishes no report.json, so it makes no measured claim to verify. Measure it yourself with "
            f"`sophon-hf attack --model {args.model} ...`; publishers add the report with `sophon-hf attack --output "
            "<model folder>` and `sophon-hf push`."
        )
    unverifiable = "it makes no claim that can be verified."
    try:
        published = read_json_object(str(report_path), "sophon_hf report", unverifiable)
    except ValueError as error:
        raise SystemExit(f"sophon-hf verify: {error}") from None
    records = published.get("attacks")
    malformed = [
        index for index, a in enumerate(records or []) if not isinstance(a, dict) or not {"name", "spec"} <= set(a)
    ]
    if not isinstance(records, list) or malformed:
        raise SystemExit(
            f"sophon-hf verify: {report_path} is not a valid sophon_hf report ("
            + (f"attack record(s) {malformed} lack a name or a spec" if malformed else "no list of attacks")
            + f"): {unverifiable}"
        )
    failures: list[str] = []

    # 1. The claim belongs to these weights, and the card says what the report says.
    model = load_model(str(folder))
    recorded = (published.get("fingerprints") or {}).get("protected")
    if recorded != model_fingerprint(model):
        failures.append(
            "report.json was not measured on these weights (fingerprint "
            + (f"{recorded[:12]}... recorded, {model_fingerprint(model)[:12]}... found)" if recorded else "missing)")
        )
    failures += [f"report.json: {problem}" for problem in report_inconsistencies(published)]
    if (folder / "README.md").is_file():
        failures += [
            f"card: {problem}" for problem in card_report_mismatches(ModelCard.load(folder / "README.md"), published)
        ]

    # 2. Re-run the published attacks with the same specs.
    attacks = [a for a in published.get("attacks", []) if args.attack is None or a["name"] in args.attack]
    unknown = sorted(set(args.attack or []) - {a["name"] for a in attacks})
    if unknown:
        raise SystemExit(
            f"{args.model}'s report has no attack(s) {unknown}; it has {[a['name'] for a in published['attacks']]}."
        )
    if not attacks:
        raise SystemExit(f"{args.model}'s report.json lists no attacks: there is nothing to re-run.")
    try:
        specs = {attack["name"]: AttackSpec.from_dict(attack["spec"]) for attack in attacks}
    except (TypeError, ValueError) as error:
        raise SystemExit(
            f"sophon-hf verify: report.json holds an attack this version cannot re-run: {error}"
        ) from None
    # The re-run names each attack from its spec: a published name its spec does not give was edited (or written by
    # another version), and its numbers cannot be matched with the re-run's. Not re-run; a failure.
    renamed = [attack["name"] for attack in attacks if specs[attack["name"]].name != attack["name"]]
    failures += [
        f"report.json names an attack {name!r} whose spec describes {specs[name].name!r}: the report was edited or "
        "written by another version, so its numbers cannot be matched with a re-run"
        for name in renamed
    ]
    attacks = [attack for attack in attacks if attack["name"] not in renamed]
    if not attacks:
        return _conclude(failures, [], published, args.tolerance)
    check_device(args.device)
    hub = {"config": args.dataset_config, "revision": args.dataset_revision}
    test = load_restricted(
        args.restricted_test or args.restricted_train,
        args.test_split,
        args.label_column,
        args.input_column,
        need_split="--restricted-test" if args.restricted_test is None else None,
        **hub,
    )
    train = load_restricted(
        args.restricted_train or args.restricted_test,
        args.train_split,
        args.label_column,
        args.input_column,
        need_split="--restricted-train" if args.restricted_train is None else None,
        **hub,
    )
    if args.reference_model and not any("unprotected" in a.get("curves", a.get("final", {})) for a in attacks):
        print(
            f"The report has no unprotected numbers to check: --reference-model {args.reference_model} is not re-run."
        )
        args.reference_model = None
    reference = load_model(model_folder(args.reference_model, token=args.token)) if args.reference_model else None
    recorded_reference = (published.get("fingerprints") or {}).get("reference")
    if reference is not None and recorded_reference and model_fingerprint(reference) != recorded_reference:
        failures.append(
            f"--reference-model {args.reference_model} is not the unprotected model the report was measured against "
            f"(fingerprint {recorded_reference[:12]}... recorded, {model_fingerprint(reference)[:12]}... found): its "
            "'unprotected' numbers are not comparable"
        )
    check_labels(test, args.restricted_test, model)
    check_labels(train, args.restricted_train or args.restricted_test, model)
    train, test = (model_inputs(d, model, str(folder), args.input_column) for d in (train, test))
    include_scratch = any("scratch" in a.get("curves", a.get("final", {})) for a in attacks)
    published_recipe = published.get("scratch_recipe") or {}
    recipe = {k: v for k, v in published_recipe.items() if k in SCRATCH_RECIPE_KEYS and k != "learning_rate"}
    if isinstance(published_recipe.get("learning_rate"), int | float):
        recipe["learning_rate"] = published_recipe["learning_rate"]
    elif not published_recipe.get("learning_rates"):  # written before scratch was tuned: its one fixed rate
        recipe["learning_rate"] = DEFAULT_SCRATCH_RECIPE["learning_rate"]
    noise_scheduler = (
        load_noise_scheduler(str(folder)) if detect_model_folder(folder)["library_name"] == "diffusers" else None
    )
    print(f"Re-running {len(attacks)} attack(s) of {args.model} ...")
    try:
        rerun = evaluate_finetuning_resistance(
            model,
            train,
            test,
            attacks=[specs[a["name"]] for a in attacks],
            reference_model=reference,
            include_scratch=include_scratch,
            scratch_recipe=recipe or None,
            # Reports written before scratch was averaged over initialisations used one.
            scratch_inits=published_recipe.get("initialisations", 1),
            # A report of a fixed rate (before scratch was tuned by default) re-runs that rate, a tuned one its grid.
            scratch_learning_rates=published_recipe.get("learning_rates") if "learning_rate" not in recipe else None,
            head_name=args.head_name,
            noise_scheduler=noise_scheduler,
            output_dir=args.output,
            device=args.device,
        )
    except ValueError as error:
        raise SystemExit(f"sophon-hf verify: {error}") from None
    if args.tolerance is None:
        from ..model_card import default_tolerance

        args.tolerance = default_tolerance(published)
    rows = compare_reports({**published, "attacks": attacks}, rerun.to_dict(), args.tolerance)
    # A warning of the harness (e.g. weights scaled far beyond initialisation) qualifies every number: the published
    # report must carry the ones the re-run raises.
    published_kinds = {warning.split("]")[0] for warning in published.get("warnings", [])}
    failures += [
        f"the harness warns, and the published report does not: {warning}"
        for warning in rerun.warnings
        # Compared by kind (the wording holds rounded numbers); a skipped audit is no claim about the model.
        if not warning.startswith(AUDIT_SKIPPED) and warning.split("]")[0] not in published_kinds
    ]

    # 3. Say, per attack, whether the claim holds.
    note = None
    if reference is None and any("unprotected" in a.get("curves", {}) for a in attacks):
        note = "(unprotected numbers not re-checked: pass --reference-model to re-run them too)"
    return _conclude(failures, rows, published, args.tolerance, note)


def _conclude(
    failures: list[str],
    rows: list[dict[str, Any]],
    published: dict[str, Any],
    tolerance: float,
    note: str | None = None,
) -> int:
    """Print, per compared attack, whether its claim holds, then the verdict over every failure; the exit status."""
    if rows:
        print(f"\n{published.get('metric', 'metric')}: published -> re-run (tolerance {tolerance:g})")
    for row in rows:
        numbers = ", ".join(
            f"{start} {before:.4g} -> {after:.4g}" for start, (before, after, _) in row["checks"].items()
        )
        status = "HOLDS" if row["holds"] else "DOES NOT HOLD"
        reason = f" ({row['reason']})" if row["reason"] else ""
        print(f"  {status:13s} {row['name']}:" + (f" {numbers}" if numbers else "") + reason)
        if not row["holds"]:
            failures.append(f"{row['name']}: {row['reason']}")
    if note:
        print(f"  {note}")
    if failures:
        print(f"\nThe published claim does NOT hold ({len(failures)} problem(s)):")
        for failure in failures:
            print(f"  - {failure}")
        return 1
    print(f"\nThe published claim holds: {len(rows)} attack(s) reproduced within {tolerance:g}.")
    for warning in published.get("warnings", []):
        print(f"  with the report's own warning: {warning}")
    return 0
