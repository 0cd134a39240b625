"""Small helpers shared by the trainer, the attack harness, publishing and the recipe scripts."""

import argparse
import hashlib
import logging
import os
import sys

import torch
import torch.nn as nn

# Training state SophonTrainer saves in checkpoints next to the weights (never published, see `hub.select_files`).
ATTACKER_STATE_NAME = "simulated_attacker_rank{}.safetensors"  # a persistent simulated attacker, per rank
FLOOR_STATE_NAME = "original_floor_weights.safetensors"  # the last weights that met `original_accuracy_floor`


def model_fingerprint(model: nn.Module) -> str:
    """A sha256 over the model's parameters and buffers (names, dtypes, shapes and values).

    Reports record it so that a report can never be attached to (or published with) different weights.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def read_json_object(path: str, what: str, fix: str) -> dict:
    """A JSON file that must hold an object (a report, a run record), or a `ValueError` naming the file and `fix`."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a valid {what} ({error}): {fix}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a valid {what} (a JSON {type(data).__name__}, not an object): {fix}")
    return data


def resolve_recipe_path(path: str, recipes_dir: str) -> str:
    """A recipe path as given, or the name of a recipe shipped in `recipes_dir` (with or without `.yaml`)."""
    if os.path.isfile(path):
        return path
    for candidate in (path, f"{path}.yaml"):
        shipped = os.path.join(recipes_dir, candidate)
        if os.path.isfile(shipped):
            return shipped
    recipes = sorted(f for f in os.listdir(recipes_dir) if f.endswith(".yaml")) if os.path.isdir(recipes_dir) else []
    raise FileNotFoundError(f"No config file {path!r}, and no shipped recipe of that name (shipped: {recipes}).")


def parse_recipe_args(dataclass_types: tuple, argv: list[str] | None, recipes_dir: str) -> tuple:
    """Dataclass arguments of a recipe script from `--config YAML` (defaults) and the command line (overrides).

    `--config` takes a file or the name of a shipped recipe, as `--config X` or `--config=X`. Every key of the YAML
    file must be a field of one of `dataclass_types`: a misspelt key is an error, not a silently ignored setting.
    """
    import yaml
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
    # `--config` is taken out of argv before parsing, so it is not an argument of the parser: say so in `--help`.
    parser.description = (
        f"--config RECIPE: a YAML file, or the name of a recipe shipped in {recipes_dir}; its keys become the "
        "defaults of the arguments below, which override them on the command line."
    )
    for index, arg in enumerate(argv):
        if arg == "--config" or arg.startswith("--config="):
            value, width = (argv[index + 1], 2) if arg == "--config" else (arg.split("=", 1)[1], 1)
            path = resolve_recipe_path(value, recipes_dir)
            with open(path) as f:
                values = yaml.safe_load(f) or {}
            unknown = sorted(set(values) - {action.dest for action in parser._actions})
            if unknown:
                names = ", ".join(t.__name__ for t in dataclass_types)
                raise ValueError(
                    f"{path}: {unknown} are not arguments of this script; see `--help` for {names} fields."
                )
            # The classes' own annotations: HfArgumentParser rewrites the fields' types (a union becomes `str`).
            annotations = {
                name: str(annotation)
                for t in dataclass_types
                for cls in reversed(t.__mro__)
                for name, annotation in getattr(cls, "__annotations__", {}).items()
            }
            actions = {action.dest: action for action in parser._actions}
            for key, value in values.items():
                values[key] = _recipe_value(path, key, value, actions[key], annotations.get(key, ""))
            parser.set_defaults(**values)
            del argv[index : index + width]
            break
    return parser.parse_args_into_dataclasses(args=argv)


def _recipe_value(path: str, key: str, value, action, annotation: str):
    """A YAML value converted and checked as argparse would check it on the command line (it checks no defaults).

    Numbers must be numbers (a float is no `int`), a single value is no list, a quoted `"false"` is `False`; a value
    of the wrong kind is a `ValueError` naming the key, instead of a crash deep in training.
    """
    many = action.nargs in ("+", "*")
    convert = action.type
    expected = {int: "an integer", float: "a number"}.get(convert, "true or false")
    problem = None
    if value is None:
        return None
    if many and not isinstance(value, list):
        value = [value]  # `simulation_strategies: full` means the list of one, as `--simulation_strategies full` does
    if not many and isinstance(value, list) and "list" not in annotation:
        problem = "a single value, not a list"
    elif isinstance(value, dict) and "dict" not in annotation:
        problem = "a single value, not a mapping"
    elif convert in (int, float) or getattr(convert, "__name__", "") == "string_to_bool":
        converted = []
        for item in value if many else [value]:
            if isinstance(item, str):
                try:
                    converted.append(convert(item))
                    continue
                except (TypeError, ValueError, argparse.ArgumentTypeError):
                    pass
            else:
                number = isinstance(item, int | float) and not isinstance(item, bool)
                flag = isinstance(item, bool) or (isinstance(item, int) and item in (0, 1))  # `--bf16 0` parses too
                if {int: number and isinstance(item, int), float: number}.get(convert, flag):
                    converted.append({int: item, float: float(item)}.get(convert, bool(item)))
                    continue
            problem = expected + (" in every item" if many else "")
            break
        else:
            return converted if many else converted[0]
    if problem:
        raise ValueError(f"{path}: {key} must be {problem}, got {value!r}.")
    return value


