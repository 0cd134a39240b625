"""`sophon-hf push`: publish a protected model folder (weights, card, report, plots) to the Hub.

    sophon-hf push --model out --repo-id my-name/vit-sophon-protected [--private] [--revision REV] [--token T]

The card (`README.md`) is written when the folder has none or a README that is no SOPHON card, and rewritten when it no
longer matches the folder's `report.json` (e.g. the attacks ran after training saved the card) or names another repo
or branch; the publisher's own fields (domains, hyper-parameters) are kept from `sophon_card.json`. A card edited by
hand is kept when only the repo changes, and saved aside (`README.md.edited`, `.1`, ...) when it must be rewritten.
"""

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "push",
        help="publish a protected model folder with its card and report to the Hub",
        description="Upload safetensors weights, configs, the model card, report.json, report.md and plots to a Hub "
        "model repository in one commit. Pickle files are never uploaded.",
    )
    parser.add_argument(
        "--model", required=True, help="model folder written by `save_pretrained` / `sophon-hf protect`"
    )
    parser.add_argument("--repo-id", required=True, help="target repository, 'name' or 'namespace/name'")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="branch to commit to (created if missing)")
    parser.add_argument(
        "--token", default=None, help="Hub token with write access (default: HF_TOKEN or `hf auth login`)"
    )
    parser.add_argument("--commit-message", default=None, help="commit message")
    parser.add_argument("--original-domain", default=None, help="what the model is for (model card)")
    parser.add_argument("--restricted-domain", default=None, help="what the model is protected against (model card)")
    parser.add_argument("--base-model", default=None, help="Hub id of the unprotected model (model card)")
    parser.add_argument(
        "--dataset", action="append", default=None, help="Hub dataset id used (model card; repeatable)"
    )
    parser.add_argument("--license", default=None, help="license identifier for the card, e.g. apache-2.0")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import logging
    from pathlib import Path

    from huggingface_hub import ModelCard

    from ..hub import HubPublishError, check_publishable, check_repo_id, push_folder, require_token, resolve_repo_id
    from ..model_card import (
        CARD_HASH_KEY,
        CARD_METADATA_FILE,
        card_digest,
        card_report_mismatches,
        free_copy_path,
        write_model_card,
    )

    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # what is skipped or deleted; success is printed
    folder = Path(args.model)
    try:
        check_repo_id(args.repo_id)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    # Checked before the card is (re)written, so that a push that cannot happen leaves the folder as it was.
    if not folder.is_dir():
        raise SystemExit(f"error: {folder} is not a folder; pass the folder written by `save_pretrained`.")
    try:
        # Everything that could refuse the push is checked before the card is (re)written: the folder first (a token
        # would not make it publishable), then the token.
        check_publishable(folder, args.repo_id)
    except ValueError as error:
        raise SystemExit(f"error: {error} Nothing in {folder} was changed.") from error
    try:
        require_token(args.token, f"Nothing in {folder} was changed.")
    except HubPublishError as error:
        raise SystemExit(f"error: {error}") from None
    repo_id = resolve_repo_id(args.repo_id, args.token)  # "name" -> "user/name", what the card must say
    if args.revision == "main":  # the default branch: the card's usage lines need no revision
        args.revision = None
    card_path, sidecar = folder / "README.md", folder / CARD_METADATA_FILE
    report_path = folder / "report.json"
    overrides = {
        "original_domain": args.original_domain,
        "restricted_domain": args.restricted_domain,
        "base_model": args.base_model,
        "datasets": args.dataset,
        "license": args.license,
    }
    stored = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else {}
    has_card = card_path.is_file()
    stale = has_card and card_report_mismatches(
        ModelCard.load(card_path),
        json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else None,
    )
    # A README that is no SOPHON card (no sidecar, no `sophon` tag) carries no claim and no measurement: replaced, the
    # old one saved aside. A SOPHON card the publisher edited after sophon_hf wrote it (or one without a recorded
    # digest: older versions, `generate_model_card(...).save()`) is theirs: kept when only the repo or branch
    # changes, saved aside when its numbers or details must be rewritten.
    foreign = has_card and not stored and "sophon" not in (ModelCard.load(card_path).data.tags or [])
    edited = has_card and not foreign and stored.get(CARD_HASH_KEY) != card_digest(card_path)
    # A card written before the push names a local folder (or another repo or branch); the published one names its own.
    target = repo_id + (f" (branch {args.revision})" if args.revision else "")
    written_for = (stored.get("repo_id") or "a local folder") + (
        f" (branch {stored['revision']})" if stored.get("revision") else ""
    )
    elsewhere = written_for != target
    rewrite = not has_card or foreign or stale or (elsewhere and not edited)
    rewrite = rewrite or any(value is not None for value in overrides.values())
    if elsewhere and edited and not rewrite:
        print(f"Keeping {card_path}: it was edited after sophon_hf wrote it (its usage lines may name {written_for}).")
    saved_copy = free_copy_path(card_path)
    before = {path: path.read_bytes() if path.is_file() else None for path in (card_path, sidecar, saved_copy)}
    try:
        if rewrite:
            reason = (
                "missing"
                if not has_card
                else "not a SOPHON card"
                if foreign
                else "out of date"
                if stale
                else f"about {written_for}"
                if elsewhere and not edited
                else "given new details"
            )
            print(f"Model card {reason}: writing {card_path}")
            if foreign or edited:
                saved_copy.write_bytes(card_path.read_bytes())
                print(f"The previous card is saved as {saved_copy} (not uploaded).")
            # A name that was only the folder's (or the previous repo's) becomes this repo's; a chosen name stays.
            previous_repo = (stored.get("repo_id") or "").split("/")[-1]
            automatic = stored.get("model_name") in (None, folder.resolve().name, previous_repo)
            model_name = repo_id.split("/")[-1] if automatic else None
            write_model_card(folder, repo_id=repo_id, revision=args.revision, model_name=model_name, **overrides)
        url = push_folder(
            folder,
            repo_id,
            private=args.private,
            revision=args.revision,
            token=args.token,
            commit_message=args.commit_message,
        )
    except BaseException as error:
        # A push that did not happen (refused, failed, interrupted) leaves the folder as it was: the card comes back.
        for path, content in before.items():
            if content is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(content)
        if rewrite:
            print(f"The push did not happen: {card_path} was put back as it was.")
        if isinstance(error, ValueError | FileNotFoundError | HubPublishError):
            raise SystemExit(f"error: {error}") from error
        raise
    print(f"Published {folder} to {url}")
    return 0
