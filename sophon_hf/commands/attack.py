"""`sophon-hf attack`: run a suite of real fine-tuning attacks against a (protected) model and write the report.

Usage:
    sophon-hf attack --model protected_dir --reference-model original_dir \\
        --restricted-train restricted_train_dir --restricted-test restricted_test_dir --suite quick --output report_dir
    sophon-hf attack --list-suites

    # The runs split across processes (2 CPU processes here; on GPUs use accelerate_configs/multi_gpu.yaml and
    # --num_processes with the GPU count; `accelerate launch --cpu --num_processes 2` would start only one process).
    # The accelerate configs ship inside the package (trainers/accelerate_configs/ in a clone):
    D=$(python -c "import os, sophon_hf.trainers as t; print(os.path.dirname(t.__file__))")
    accelerate launch --config_file "$D/accelerate_configs/cpu_2proc.yaml" -m sophon_hf.cli attack \\
        --model protected_dir ... --output report_dir

Re-running with the same `--output` resumes: finished runs (kept in `<output>/runs/`) are not repeated. An output
folder holding results of a different model or different data is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "attack",
        help="fine-tune a model with a suite of attacks and compare with the unprotected original and scratch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", help="required: the protected model, a save_pretrained folder or a Hub id")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit of --model")
    parser.add_argument(
        "--reference-model", help="unprotected original (folder or Hub id), for the 'unprotected' curves"
    )
    parser.add_argument(
        "--restricted-train", help="required: the attacker's training data, a save_to_disk folder or a Hub dataset"
    )
    parser.add_argument(
        "--restricted-test", help="held-out restricted data (default: --test-split of --restricted-train)"
    )
    parser.add_argument("--train-split", default="train", help="split of --restricted-train (default: train)")
    parser.add_argument("--test-split", default="test", help="split of --restricted-test (default: test)")
    add_hub_dataset_options(parser)
    parser.add_argument("--label-column", default=None, help="column holding the labels (renamed to 'labels')")
    parser.add_argument(
        "--input-column",
        default=None,
        help="column holding the inputs: image tensors (renamed to 'pixel_values'), or raw images or text, which go "
        "through the processor saved with the model (default: pixel_values/input_ids, else image/img/text/sentence)",
    )
    parser.add_argument(
        "--suite",
        default="quick",
        help="attack suite: quick, standard or full (default: quick); a UNet takes the suite's full and lora attacks",
    )
    parser.add_argument("--attacks-file", help="YAML or JSON list of AttackSpec fields (replaces --suite)")
    parser.add_argument("--list-suites", action="store_true", help="print the suites and their attacks, then exit")
    parser.add_argument(
        "--output", help="required: folder for report.json, report.md, attack_curves.png and resumable runs"
    )
    parser.add_argument("--no-scratch", action="store_true", help="skip the from-scratch baseline")
    parser.add_argument(
        "--scratch-inits",
        type=int,
        default=3,
        help="train scratch from this many initialisations and compare with their mean curve (default: 3)",
    )
    parser.add_argument(
        "--scratch-learning-rates",
        type=float,
        nargs="+",
        default=None,
        help="train scratch (Adam) at each of these learning rates and compare each attack with the best one "
        "(default: 1e-4 1e-3 1e-2, the rates the suites give Adam attackers; one value fixes the rate)",
    )
    parser.add_argument("--seed", type=int, default=0, help="added to every attack's seed (default: 0)")
    parser.add_argument(
        "--attack-seeds",
        type=int,
        default=1,
        help="run every attack at this many consecutive seeds (batch order, fresh head, adapters); report.md, "
        "report.json and the model card then give each attack's head start per seed, mean and range (default: 1)",
    )
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every attack's step budget")
    parser.add_argument(
        "--head-name", default=None, help="module name of the output layer, if not found automatically"
    )
    parser.add_argument("--device", default=None, help="e.g. cpu or cuda:0 (default: automatic)")
    parser.set_defaults(func=run, usage_error=parser.error)


def model_folder(name_or_path: str, revision: str | None = None, token: str | None = None) -> str:
    """A local model folder: `name_or_path` itself, or the Hub snapshot of that id (safe files only, no pickles).

    For a Diffusers pipeline folder (`model_index.json`, as `DDPMPipeline.save_pretrained` writes), its `unet/`.
    """
    if os.path.isfile(name_or_path):
        raise SystemExit(
            f"{name_or_path} is a file: pass the model's folder ({os.path.dirname(name_or_path) or '.'}) or its Hub id."
        )
    if os.path.isdir(name_or_path):
        folder = name_or_path
    else:
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        from ..hub import download_model

        try:
            folder = str(download_model(name_or_path, revision, token))
        except (HfHubHTTPError, LocalEntryNotFoundError, ValueError) as error:  # ValueError: a malformed repo id
            raise SystemExit(
                f"Cannot load the model {name_or_path!r}: it is not a local folder, and downloading it from the Hub "
                f"failed ({error})."
            ) from None
    unet = os.path.join(folder, "unet")
    if os.path.isfile(os.path.join(folder, "model_index.json")) and os.path.isfile(os.path.join(unet, "config.json")):
        print(f"{name_or_path} is a Diffusers pipeline: measuring its UNet (unet/) with its noise scheduler.")
        return unet
    return folder


def load_model(folder: str):
    """The Transformers or Diffusers model saved in `folder` (see `model_folder`)."""
    from ..hub import load_pretrained_model
    from ..utils import pickle_weights_hint

    try:
        return load_pretrained_model(folder)
    except (OSError, ValueError) as error:
        raise SystemExit(f"Cannot load the model in {folder}: {error}{pickle_weights_hint(folder)}") from None


def load_noise_scheduler(folder: str):
    """The scheduler saved next to a Diffusers UNet (`scheduler_config.json`, or a pipeline's `scheduler/`), else a
    default `DDPMScheduler`."""
    import diffusers

    candidates = [
        os.path.join(folder, "scheduler_config.json"),
        os.path.join(folder, "scheduler", "scheduler_config.json"),
    ]
    if os.path.isfile(os.path.join(folder, os.pardir, "model_index.json")):  # the unet/ folder of a pipeline
        candidates.append(os.path.join(folder, os.pardir, "scheduler", "scheduler_config.json"))
    for config in candidates:
        if os.path.isfile(config):
            with open(config, encoding="utf-8") as f:
                class_name = json.load(f).get("_class_name", "DDPMScheduler")
            print(f"Noise scheduler: {class_name} from {os.path.normpath(os.path.dirname(config))}.")
            return getattr(diffusers, class_name).from_pretrained(os.path.dirname(config))
    print(
        "No scheduler_config.json next to the UNet: measuring with DDPMScheduler() and its defaults (1000 steps, "
        "linear betas). If the UNet was trained with another schedule, save it next to the UNet "
        "(`noise_scheduler.save_pretrained(folder)`) and run again with another --output."
    )
    return diffusers.DDPMScheduler()


def add_hub_dataset_options(parser: argparse.ArgumentParser) -> None:
    """`--dataset-config` and `--dataset-revision`: what some Hub datasets need (`load_dataset`'s name and revision)."""
    parser.add_argument(
        "--dataset-config",
        default=None,
        help="configuration name of Hub datasets that have several (load_dataset's name)",
    )
    parser.add_argument(
        "--dataset-revision", default=None, help="branch, tag or commit of Hub datasets (e.g. refs/convert/parquet)"
    )


def load_restricted(
    source: str,
    split: str,
    label_column: str | None,
    input_column: str | None,
    need_split: str | None = None,
    config: str | None = None,
    revision: str | None = None,
):
    """A `save_to_disk` folder (a Dataset, or a DatasetDict and its `split`) or a Hub dataset's `split`.

    `need_split` names the flag that would supply the other split: a folder holding a single split is then refused,
    because training and test rows would be the same.
    """
    import datasets

    if os.path.isdir(source):
        try:
            dataset = datasets.load_from_disk(source)
        except FileNotFoundError as error:
            raise SystemExit(f"{source} is not a folder written by `Dataset.save_to_disk`: {error}") from None
        except Exception as error:  # datasets fails with IndexError on a saved dataset of zero rows, for one
            raise SystemExit(
                f"Cannot read the dataset folder {source} ({type(error).__name__}: {error}). A dataset saved with "
                "no rows fails this way (datasets cannot reload it): save one with rows."
            ) from None
        if need_split and not isinstance(dataset, datasets.DatasetDict):
            raise SystemExit(
                f"{source} holds a single split, so the training and the test data cannot both come from it: pass "
                f"{need_split}."
            )
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise SystemExit(
                    f"{source} has splits {list(dataset)}, not {split!r}: choose one with the split option."
                )
            dataset = dataset[split]
    else:
        try:
            dataset = datasets.load_dataset(source, config, split=split, revision=revision)
        except Exception as error:  # datasets raises many types here (offline, missing, bad split)
            raise SystemExit(
                f"Cannot load the dataset {source!r}: it is not a local folder, and loading it from the Hub failed "
                f"({type(error).__name__}: {error})."
            ) from None
    for column in (label_column, input_column):
        if column is not None and column not in dataset.column_names:
            raise SystemExit(f"{source} has no column {column!r} (columns: {dataset.column_names}).")
    if label_column is None and "labels" not in dataset.column_names and "label" in dataset.column_names:
        label_column = "label"  # the usual Hub name (CIFAR-10, IMDB, ...)
    if label_column is not None and label_column != "labels":
        dataset = dataset.rename_column(label_column, "labels")
    if input_column is not None and input_column != "pixel_values" and not _is_raw(dataset, input_column):
        dataset = dataset.rename_column(input_column, "pixel_values")  # image tensors under another name
    return dataset


def _update_card(output: str, model_dir: str) -> None:
    """A measurement written into the model's own folder goes onto its SOPHON card, unless the publisher edited it."""
    import json

    from ..model_card import CARD_HASH_KEY, CARD_METADATA_FILE, card_digest, write_model_card

    sidecar, card = os.path.join(output, CARD_METADATA_FILE), os.path.join(output, "README.md")
    if not (os.path.isdir(model_dir) and os.path.samefile(output, model_dir) and os.path.isfile(sidecar)):
        return
    with open(sidecar, encoding="utf-8") as f:
        stored = json.load(f)
    if os.path.isfile(card) and stored.get(CARD_HASH_KEY) != card_digest(card):
        print(
            f"{card} was edited after sophon_hf wrote it, so it was left as it is and does not state this measurement "
            "yet: `sophon-hf push` rewrites it (keeping your version aside, as README.md.edited or .edited.N)."
        )
        return
    write_model_card(output)
    print(f"Model card: {card} now states this measurement.")


def check_labels(dataset, source: str, model) -> None:
    """A classifier's data needs labels: say which option names them, with the columns as given (before the inputs
    are converted and other columns dropped)."""
    from ..tasks import is_diffusers_model

    if not is_diffusers_model(model) and "labels" not in dataset.column_names:
        raise SystemExit(
            f"{source} has no label column (columns: {dataset.column_names}): pass --label-column NAME, e.g. "
            "--label-column fine_label."
        )


def _is_raw(dataset, column: str) -> bool:
    """Images (`datasets.Image`) or text: what needs the model's processor before it is a model input."""
    import datasets

    feature = dataset.features.get(column)
    return isinstance(feature, datasets.Image) or _is_text(feature)


def _is_text(feature) -> bool:
    import datasets

    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def model_inputs(dataset, model, folder: str, column: str | None = None):
    """Raw images or text as the model's inputs: through the processor saved next to a classifier (image processor or
    tokenizer), or resized to a UNet's sample size in [-1, 1]. Datasets of model inputs are returned as they are."""
    if "pixel_values" in dataset.column_names or "input_ids" in dataset.column_names:
        return dataset
    from ..data import default_text_length, to_model_inputs
    from ..tasks import is_diffusers_model

    try:
        if is_diffusers_model(model):
            from ..diffusion import images_to_pixel_values

            size = model.config.sample_size
            return images_to_pixel_values(
                dataset, size if isinstance(size, int) else tuple(size), model.config.in_channels, column
            )
        config = getattr(model, "config", None)
        processor, max_length = None, None
        if os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(folder)
        elif os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
            from transformers import AutoTokenizer

            processor = AutoTokenizer.from_pretrained(folder)
            # The length the model was trained with when the tokenizer records it (the recipe script saves it),
            # and never more positions than the model has.
            max_length = default_text_length(processor)
            max_length = min(max_length, getattr(config, "max_position_embeddings", None) or max_length)
        text = column is not None and _is_text(dataset.features.get(column))
        return to_model_inputs(
            dataset,
            processor,
            image_column=None if text else column,
            text_column=column if text else None,
            num_channels=getattr(config, "num_channels", None),
            max_length=max_length,
        )
    except ValueError as error:
        raise SystemExit(f"Cannot turn the data into inputs of the model in {folder}: {error}") from None


def _scratch_options(rates: list[float] | None) -> dict:
    """The harness's scratch options for --scratch-learning-rates: none (its default grid), one fixed rate, or a grid."""
    if not rates:
        return {}
    if len(rates) == 1:
        return {"scratch_recipe": {"learning_rate": rates[0]}}
    return {"scratch_learning_rates": rates}


def check_device(device: str | None) -> None:
    """Refuse a CUDA device on a machine without one, before any model is loaded."""
    import torch

    if device is None:
        return
    try:
        torch.device(device)
    except RuntimeError:
        raise SystemExit(f"--device {device!r} is not a torch device; use e.g. cpu, cuda or cuda:1.") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: this machine has no CUDA device (torch {torch.__version__}); use cpu.")


def load_attacks(path: str) -> list[dict]:
    """Attack specs from a YAML or JSON file: a list of dicts, or a dict with an `attacks` list."""
    import yaml

    if not os.path.isfile(path):
        raise SystemExit(f"--attacks-file {path} does not exist.")
    with open(path) as f:
        try:
            data = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
        except (json.JSONDecodeError, yaml.YAMLError) as error:
            kind = "JSON" if path.endswith(".json") else "YAML"
            raise SystemExit(f"--attacks-file {path} is not valid {kind}: {error}") from None
    if isinstance(data, dict):
        data = data.get("attacks")
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise SystemExit(
            f"{path} must hold a list of attack specs (dicts of AttackSpec fields) or {{'attacks': [...]}}."
        )
    return data


def run(args: argparse.Namespace) -> int:
    from ..suites import describe_suites

    if args.list_suites:
        try:
            print(describe_suites())
        except BrokenPipeError:  # `--list-suites | head`: the reader has what it wanted; silence the flush at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    missing = [flag for flag in ("model", "restricted_train", "output") if getattr(args, flag) is None]
    if missing:
        # argparse's own wording and exit status (2); the flags are optional for --list-suites only.
        args.usage_error(
            "the following arguments are required: " + ", ".join("--" + m.replace("_", "-") for m in missing)
        )

    import dataclasses

    from ..attacks import evaluate_finetuning_resistance, resolve_attacks
    from ..tasks import is_diffusers_model

    if args.attack_seeds < 1:
        raise SystemExit(f"--attack-seeds must be at least 1, got {args.attack_seeds}.")
    if args.scratch_inits < 1:
        raise SystemExit(f"--scratch-inits must be at least 1, got {args.scratch_inits}.")
    # Refused before anything loads, with the flag's own name.
    if not args.steps_scale > 0:
        raise SystemExit(
            f"--steps-scale must be positive (it multiplies every attack's budget), got {args.steps_scale}."
        )
    rates = args.scratch_learning_rates or []
    if any(not rate > 0 for rate in rates) or len(set(rates)) != len(rates):
        raise SystemExit(f"--scratch-learning-rates must be distinct positive numbers, got {rates}.")
    attacks = load_attacks(args.attacks_file) if args.attacks_file else args.suite

    def with_seeds(specs):
        offsets = range(args.seed, args.seed + args.attack_seeds)
        return [dataclasses.replace(spec, seed=spec.seed + offset) for spec in specs for offset in offsets]

    try:
        specs = resolve_attacks(attacks)  # refuse a bad suite or file before loading anything
        resolve_attacks(with_seeds(specs))
    except ValueError as error:
        hint = " (--seed and --attack-seeds shift every attack's seed)" if "Duplicate" in str(error) else ""
        raise SystemExit(f"{error}{hint}") from None

    hub = {"config": args.dataset_config, "revision": args.dataset_revision}
    train = load_restricted(args.restricted_train, args.train_split, args.label_column, args.input_column, **hub)
    test_source = args.restricted_test or args.restricted_train
    need_split = "--restricted-test" if args.restricted_test is None else None  # never test on training rows
    test = load_restricted(test_source, args.test_split, args.label_column, args.input_column, need_split, **hub)
    check_device(args.device)
    folder = model_folder(args.model, args.revision)
    model = load_model(folder)
    reference = load_model(model_folder(args.reference_model)) if args.reference_model else None
    noise_scheduler = load_noise_scheduler(folder) if is_diffusers_model(model) else None
    check_labels(train, args.restricted_train, model)
    check_labels(test, test_source, model)
    train, test = (model_inputs(d, model, folder, args.input_column) for d in (train, test))
    if noise_scheduler is not None:
        specs = resolve_attacks(attacks, has_head=False)  # a suite keeps the attacks a UNet can take
    specs = with_seeds(specs)
    try:
        report = evaluate_finetuning_resistance(
            model,
            train,
            test,
            attacks=specs,
            reference_model=reference,
            include_scratch=not args.no_scratch,
            scratch_inits=args.scratch_inits,
            **_scratch_options(args.scratch_learning_rates),
            steps_scale=args.steps_scale,
            head_name=args.head_name,
            noise_scheduler=noise_scheduler,
            output_dir=args.output,
            device=args.device,
        )
    except ValueError as error:
        raise SystemExit(f"sophon-hf attack: {error}") from None

    if int(os.environ.get("RANK", "0")) == 0:  # under a launcher, only the main process speaks
        summary = report.summary
        print(report.to_text())
        print(f"\n{summary['verdict']}.")
        print(f"Report: {os.path.join(args.output, 'report.md')}")
        _update_card(args.output, folder)
    import torch.distributed as dist

    if dist.is_initialized():
        # Exiting with a live gloo/NCCL group can abort the process ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()
    return 0