def save_unprotected_reference(directory: str | None, training_args, *savables) -> None:
    """Save the model as it was before protection (with its processor or scheduler) into `directory`.

    The recipe scripts call this after pre-training: the reference that `sophon-hf attack --reference-model` compares
    against. Only the main process writes. A resumed run skips pre-training, so its model is not the reference and the
    one the interrupted run wrote is kept (a warning says when there is none).
    """
    if directory is None or training_args.process_index != 0:
        return
    if _resumes(training_args.resume_from_checkpoint):
        if not os.path.isfile(os.path.join(directory, "config.json")):
            logging.getLogger(__name__).warning(
                "Resuming: %s holds no unprotected reference, and none can be written now (the model was not "
                "pre-trained in this run).",
                directory,
            )
        return
    for savable in savables:
        if savable is not None:
            savable.save_pretrained(directory)


def check_output_folders(**folders: str | None) -> None:
    """Refuse output paths that name an existing file, before a recipe script does any work (`name=path`)."""
    for name, path in folders.items():
        if path and os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"{name}={path} is a file: choose a folder (it is created if it does not exist).")


def _resumes(value: str | bool | None) -> bool:
    """Whether a recipe's `resume_from_checkpoint` asks to resume (YAML gives booleans, the command line strings)."""
    return not (value is None or value is False or str(value).lower() in ("", "false", "none"))


def resolve_resume_checkpoint(value: str | bool | None, output_dir: str) -> str | None:
    """The checkpoint a recipe script resumes from: a folder (or a `checkpoint-N` name inside `output_dir`), or the
    last one in `output_dir` for `True`/"true"/"last"; `None` for no resume (`None`, `False`, "false", "none", "").

    Raises:
        `FileNotFoundError`: no such checkpoint folder; the message lists the checkpoints `output_dir` holds.
    """
    if not _resumes(value):
        return None
    from transformers.trainer_utils import get_last_checkpoint

    text = str(value)
    if text.lower() in ("true", "last"):
        path = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    elif not os.path.isdir(text) and os.path.isdir(os.path.join(output_dir, text)):
        path = os.path.join(output_dir, text)  # a checkpoint named as the message below lists them
    else:
        path = text
    if path is None or not os.path.isdir(path):
        found = sorted(
            (n for n in os.listdir(output_dir) if n.startswith("checkpoint-")) if os.path.isdir(output_dir) else [],
            key=lambda n: int(n.rpartition("-")[2]) if n.rpartition("-")[2].isdigit() else -1,
        )
        raise FileNotFoundError(
            f"resume_from_checkpoint={value!r}: no such checkpoint folder. {output_dir} holds "
            f"{found or 'no checkpoints'}; pass one of them, or 'last' for the latest."
        )
    return path


# What a recipe script prints for the attack's data when it cannot save it (a user's own Hub or local datasets).
TEST_DATA_PLACEHOLDERS = "--restricted-train ATTACKER_TRAIN --restricted-test RESTRICTED_TEST"


def split_off_attacker(restricted_train, count: int) -> tuple:
    """`(attacker, defender)`: the first `count` restricted training rows (at most a fifth of them), held out of
    protection for the attack a recipe script prints, and the rest, which the defender protects with."""
    count = max(1, min(count, len(restricted_train) // 5))
    return restricted_train.select(range(count)), restricted_train.select(range(count, len(restricted_train)))


def save_attack_data(trainer, attacker_train, restricted_test) -> str:
    """Save a recipe's built-in restricted data (the attacker's images, held out of protection by
    `split_off_attacker`, and the held-out split to score on) into `output_dir/attack_data/` for `sophon-hf attack`;
    returns the command-line flags naming them. Sub-folders of a model folder are never pushed (`hub.select_files`).
    """
    folder = os.path.join(trainer.args.output_dir, "attack_data")
    paths = {name: os.path.join(folder, name) for name in ("attacker_train", "restricted_test")}
    if trainer.is_world_process_zero():
        attacker_train.save_to_disk(paths["attacker_train"])
        restricted_test.save_to_disk(paths["restricted_test"])
    # The other processes wait: one that exits while the main one still writes tears down the process group under it
    # (gloo aborts the run at exit, seen with 2 CPU processes).
    trainer.accelerator.wait_for_everyone()
    return f"--restricted-train {paths['attacker_train']} --restricted-test {paths['restricted_test']}"


def print_saved(trainer, unprotected_dir: str | None, test_flags: str = TEST_DATA_PLACEHOLDERS) -> None:
    """End of a recipe script: where the models went and the command that measures the protection."""
    if not trainer.is_world_process_zero():
        return
    output = trainer.args.output_dir
    reference = f" --reference-model {unprotected_dir}" if unprotected_dir else ""
    print(
        f"\nSaved the protected model to {output}/ (with its model card, README.md)"
        + (f" and the unprotected reference to {unprotected_dir}/" if unprotected_dir else "")
        + f".\nMeasure it with real fine-tuning attacks (its card states the result afterwards):\n"
        f"  sophon-hf attack --model {output}{reference} {test_flags} --output {output}"
    )


def stop_if_diverged(trainer) -> None:
    """End a recipe script with an error after a run that diverged: its weights are saved, never pushed."""
    if trainer.diverged:
        raise SystemExit(
            f"Protection diverged: {trainer.stop_reason}. The weights it stopped at are saved in "
            f"{trainer.args.output_dir} and were not pushed; they are no finished protection. Fix that and run again."
        )


def pickle_weights_hint(folder: str) -> str:
    """Why `from_pretrained(folder, use_safetensors=True)` failed when `folder` holds only pickle weights, else ""."""
    names = ("pytorch_model.bin", "diffusion_pytorch_model.bin")
    pickles = [name for name in names if os.path.isfile(os.path.join(folder, name))]
    if not pickles:
        return ""
    return (
        f" It holds only pickle weights ({', '.join(pickles)}), which sophon_hf never loads (unpickling can run "
        "arbitrary code): re-save the model with `save_pretrained` (safetensors is the default)."
    )
