"""Publishing protected models on the Hugging Face Hub, and fetching them back for verification.

Everything goes through one `huggingface_hub.HfApi` code path (`push_folder`), for Transformers and Diffusers
folders alike, and only safe files travel: safetensors weights, JSON configs, the card, the report and its plots.
Pickle files (`.bin`, `.pt`, `.pth`, `.pkl`, `.ckpt`, ...) are never uploaded: loading one runs arbitrary code.

Why one atomic `create_commit` rather than `upload_folder` or `upload_large_folder`: a model folder is a handful of
files whose meaning depends on each other (the card and the report describe exactly these weights). One commit
means the repository never shows new weights with an old card, or a report without its weights: when an upload
fails half way, the remote branch stays at its previous commit. A rerun continues rather than restarts, because
the Hub stores file contents by hash and `create_commit` skips uploading any large file whose content it already
holds. `upload_folder` may split large folders into several commits, and `upload_large_folder` always does (and
takes no commit message); both trade this atomicity for folders of hundreds of files, which a model is not.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from pathlib import Path
from typing import Any, NoReturn

import torch.nn as nn
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id

from .utils import ATTACKER_STATE_NAME, FLOOR_STATE_NAME, model_fingerprint

logger = logging.getLogger(__name__)

# What a protected model folder may publish. Everything else stays local (and is named in the log).
ALLOWED_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",  # configs (model, scheduler, preprocessor, tokenizer, generation) and report.json
    "*.md",  # README.md (the card) and report.md
    "*.png",  # attack curves and sample grids
    "*.txt",  # tokenizer vocabularies and merges
    "*.model",  # sentencepiece tokenizers (protobuf, not pickle)
)
# Pickle-based formats: refused outright, they execute code when loaded.
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.joblib", "*.npy", "*.npz")
# Training state a checkpoint folder holds next to its weights, never part of a published model: a simulated
# attacker's state is restricted-domain fine-tuning (weight offsets and its own head), the accuracy floor's file holds
# other (earlier) weights.
TRAINING_STATE_FILES = (ATTACKER_STATE_NAME.format("*"), FLOOR_STATE_NAME, "trainer_state.json")
# Files of earlier pushes that would contradict this one if left on the branch: stale weights (pickled ones
# included, which `from_pretrained` may still pick up), and an old report that describes other weights.
STALE_REMOTE_PATTERNS = (
    *PICKLE_PATTERNS,
    "*.safetensors",
    "*.safetensors.index.json",
    "report.json",
    "report.md",
    "attack_curves.png",
)
WEIGHT_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors")
# Files that present report.json's measurement; published only with it.
REPORT_COMPANIONS = ("report.md", "attack_curves.png")
LOGIN_FIX = "run `hf auth login` (or `huggingface-cli login`), set the HF_TOKEN environment variable, or pass a token"


class HubPublishError(RuntimeError):
    """Publishing to the Hub failed; the message names the fix. Local files are never modified by a push."""


def _is_pickle(path: str) -> bool:
    return any(fnmatch.fnmatch(Path(path).name, pattern) for pattern in PICKLE_PATTERNS)


def select_files(folder: str | Path) -> tuple[list[str], list[str]]:
    """Split a model folder into the files a push uploads and the files it leaves behind.

    Args:
        folder (`str` or `Path`):
            A model folder written by `save_pretrained` / `trainer.save_model` (optionally with a report).

    Returns:
        `tuple[list[str], list[str]]`: the top-level files to upload, and the files skipped: pickles, training
        state, files in sub-folders (a model folder is flat; another model saved inside it is not this one), a
        `report.md` or `attack_curves.png` without the `report.json` they present, and anything not in
        `ALLOWED_PATTERNS` (checkpoints and logs are in sub-folders).

    Example:
    ```python
    >>> upload, skipped = select_files("out")
    >>> upload
    ['README.md', 'attack_curves.png', 'config.json', 'model.safetensors', 'report.json', 'report.md', 'sophon_card.json']
    >>> skipped
    ['checkpoint-500/optimizer.pt', 'training_args.bin']
    ```
    """
    folder = Path(folder)
    upload, skipped = [], []
    has_report = (folder / "report.json").is_file()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        parts = relative.split("/")
        allowed = any(fnmatch.fnmatch(parts[-1], pattern) for pattern in ALLOWED_PATTERNS)
        allowed = allowed and not any(fnmatch.fnmatch(parts[-1], pattern) for pattern in TRAINING_STATE_FILES)
        # A model folder is flat: a sub-folder holds something else (e.g. the unprotected reference saved inside the
        # output folder, or the attacker's data), which must not be published under this model's name.
        nested = len(parts) > 1
        # report.md and the curves present report.json's measurement: without it they describe other weights.
        orphan = not has_report and relative in REPORT_COMPANIONS
        if nested or orphan or parts[-1].startswith(".") or not allowed or _is_pickle(relative):
            skipped.append(relative)
        else:
            upload.append(relative)
    return upload, skipped


def load_pretrained_model(folder: str | Path) -> nn.Module:
    """Load the Transformers or Diffusers model saved in `folder`, as a user would with `from_pretrained`.

    The class comes from `config.json` (`architectures` for Transformers, `_class_name` for Diffusers); no remote
    code is ever run.

    Args:
        folder (`str` or `Path`):
            A folder written by `save_pretrained`, holding `config.json` and safetensors weights.

    Returns:
        `torch.nn.Module`: the model, in eval mode.

    Example:
    ```python
    >>> model = load_pretrained_model("out")
    >>> type(model).__name__
    'ViTForImageClassification'
    ```
    """
    from .model_card import detect_model_folder

    folder = Path(folder)
    kind = detect_model_folder(folder)
    if kind["library_name"] == "diffusers":
        import diffusers

        module = diffusers
    else:
        import transformers

        module = transformers
    model_class = getattr(module, kind["model_class"], None)
    if model_class is None:
        raise ValueError(
            f"{folder}/config.json names the class {kind['model_class']!r}, which {module.__name__} "
            f"{getattr(module, '__version__', '')} does not provide. Upgrade {module.__name__} or re-save the model."
        )
    # use_safetensors: a folder holding only pickle weights fails here instead of being unpickled.
    return model_class.from_pretrained(folder, use_safetensors=True).eval()


def check_report_matches(folder: str | Path, model: nn.Module | None = None) -> str | None:
    """Refuse a folder whose `report.json` was measured on other weights than the ones in the folder.

    Args:
        folder (`str` or `Path`):
            The model folder.
        model (`torch.nn.Module`, *optional*):
            The model the folder holds, if already loaded; loaded with [`load_pretrained_model`] otherwise.

    Returns:
        `str` or `None`: the fingerprint of the weights, or `None` when the folder has no `report.json`.

    Raises:
        `ValueError`: the report has no fingerprint, or it names other weights.

    Example:
    ```python
    >>> check_report_matches("out")  # the report in out/ was measured on out/'s weights
    '3f9a...'
    ```
    """
    folder = Path(folder)
    report_path = folder / "report.json"
    if not report_path.is_file():
        return None
    report = json.loads(report_path.read_text(encoding="utf-8"))
    recorded = (report.get("fingerprints") or {}).get("protected")
    if not recorded:
        raise ValueError(
            f"{report_path} records no fingerprint of the weights it measured (`fingerprints.protected`), so nobody "
            "can tell which model it describes. Re-measure with `sophon-hf attack --model "
            f"{folder} --output {folder} ...` (or `report.save(...)` from `evaluate_finetuning_resistance`)."
        )
    fingerprint = model_fingerprint(model if model is not None else load_pretrained_model(folder))
    if fingerprint != recorded:
        raise ValueError(
            f"{report_path} was measured on other weights (fingerprint {recorded[:12]}...) than the ones in {folder} "
            f"({fingerprint[:12]}...): publishing it would attach someone else's numbers to this model. Re-run the "
            f"attacks on these weights (`sophon-hf attack --model {folder} ...`) or remove the stale report "
            "(report.json, report.md, attack_curves.png)."
        )
    return fingerprint


def check_card_matches(folder: str | Path) -> None:
    """Refuse a folder whose card (`README.md`) is missing or publishes other numbers than its `report.json`.

    Args:
        folder (`str` or `Path`):
            The model folder.

    Raises:
        `ValueError`: no card, or a card that disagrees with the report (e.g. written before the attacks ran).

    Example:
    ```python
    >>> write_model_card("out")
    PosixPath('out/README.md')
    >>> check_card_matches("out")  # passes silently
    ```
    """
    from huggingface_hub import ModelCard

    from .model_card import card_report_mismatches

    folder = Path(folder)
    fix = f"Regenerate it with `write_model_card({str(folder)!r})` or `sophon-hf push --model {folder} ...`."
    if not (folder / "README.md").is_file():
        raise ValueError(f"{folder} has no model card (README.md). {fix}")
    report_path = folder / "report.json"
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else None
    problems = card_report_mismatches(ModelCard.load(folder / "README.md"), report)
    if problems:
        raise ValueError(f"The model card in {folder} does not match its report.json: {'; '.join(problems)}. {fix}")


def check_publishable(folder: str | Path, repo_id: str) -> tuple[list[str], list[str]]:
    """The checks `push_folder` makes before anything is sent, the card's aside; they only read the folder.

    The repo id is valid; the folder holds a `config.json` and safetensors weights; a `report.json`, if present, was
    measured on exactly these weights. `sophon-hf push` runs them before it (re)writes the card, so that a push that
    cannot happen leaves the folder as it was.

    Returns:
        `tuple[list[str], list[str]]`: the files to upload and the files skipped (see [`select_files`]).

    Raises:
        `ValueError`: what is wrong and how to fix it.
    """
    folder = Path(folder)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"{repo_id!r} is not a valid Hub repo id: {error} Use 'name' or 'namespace/name' (letters, digits, "
            "'-', '_', '.'; at most 96 characters), e.g. 'my-name/vit-sophon-protected'."
        ) from error
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder. Pass the folder written by `trainer.save_model(...)`.")
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"{folder} has no config.json: push needs a Transformers or Diffusers model folder written by "
            "`save_pretrained` / `trainer.save_model(...)`."
        )
    upload, skipped = select_files(folder)
    has_weights = any(name in WEIGHT_FILES or name.endswith(".safetensors.index.json") for name in upload)
    if not has_weights:
        pickles = [name for name in skipped if _is_pickle(name) and "/" not in name]
        hint = (
            f" It holds pickle weights ({', '.join(pickles)}), which sophon_hf never uploads: re-save the model "
            "with `save_pretrained(folder)` (safetensors is the default)."
            if pickles
            else " Save the model with `trainer.save_model(...)` or `save_pretrained(...)` first."
        )
        raise ValueError(f"{folder} holds no safetensors weights ({' or '.join(WEIGHT_FILES)}).{hint}")
    check_report_matches(folder)
    return upload, skipped


def _raise_for_hub_error(error: HfHubHTTPError, repo_id: str, folder: Path) -> NoReturn:
    status = getattr(getattr(error, "response", None), "status_code", None)
    untouched = f"Nothing in {folder} was changed."
    if status == 401 or (isinstance(error, RepositoryNotFoundError) and status in (None, 401, 404)):
        raise HubPublishError(
            f"The Hub rejected the token when publishing to {repo_id!r} (HTTP {status}): {LOGIN_FIX} with write "
            f"access. {untouched}"
        ) from error
    if status == 403:
        raise HubPublishError(
            f"Your token may not write to {repo_id!r} (HTTP 403). Use a token with write access to that namespace "
            f"(`hf auth login`, or HF_TOKEN), or push to a repo id under your own user name. {untouched}"
        ) from error
    raise HubPublishError(
        f"Uploading {folder} to {repo_id!r} failed (HTTP {status}): {error}. {untouched} The remote branch keeps its "
        "previous commit; run the same push again to continue (files the Hub already holds are not sent again)."
    ) from error


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Publish a protected model folder to the Hub in one commit: weights, configs, card, report and plots.

    Checks before anything is sent: the repo id is valid; the folder holds a `config.json` and safetensors weights
    (`model.safetensors` for Transformers, `diffusion_pytorch_model.safetensors` for Diffusers, or sharded
    safetensors with an index); a `report.json`, if present, was measured on exactly these weights (its fingerprint
    is recomputed); the card (`README.md`) publishes exactly the report's numbers; a token is available. Pickle files are never uploaded; training leftovers (`checkpoint-*/`,
    `runs/`, `training_args.bin`) stay local. Weights and reports left on the branch by an earlier push are deleted
    in the same commit, so the branch never mixes two models. Local files are only read.

    `SophonTrainer.push_to_hub` calls this after writing the card with
    [`~sophon_hf.model_card.write_model_card`].

    Args:
        folder (`str` or `Path`):
            The model folder.
        repo_id (`str`):
            Target model repository, `"name"` or `"namespace/name"`; created if missing.
        private (`bool`, *optional*, defaults to `False`):
            Create the repository as private (an existing repository keeps its visibility).
        revision (`str`, *optional*):
            Branch to commit to (created from the default branch if missing); the default branch when unset.
        token (`str`, *optional*):
            Hub token with write access; defaults to `HF_TOKEN` or the token saved by `hf auth login`.
        commit_message (`str`, *optional*):
            Defaults to `"Upload SOPHON-protected model"`.

    Returns:
        `str`: the URL of the commit.

    Raises:
        `ValueError`: malformed repo id, not a model folder, pickle-only weights, or a report of other weights.
        [`HubPublishError`]: no token, no permission, or a failed upload (the message says what to do).

    Example:
    ```python
    >>> from sophon_hf.hub import push_folder
    >>> push_folder("out", "my-name/vit-sophon-protected", private=True)
    'https://huggingface.co/my-name/vit-sophon-protected/commit/...'
    ```
    """
    folder = Path(folder)
    upload, skipped = check_publishable(folder, repo_id)
    check_card_matches(folder)
    if skipped:
        logger.warning(
            "Not uploading %d file(s) from %s (pickles, sub-folders, training state, a report.md or plot without its "
            "report.json, or unknown types): %s",
            len(skipped),
            folder,
            ", ".join(skipped[:20]) + (" ..." if len(skipped) > 20 else ""),
        )

    token = token or get_token()
    if not token:
        raise HubPublishError(f"No Hugging Face token found: {LOGIN_FIX}. Nothing in {folder} was changed.")

    api = HfApi(token=token)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        repo_id = repo_url.repo_id  # "name" resolves to "user/name"
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        remote = api.list_repo_files(repo_id, revision=revision)
        stale = [
            name
            for name in remote
            if "/" not in name
            and name not in upload
            and any(fnmatch.fnmatch(name, pattern) for pattern in STALE_REMOTE_PATTERNS)
        ]
        if stale:
            logger.warning("Deleting files of an earlier push from %s: %s", repo_id, ", ".join(stale))
        operations: list[Any] = [CommitOperationDelete(path_in_repo=name) for name in stale]
        operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in upload]
        commit = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message or "Upload SOPHON-protected model",
            revision=revision,
        )
    except HfHubHTTPError as error:
        _raise_for_hub_error(error, repo_id, folder)
    except Exception as error:  # connection resets, timeouts, ... (httpx's transport errors are not OSErrors)
        raise HubPublishError(
            f"Uploading {folder} to {repo_id!r} failed: {error}. Nothing in {folder} was changed and the remote "
            "branch keeps its previous commit; run the same push again to continue (files the Hub already holds "
            "are not sent again)."
        ) from error
    logger.info("Published %s to %s (%d files).", folder, commit.commit_url, len(upload))
    return commit.commit_url


def download_model(repo_id: str, revision: str | None = None, token: str | None = None) -> Path:
    """Download a published model folder (safe files only: never pickles) and return its local path.

    Args:
        repo_id (`str`):
            Hub model id.
        revision (`str`, *optional*):
            Branch, tag or commit.
        token (`str`, *optional*):
            For private repositories.

    Returns:
        `Path`: the local snapshot folder.

    Example:
    ```python
    >>> folder = download_model("my-name/vit-sophon-protected")
    >>> sorted(p.name for p in folder.iterdir())
    ['README.md', 'attack_curves.png', 'config.json', 'model.safetensors', 'report.json', 'report.md', 'sophon_card.json']
    ```
    """
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            repo_id, revision=revision, token=token, allow_patterns=list(ALLOWED_PATTERNS), repo_type="model"
        )
    )
