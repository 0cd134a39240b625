"""`trainers/protect_classifier.py`: every recipe parses, the paper recipes run end to end on local stand-ins with the
real datasets' column layout (only the download is not exercised), the offline `builtin:mnist` recipe runs, and the
script runs on 2 CPU processes through `accelerate launch`."""

import glob
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, load_from_disk
from PIL import Image as PILImage
from safetensors.torch import load_file

from sophon_hf.trainers import protect_classifier as script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINERS = os.path.join(REPO, "trainers")
RECIPES = sorted(glob.glob(os.path.join(TRAINERS, "configs", "*.yaml")))
CLASSIFIER_RECIPES = [r for r in RECIPES if not os.path.basename(r).startswith("diffusion_")]
PAPER_RECIPES = [r for r in CLASSIFIER_RECIPES if os.path.basename(r).startswith("imagenette_cifar10_")]
IMAGENETTE_NAMES = [
    "tench",
    "springer",
    "cassette",
    "chainsaw",
    "church",
    "horn",
    "truck",
    "pump",
    "golf",
    "parachute",
]
CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Seconds-long runs: outer iterations, batches and pre-training cut down; everything else as in the recipe.
FAST = [
    "--max_steps", "2", "--pretrain_steps", "2", "--inner_steps", "2", "--per_device_train_batch_size", "4",
    "--restricted_batch_size", "4", "--per_device_eval_batch_size", "32", "--dataset_num_proc", "1",
    "--bf16", "false", "--use_cpu", "true", "--save_strategy", "no", "--logging_steps", "1",
]  # fmt: skip
# bf16 recipes are for GPUs: TrainingArguments refuses bf16 on a machine without one, so parse them with it off there.
NO_GPU = [] if torch.cuda.is_available() else ["--bf16", "false"]
TINY_VIT_28 = "image_size=28,patch_size=14,num_channels=1,hidden_size=16,num_hidden_layers=1,num_attention_heads=2,intermediate_size=32"


def _images(n: int, labels: np.ndarray, rng: np.random.Generator, size) -> list:
    images = []
    for i, label in enumerate(labels):
        h, w = size if size else rng.integers(10, 20, 2)
        pixels = (rng.random((h, w, 3)) * 100 + 15 * label).astype(np.uint8)
        image = PILImage.fromarray(pixels)
        # Like ImageNette's JPEGs: a few grayscale images among the RGB ones.
        images.append(image.convert("L") if size is None and i % 5 == 0 else image)
    return images


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Local data and models with the real ones' layout: ImageNette's parquet export, CIFAR-10, ResNet, ViT."""
    from transformers import (
        ResNetConfig,
        ResNetForImageClassification,
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessor,
    )

    root = tmp_path_factory.mktemp("stand_ins")
    rng = np.random.default_rng(0)
    # frgfm/imagenette at refs/convert/parquet: <size>/<split>/0000.parquet, columns image (mixed sizes/modes) + label.
    imagenette = Features({"image": Image(), "label": ClassLabel(names=IMAGENETTE_NAMES)})
    for size_dir in ("160px", "320px"):
        for split, n in (("train", 24), ("validation", 12)):
            labels = rng.integers(0, 10, n)
            os.makedirs(root / "imagenette" / size_dir / split)
            data = {"image": _images(n, labels, rng, None), "label": labels.tolist()}
            Dataset.from_dict(data, features=imagenette).to_parquet(
                root / "imagenette" / size_dir / split / "0000.parquet"
            )
    # uoft-cs/cifar10: splits train/test, columns img (32x32 RGB) + label.
    cifar = Features({"img": Image(), "label": ClassLabel(names=CIFAR_NAMES)})
    splits = {}
    for split, n in (("train", 24), ("test", 12)):
        labels = rng.integers(0, 10, n)
        splits[split] = Dataset.from_dict({"img": _images(n, labels, rng, (32, 32)), "label": labels.tolist()}, cifar)
    DatasetDict(splits).save_to_disk(str(root / "cifar10"))
    # Pre-trained models with a 7-way head (standing in for ImageNet's 1000) and their image processor.
    processor = ViTImageProcessor(size={"height": 8, "width": 8})
    torch.manual_seed(0)
    models = {
        "resnet": ResNetForImageClassification(
            ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=7)
        ),
        "vit": ViTForImageClassification(
            ViTConfig(
                image_size=8,
                patch_size=4,
                num_channels=3,
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
                num_labels=7,
            )
        ),
    }
    for name, model in models.items():
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    return root


# ---------------------------------------------------------------------------------------------------- recipes
def test_recipes_exist():
    names = {os.path.basename(r) for r in CLASSIFIER_RECIPES}
    assert {
        "imagenette_cifar10_resnet18.yaml",
        "imagenette_cifar10_resnet50.yaml",
        "imagenette_cifar10_vit.yaml",
        "mnist_vit_cpu.yaml",
    } <= names
    configs = {os.path.basename(p) for p in glob.glob(os.path.join(TRAINERS, "accelerate_configs", "*.yaml"))}
    assert {"cpu_2proc.yaml", "single_gpu.yaml", "multi_gpu.yaml"} <= configs


@pytest.mark.parametrize("recipe", CLASSIFIER_RECIPES, ids=os.path.basename)
def test_recipe_parses_into_the_dataclasses(recipe, tmp_path):
    with open(recipe) as f:
        values = yaml.safe_load(f)
    parsed = script.parse_args(["--config", recipe, *NO_GPU])
    assert len(parsed) == 3  # HfArgumentParser appends a 4th namespace for keys no dataclass owns
    for key, value in values.items():
        if key == "report_to" or (NO_GPU and key == "bf16"):  # TrainingArguments turns report_to "none" into []
            continue
        owner = next(args for args in parsed if hasattr(args, key))
        got = getattr(owner, key)
        got = getattr(got, "value", got)  # enums such as lr_scheduler_type
        assert got == value or str(got) == str(value), f"{key}: {got!r} != {value!r}"
    # The command line overrides the recipe.
    script_args, training_args, _ = script.parse_args(
        ["--config", recipe, *NO_GPU, "--max_steps", "7", "--max_length", "9"]
    )
    assert (training_args.max_steps, script_args.max_length) == (7, 9)


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r not in CLASSIFIER_RECIPES], ids=os.path.basename)
def test_diffusion_recipes_parse(recipe):
    from sophon_hf.trainers.protect_diffusion import parse_args

    assert len(parse_args(["--config", recipe, *NO_GPU])) == 3


def test_paper_recipes_name_the_real_hub_data_and_models():
    expected = {
        "imagenette_cifar10_resnet18.yaml": "microsoft/resnet-18",
        "imagenette_cifar10_resnet50.yaml": "microsoft/resnet-50",
        "imagenette_cifar10_vit.yaml": "google/vit-base-patch16-224",
    }
    assert {os.path.basename(r) for r in PAPER_RECIPES} == set(expected)
    for recipe in PAPER_RECIPES:
        script_args, training_args, model_args = script.parse_args(["--config", recipe, *NO_GPU])
        assert model_args.model_name_or_path == expected[os.path.basename(recipe)]
        assert (script_args.original_dataset, script_args.original_data_dir) == ("frgfm/imagenette", "320px")
        assert script_args.original_dataset_revision == "refs/convert/parquet"
        assert (script_args.original_split, script_args.original_eval_split) == ("train", "validation")
        assert (script_args.restricted_dataset, script_args.restricted_dataset_config) == (
            "uoft-cs/cifar10",
            "plain_text",
        )
        assert (script_args.restricted_split, script_args.restricted_eval_split) == ("train", "test")
        assert training_args.restricted_loss == "inverse_cross_entropy"


def test_config_names_a_shipped_recipe_and_rejects_unknown_fields(tmp_path):
    by_name = script.parse_args(["--config", "mnist_vit_cpu"])
    by_path = script.parse_args([f"--config={os.path.join(TRAINERS, 'configs', 'mnist_vit_cpu.yaml')}"])
    assert by_name[2] == by_path[2] and by_name[0] == by_path[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text("original_dataset: builtin:mnist\ninner_step: 3\n")
    with pytest.raises(ValueError, match=r"\['inner_step'\] are not arguments"):
        script.parse_args(["--config", str(bad)])
    with pytest.raises(FileNotFoundError, match="no shipped recipe"):
        script.parse_args(["--config", "no_such_recipe"])


def test_help_names_the_config_option(capsys):
    # `--config` is consumed before the dataclass parser runs, so the help text must mention it itself.
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    assert "--config RECIPE" in capsys.readouterr().out


def test_config_with_equals_keeps_the_next_argument_and_a_local_file_wins(tmp_path, monkeypatch):
    path = os.path.join(TRAINERS, "configs", "mnist_vit_cpu.yaml")
    _, training_args, model_args = script.parse_args([f"--config={path}", "--max_steps", "7", "--pretrain_steps", "3"])
    assert (training_args.max_steps, model_args.pretrain_steps) == (7, 3)
    # A file in the working directory named like a shipped recipe is the one meant.
    (tmp_path / "mnist_vit_cpu.yaml").write_text("original_dataset: builtin:mnist\nmax_steps: 11\n")
    monkeypatch.chdir(tmp_path)
    assert script.resolve_config_path("mnist_vit_cpu.yaml") == "mnist_vit_cpu.yaml"
    assert script.parse_args(["--config", "mnist_vit_cpu.yaml"])[1].max_steps == 11


def test_protect_cli_runs_the_recipe_script_of_the_recipe(monkeypatch):
    from sophon_hf.cli import main
    from sophon_hf.trainers import protect_diffusion

    ran = []
    monkeypatch.setattr(script, "main", lambda *parsed: ran.append(("classifier", parsed)))
    monkeypatch.setattr(protect_diffusion, "main", lambda *parsed: ran.append(("diffusion", parsed)))
    assert main(["protect", "--config", "diffusion_digits_cpu", "--max_steps", "3"]) == 0
    assert main(["protect", "--config", "mnist_vit_cpu", "--max_steps", "4"]) == 0
    assert [(kind, parsed[1].max_steps) for kind, parsed in ran] == [("diffusion", 3), ("classifier", 4)]
    assert isinstance(ran[0][1][0], protect_diffusion.ScriptArguments)
    assert isinstance(ran[1][1][0], script.ScriptArguments)


def test_protect_cli_user_errors_are_messages(tmp_path, monkeypatch):
    from sophon_hf.cli import main

    (tmp_path / "syntax.yaml").write_text("max_steps: [1\n")
    (tmp_path / "list.yaml").write_text("- max_steps: 1\n")
    (tmp_path / "missing_data.yaml").write_text(
        f"original_dataset: {tmp_path / 'no_such_folder'}\nrestricted_dataset: {tmp_path / 'no_such_folder'}\n"
        f"output_dir: {tmp_path / 'o'}\n"
    )
    with pytest.raises(SystemExit, match="syntax.yaml is not valid YAML"):
        main(["protect", "--config", str(tmp_path / "syntax.yaml")])
    with pytest.raises(SystemExit, match="must hold a mapping of recipe fields .*not a list"):
        main(["protect", "--config", str(tmp_path / "list.yaml")])
    # Raised deep inside the recipe script (loading data): a one-line message, not a traceback ...
    missing = ["protect", "--config", str(tmp_path / "missing_data.yaml"), "--use_cpu", "true"]
    with pytest.raises(SystemExit, match=r"sophon-hf protect: .*no_such_folder(.|\n)*SOPHON_HF_DEBUG=1"):
        main(missing)
    # ... unless the traceback is asked for.
    monkeypatch.setenv("SOPHON_HF_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(missing)
    monkeypatch.delenv("SOPHON_HF_DEBUG")
    # A ValueError from inside the script (data with neither images nor text) is a message too.
    DatasetDict(train=Dataset.from_dict({"x": [1, 2], "label": [0, 1]})).save_to_disk(str(tmp_path / "no_inputs"))
    (tmp_path / "no_inputs.yaml").write_text(
        f"original_dataset: {tmp_path / 'no_inputs'}\nrestricted_dataset: {tmp_path / 'no_inputs'}\n"
        f"output_dir: {tmp_path / 'o'}\n"
    )
    with pytest.raises(SystemExit, match="sophon-hf protect: ValueError: "):
        main(["protect", "--config", str(tmp_path / "no_inputs.yaml"), "--use_cpu", "true"])
    # The paper's DDPM recipe offline (another repo id, in case the real one is cached): Diffusers would report the
    # Hub repo as lacking config.json.
    with pytest.raises(SystemExit, match="'sophon-hf-tests/no-such-unet': it is not a local folder.*HF_HUB_OFFLINE"):
        main(["protect", "--config", "diffusion_cifar100_celeba.yaml", "--use_cpu", "true", "--bf16", "false",
              "--model_name_or_path", "sophon-hf-tests/no-such-unet", "--output_dir", str(tmp_path / "ddpm")])  # fmt: skip


def test_diffusion_recipes_parse_the_same_way(tmp_path):
    from sophon_hf.trainers import protect_diffusion

    by_name = protect_diffusion.parse_args(["--config", "diffusion_digits_cpu"])
    by_path = protect_diffusion.parse_args(
        [f"--config={os.path.join(TRAINERS, 'configs', 'diffusion_digits_cpu.yaml')}"]
    )
    assert len(by_name) == 3 and by_name[0] == by_path[0] and by_name[2] == by_path[2]
    bad = tmp_path / "bad.yaml"
    bad.write_text("restricted_loss: denial_of_service\nmax_stepz: 2\n")
    with pytest.raises(ValueError, match=r"\['max_stepz'\] are not arguments"):
        protect_diffusion.parse_args(["--config", str(bad)])


def test_protect_cli_reports_recipe_mistakes_as_messages(tmp_path):
    from sophon_hf.cli import main

    with pytest.raises(SystemExit, match="sophon-hf protect: No config file 'no_such_recipe'"):
        main(["protect", "--config", "no_such_recipe"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("restricted_loss: denial_of_service\nmax_stepz: 2\n")
    with pytest.raises(SystemExit, match=r"\['max_stepz'\] are not arguments"):
        main(["protect", "--config", str(bad)])
    with pytest.raises(SystemExit, match="simulation_horizon=12 is not a multiple"):
        main(["protect", "--config", "mnist_vit_cpu", "--simulation_horizon", "12", *NO_GPU])
    # Values of the wrong kind are named before anything loads (argparse checks no defaults, so YAML values are
    # checked as the command line would be).
    for line, message in [
        ("inner_steps: 1.5", "inner_steps must be an integer, got 1.5"),
        ("fts_learning_rate: [1, 2]", r"fts_learning_rate must be a single value, not a list, got \[1, 2\]"),
        ("restricted_batch_size: {a: 1}", "restricted_batch_size must be a single value, not a mapping"),
        ("bf16: maybe", "bf16 must be true or false, got 'maybe'"),
    ]:
        bad.write_text(f"restricted_loss: kl_uniform\n{line}\n")
        with pytest.raises(SystemExit, match=rf"sophon-hf protect: .*bad.yaml: {message}"):
            main(["protect", "--config", str(bad)])
    bad.write_text("max_eval_samples: 0\n")
    with pytest.raises(SystemExit, match=r"max_eval_samples must be at least 1 \(or unset for all\), got 0"):
        main(["protect", "--config", str(bad)])
    # The command line's conversions apply too: a quoted number, a quoted boolean, one item for a list.
    bad.write_text("inner_steps: '7'\nbf16: 'false'\nsimulation_strategies: lora\noriginal_classes: 3\nuse_cpu: 1\n")
    script_args, training_args, _ = script.parse_args(["--config", str(bad)])
    assert (training_args.inner_steps, training_args.bf16, training_args.use_cpu) == (7, False, True)
    assert training_args.simulation_strategies == ["lora"] and script_args.original_classes == [3]


@pytest.mark.parametrize("module", ["protect_classifier", "protect_diffusion"])
def test_recipe_scripts_run_directly_report_user_errors_in_one_line(module):
    # As `accelerate launch -m sophon_hf.trainers.<script>` runs them: one line per process, not a traceback.
    result = subprocess.run(
        [sys.executable, "-m", f"sophon_hf.trainers.{module}", "--config", "no_such_recipe"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("sophon-hf protect: FileNotFoundError: No config file 'no_such_recipe'")


# ---------------------------------------------------------------------------------------------------- column mapping
def test_column_mapping_on_stand_ins(stand_ins):
    from transformers import AutoImageProcessor

    script_args, _, _ = script.parse_args(
        ["--config", PAPER_RECIPES[0], *NO_GPU, "--original_dataset", str(stand_ins / "imagenette"),
         "--restricted_dataset", str(stand_ins / "cifar10"), "--max_eval_samples", "5"]
    )  # fmt: skip
    domains = script.load_datasets(script_args, seed=0)
    (original_train, original_eval, names), (restricted_train, restricted_eval, _) = (
        domains["original"],
        domains["restricted"],
    )
    # data_dir picked the 320px folder only (the export's sizes are not mixed), eval capped at 5.
    assert (len(original_train), len(original_eval), len(restricted_train), len(restricted_eval)) == (24, 5, 24, 5)
    assert names == IMAGENETTE_NAMES
    assert original_train.column_names == ["image", "labels"] and restricted_train.column_names == ["img", "labels"]
    processor = AutoImageProcessor.from_pretrained(stand_ins / "resnet")
    for raw in (original_train, restricted_train):
        mapped = script.to_model_inputs(raw, processor, script_args, num_channels=3)
        assert mapped.column_names == ["pixel_values", "labels"]
        batch = mapped.with_format("torch")[:]
        assert batch["pixel_values"].shape == (24, 3, 8, 8) and batch["pixel_values"].dtype == torch.float32
        assert batch["labels"].tolist() == raw["labels"]
        # The processor's normalisation was applied: mean 0.5, std 0.5 maps [0, 255] to [-1, 1].
        assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
        assert batch["pixel_values"].min() < 0


def test_class_filtering_renumbers_in_the_given_order(stand_ins):
    script_args, _, _ = script.parse_args(
        ["--config", PAPER_RECIPES[0], *NO_GPU, "--original_dataset", str(stand_ins / "imagenette"),
         "--restricted_dataset", str(stand_ins / "cifar10"), "--restricted_classes", "5", "3"]
    )  # fmt: skip
    raw = load_from_disk(str(stand_ins / "cifar10"))["train"]["label"]
    restricted_train = script.load_datasets(script_args, seed=0)["restricted"][0]
    assert len(restricted_train) == sum(label in (3, 5) for label in raw)
    assert sorted(restricted_train["labels"]) == sorted(0 if label == 5 else 1 for label in raw if label in (3, 5))


def test_class_filtering_renames_the_classes_and_leaves_the_other_domain_alone(stand_ins):
    script_args, _, _ = script.parse_args(
        ["--config", PAPER_RECIPES[0], *NO_GPU, "--original_dataset", str(stand_ins / "cifar10"),
         "--original_eval_split", "test", "--restricted_dataset", str(stand_ins / "cifar10"),
         "--restricted_classes", "5", "3"]
    )  # fmt: skip
    domains = script.load_datasets(script_args, seed=0)
    assert domains["restricted"][2] == [CIFAR_NAMES[5], CIFAR_NAMES[3]]
    raw = load_from_disk(str(stand_ins / "cifar10"))["train"]["label"]
    assert domains["original"][2] == CIFAR_NAMES and sorted(domains["original"][0]["labels"]) == sorted(raw)


def test_sample_caps_held_out_fraction_and_label_column(stand_ins, tmp_path):
    script_args, _, _ = script.parse_args(
        ["--config", PAPER_RECIPES[0], *NO_GPU, "--original_dataset", str(stand_ins / "imagenette"),
         "--restricted_dataset", str(stand_ins / "cifar10"), "--max_original_samples", "10",
         "--max_restricted_samples", "7", "--max_eval_samples", "5"]
    )  # fmt: skip
    domains = script.load_datasets(script_args, seed=0)
    assert [len(d) for d in (*domains["original"][:2], *domains["restricted"][:2])] == [10, 5, 7, 5]
    # No eval split: eval_fraction of the training rows are held out; a named label column wins over 'label'.
    rows = Dataset.from_dict({"pixel_values": np.zeros((20, 1, 2, 2)), "label": [0] * 20, "fine": list(range(20))})
    rows.save_to_disk(str(tmp_path / "rows"))
    args = script.ScriptArguments(
        original_dataset=str(tmp_path / "rows"), original_eval_split=None, eval_fraction=0.25, label_column="fine",
        max_eval_samples=None,
    )  # fmt: skip
    train, evaluation, _ = script.load_domain(args, "original", seed=0, builtin=None)
    assert (len(train), len(evaluation)) == (15, 5)
    assert sorted([*train["labels"], *evaluation["labels"]]) == list(range(20))
    # A single dataset has no splits to name: the recipe's eval split ("test") cannot come from it, so the held-out
    # fraction is evaluated on, never the training rows themselves.
    args.original_eval_split = "test"
    train, evaluation, _ = script.load_domain(args, "original", seed=0, builtin=None)
    assert (len(train), len(evaluation)) == (15, 5) and not set(train["labels"]) & set(evaluation["labels"])


def test_text_columns_are_tokenized_to_a_fixed_length(tmp_path):
    from transformers import BertTokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film"]))
    tokenizer = BertTokenizer(str(vocab))
    script_args = script.ScriptArguments(max_length=6)
    raw = Dataset.from_dict({"text": ["good film", "bad bad bad bad bad bad film"], "labels": [1, 0]})
    assert script.modality(raw, script_args) == "text"
    mapped = script.to_model_inputs(raw, tokenizer, script_args, num_channels=None).with_format("torch")[:]
    assert mapped["input_ids"].shape == (2, 6) and mapped["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0]


def test_decoder_classifiers_are_padded_with_their_end_of_sequence_token(tmp_path, one_thread):
    import json
    import random

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["good", "bad", "film", "plot", "dull", "fun"]
    core = Tokenizer(WordLevel({w: i for i, w in enumerate(["[UNK]", "<eos>", *words])}, unk_token="[UNK]"))
    core.pre_tokenizer = Whitespace()
    # Like GPT-2's and LLaMA's: an end-of-sequence token and no padding token.
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="<eos>").save_pretrained(
        tmp_path / "tok"
    )

    def texts(n, num_labels, seed):
        rng = random.Random(seed)
        rows = [(" ".join(rng.choices(words, k=rng.randint(2, 6))), rng.randrange(num_labels)) for _ in range(n)]
        return Dataset.from_dict({"text": [t for t, _ in rows], "label": [label for _, label in rows]})

    DatasetDict(train=texts(24, 4, 0), test=texts(8, 4, 1)).save_to_disk(tmp_path / "original")
    DatasetDict(train=texts(24, 2, 2), test=texts(8, 2, 3)).save_to_disk(tmp_path / "restricted")
    output_dir = tmp_path / "protected"
    parsed = script.parse_args(
        ["--original_dataset", str(tmp_path / "original"), "--restricted_dataset", str(tmp_path / "restricted"),
         "--model_type", "gpt2", "--config_overrides", "n_embd=16,n_layer=1,n_head=2,vocab_size=8,n_positions=16",
         "--tokenizer_name_or_path", str(tmp_path / "tok"), "--max_length", "8", "--output_dir", str(output_dir),
         "--max_steps", "2", "--inner_steps", "2", "--per_device_train_batch_size", "4", "--use_cpu", "true",
         "--report_to", "none", "--save_strategy", "no", "--simulation_strategies", "full", "--max_eval_samples", "4"]
    )  # fmt: skip
    metrics = script.main(*parsed)
    assert "eval_restricted_accuracy" in metrics
    assert json.loads((output_dir / "config.json").read_text())["pad_token_id"] == 1  # "<eos>"
    # The saved tokenizer records the length the model was protected with (`sophon-hf attack` tokenizes to it).
    assert json.loads((output_dir / "tokenizer_config.json").read_text())["model_max_length"] == 8


def test_a_model_folder_saved_without_a_processor_needs_none_for_ready_pixel_values(stand_ins, tmp_path):
    from transformers import AutoModelForImageClassification

    folder = tmp_path / "bare"
    AutoModelForImageClassification.from_pretrained(stand_ins / "resnet").save_pretrained(folder)
    assert script.load_processor(script.ModelArguments(model_name_or_path=str(folder)), "image") is None
    # A text model folder without a tokenizer: None, not an empty-vocabulary tokenizer built from its config.
    from transformers import BertConfig, BertForSequenceClassification

    BertForSequenceClassification(
        BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    ).save_pretrained(tmp_path / "bert")
    assert script.load_processor(script.ModelArguments(model_name_or_path=str(tmp_path / "bert")), "text") is None
    # A processor file that is there but broken raises its own error instead of being taken for none.
    (folder / "preprocessor_config.json").write_text('{"do_resize": true,, }')
    with pytest.raises(OSError, match="not a valid JSON file"):
        script.load_processor(script.ModelArguments(model_name_or_path=str(folder)), "image")
    ready = Dataset.from_dict({"pixel_values": np.zeros((2, 3, 8, 8), dtype=np.float32), "labels": [0, 1]})
    assert script.to_model_inputs(ready, None, script.ScriptArguments(), num_channels=3).num_rows == 2
    # The stand-in's own folder has one, and it is loaded.
    assert script.load_processor(script.ModelArguments(model_name_or_path=str(stand_ins / "resnet")), "image")


def test_raw_images_without_a_processor_fail_clearly(stand_ins):
    raw = load_from_disk(str(stand_ins / "cifar10"))["test"].rename_column("label", "labels")
    with pytest.raises(ValueError, match="image_processor_name_or_path"):
        script.to_model_inputs(raw, None, script.ScriptArguments(), num_channels=3)
    # Arrays in a column with an image's name are not images: the fix is to name them pixel_values.
    arrays = Dataset.from_dict({"image": np.zeros((2, 3, 8, 8), dtype=np.float32), "labels": [0, 1]})
    with pytest.raises(ValueError, match=r"Column 'image' holds \w+ values, not images .* 'pixel_values'"):
        script.to_model_inputs(arrays, object(), script.ScriptArguments(), num_channels=3)


# ---------------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("recipe", PAPER_RECIPES, ids=os.path.basename)
def test_paper_recipe_end_to_end_on_stand_ins(recipe, stand_ins, tmp_path, one_thread):
    from transformers import AutoModelForImageClassification

    model_dir = stand_ins / ("vit" if "vit" in os.path.basename(recipe) else "resnet")
    output_dir = tmp_path / "protected"
    script_args, training_args, model_args = script.parse_args(
        ["--config", recipe, *FAST, "--output_dir", str(output_dir), "--original_dataset", str(stand_ins / "imagenette"),
         "--restricted_dataset", str(stand_ins / "cifar10"), "--model_name_or_path", str(model_dir),
         "--unprotected_output_dir", str(tmp_path / "unprotected")]
    )  # fmt: skip
    before = AutoModelForImageClassification.from_pretrained(model_dir)
    metrics = script.main(script_args, training_args, model_args)

    assert {"eval_original_accuracy", "eval_restricted_accuracy"} <= set(metrics)
    protected = AutoModelForImageClassification.from_pretrained(output_dir)
    assert protected.config.num_labels == 10  # the 7-way pre-trained head was replaced
    assert protected.config.id2label[0] == "tench"
    assert os.path.isfile(output_dir / "preprocessor_config.json")
    assert os.path.isfile(output_dir / "eval_results.json")
    changed = [
        name
        for name, p in protected.named_parameters()
        if "classifier" not in name and not torch.equal(p, before.get_parameter(name))
    ]
    assert changed, "protection did not change the pre-trained body"
    # The unprotected reference is the pre-trained model after its new head was trained (pretrain_steps), unprotected.
    unprotected = AutoModelForImageClassification.from_pretrained(tmp_path / "unprotected")
    assert unprotected.config.num_labels == 10
    assert not all(torch.equal(p, protected.get_parameter(n)) for n, p in unprotected.named_parameters())


def test_unprotected_reference_is_saved_with_its_image_processor(stand_ins, tmp_path, one_thread):
    from transformers import AutoImageProcessor

    script.main(
        *script.parse_args(
            [
                "--config",
                PAPER_RECIPES[0],
                *FAST,
                "--output_dir",
                str(tmp_path / "protected"),
                "--original_dataset",
                str(stand_ins / "imagenette"),
                "--restricted_dataset",
                str(stand_ins / "cifar10"),
                "--model_name_or_path",
                str(stand_ins / "resnet"),
                "--unprotected_output_dir",
                str(tmp_path / "unprotected"),
                "--max_eval_samples",
                "4",
            ]
        )
    )
    processor = AutoImageProcessor.from_pretrained(tmp_path / "unprotected")
    assert processor.size == AutoImageProcessor.from_pretrained(stand_ins / "resnet").size


@pytest.mark.parametrize("first_order", ["true", "false"], ids=["first-order", "second-order"])
def test_builtin_mnist_recipe_end_to_end(tmp_path, one_thread, first_order, capsys):
    # Second order needs attention with a second derivative: the script picks the eager implementation for it.
    from transformers import AutoModelForImageClassification

    output_dir = tmp_path / "protected"
    script_args, training_args, model_args = script.parse_args(
        ["--config", "mnist_vit_cpu.yaml", *FAST, "--output_dir", str(output_dir), "--config_overrides", TINY_VIT_28,
         "--max_original_samples", "64", "--max_restricted_samples", "64", "--max_eval_samples", "32",
         "--unprotected_output_dir", str(tmp_path / "unprotected"), "--first_order", first_order]
    )  # fmt: skip
    metrics = script.main(script_args, training_args, model_args)
    assert 0 <= metrics["eval_original_accuracy"] <= 1 and 0 <= metrics["eval_restricted_accuracy"] <= 1
    # The script ends by saying where the models went and how to measure them.
    printed = capsys.readouterr().out
    assert f"Saved the protected model to {output_dir}/" in printed
    # The built-in data is on nobody else's disk: the attacker's images (a fifth of the 64, held out of protection)
    # and the held-out test split are saved for the attack the script prints.
    data = output_dir / "attack_data"
    assert (
        f"sophon-hf attack --model {output_dir} --reference-model {tmp_path / 'unprotected'} --restricted-train "
        f"{data / 'attacker_train'} --restricted-test {data / 'restricted_test'} --output {output_dir}"
    ) in printed
    train, test = load_from_disk(str(data / "attacker_train")), load_from_disk(str(data / "restricted_test"))
    assert (train.num_rows, test.num_rows) == (12, 32) and set(train.column_names) == {"pixel_values", "labels"}
    model = AutoModelForImageClassification.from_pretrained(output_dir)
    assert (model.config.num_labels, model.config.num_channels, model.config.hidden_size) == (5, 1, 16)
    with torch.no_grad():
        assert model(pixel_values=torch.rand(2, 1, 28, 28)).logits.shape == (2, 5)


def test_a_diverged_protection_is_saved_and_ends_the_script_with_an_error(tmp_path, one_thread):
    command = ["--config", "mnist_vit_cpu.yaml", *FAST, "--output_dir", str(tmp_path / "protected"),
               "--config_overrides", TINY_VIT_28, "--max_original_samples", "16", "--max_restricted_samples", "16",
               "--max_eval_samples", "8", "--inner_optimizers", "sgd:1e30",
               "--unprotected_output_dir", str(tmp_path / "unprotected")]  # fmt: skip
    with pytest.raises(SystemExit, match=r"Protection diverged: the suppression meta-gradient became non-finite"):
        script.main(*script.parse_args(command))
    assert (tmp_path / "protected" / "model.safetensors").is_file()  # the work is kept
    assert "**Protection stopped** after 1 of 2 outer iterations" in (tmp_path / "protected" / "README.md").read_text()


def test_an_output_folder_that_is_a_file_is_refused_before_any_work(tmp_path):
    from sophon_hf.trainers import protect_diffusion

    (tmp_path / "ref.txt").write_text("")
    for module, recipe in ((script, "mnist_vit_cpu.yaml"), (protect_diffusion, "diffusion_digits_cpu.yaml")):
        parsed = module.parse_args(
            ["--config", recipe, *NO_GPU, "--output_dir", str(tmp_path / "out"),
             "--unprotected_output_dir", str(tmp_path / "ref.txt")]
        )  # fmt: skip
        with pytest.raises(ValueError, match=r"unprotected_output_dir=.*ref.txt is a file: choose a folder"):
            module.main(*parsed)
        assert not (tmp_path / "out").exists()


def test_pickle_only_weights_are_never_loaded(stand_ins, tmp_path, one_thread):
    from transformers import AutoModelForImageClassification

    folder = tmp_path / "pickled"
    AutoModelForImageClassification.from_pretrained(stand_ins / "resnet").save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    command = ["--config", PAPER_RECIPES[0], *FAST, "--output_dir", str(tmp_path / "protected"),
               "--original_dataset", str(stand_ins / "imagenette"), "--restricted_dataset", str(stand_ins / "cifar10"),
               "--model_name_or_path", str(folder)]  # fmt: skip
    with pytest.raises(OSError, match=r"model.safetensors.*only pickle weights \(pytorch_model.bin\)"):
        script.main(*script.parse_args(command))


def test_a_pretrained_head_of_another_size_is_never_released_untrained(stand_ins, tmp_path):
    # The stand-in ResNet has a 7-way head; ImageNette and CIFAR-10 have 10 labels. Without pre-training, the new
    # 10-way head would be protected and published as the ImageNette classifier.
    command = ["--config", PAPER_RECIPES[0], *FAST, "--output_dir", str(tmp_path / "protected"),
               "--original_dataset", str(stand_ins / "imagenette"), "--restricted_dataset", str(stand_ins / "cifar10"),
               "--model_name_or_path", str(stand_ins / "resnet"), "--pretrain_steps", "0"]  # fmt: skip
    with pytest.raises(ValueError, match=r"has a head of another size for the 10 labels .* Set pretrain_steps"):
        script.main(*script.parse_args(command))
    # A checkpoint without any head (a bare encoder, as many Hub BERTs are) is the same case.
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    ).save_pretrained(tmp_path / "encoder")
    bare = script.ModelArguments(model_name_or_path=str(tmp_path / "encoder"))
    with pytest.raises(ValueError, match=r"encoder has no classification head for the 2 labels"):
        script.load_model(bare, "text", 2, None)
    bare.pretrain_steps = 1
    assert script.load_model(bare, "text", 2, None).config.num_labels == 2
    command[command.index("--model_name_or_path") + 1] = str(stand_ins / "resnet" / "config.json")
    with pytest.raises(ValueError, match=r"config.json is a file: pass the model's folder \(.*resnet\)"):
        script.main(*script.parse_args(command))
    assert not (tmp_path / "protected").exists()


def test_resuming_the_recipe_keeps_the_unprotected_reference(tmp_path, one_thread):
    from transformers import AutoModelForImageClassification

    command = ["--config", "mnist_vit_cpu.yaml", *FAST, "--output_dir", str(tmp_path / "protected"),
               "--config_overrides", TINY_VIT_28, "--max_original_samples", "64", "--max_restricted_samples", "64",
               "--max_eval_samples", "32", "--unprotected_output_dir", str(tmp_path / "unprotected"),
               "--save_strategy", "steps", "--save_steps", "1"]  # fmt: skip
    script.main(*script.parse_args(command))
    reference = AutoModelForImageClassification.from_pretrained(tmp_path / "unprotected")
    # Pre-training is skipped on resume: the model built by the script is not the reference and must not replace it.
    script.main(
        *script.parse_args([*command, "--resume_from_checkpoint", str(tmp_path / "protected" / "checkpoint-1")])
    )
    after = AutoModelForImageClassification.from_pretrained(tmp_path / "unprotected")
    for name, parameter in reference.named_parameters():
        assert torch.equal(parameter, after.get_parameter(name)), name


def test_resuming_the_recipe_skips_pre_training(tmp_path, one_thread, monkeypatch):
    command = ["--config", "mnist_vit_cpu.yaml", *FAST, "--output_dir", str(tmp_path / "protected"),
               "--config_overrides", TINY_VIT_28, "--max_original_samples", "16", "--max_restricted_samples", "16",
               "--max_eval_samples", "8", "--save_strategy", "steps", "--save_steps", "1", "--max_steps", "1",
               "--unprotected_output_dir", str(tmp_path / "unprotected")]  # fmt: skip
    pretrained = []
    original_pretrain = script.pretrain
    monkeypatch.setattr(script, "pretrain", lambda *a, **k: pretrained.append(1) or original_pretrain(*a, **k))
    script.main(*script.parse_args(command))
    assert pretrained == [1]
    script.main(
        *script.parse_args([*command, "--resume_from_checkpoint", str(tmp_path / "protected" / "checkpoint-1")])
    )
    assert pretrained == [1]


def test_builtin_mnist_must_be_both_domains(stand_ins):
    script_args = script.ScriptArguments(restricted_dataset=str(stand_ins / "cifar10"))
    with pytest.raises(ValueError, match="set both original_dataset"):
        script.load_datasets(script_args, seed=0)


def test_no_model_fails_clearly():
    with pytest.raises(ValueError, match="set model_name_or_path"):
        script.load_model(script.ModelArguments(), "image", num_labels=5, label_names=None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_two_cpu_processes(tmp_path):
    output_dir = tmp_path / "protected"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", os.path.join(TRAINERS, "accelerate_configs", "cpu_2proc.yaml"),
        "--main_process_port", str(_free_port()),
        os.path.join(TRAINERS, "protect_classifier.py"),
        "--config", os.path.join(TRAINERS, "configs", "mnist_vit_cpu.yaml"), *FAST,
        "--output_dir", str(output_dir), "--config_overrides", TINY_VIT_28, "--max_original_samples", "64",
        "--max_restricted_samples", "64", "--max_eval_samples", "32",
        "--unprotected_output_dir", str(tmp_path / "unprotected"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert os.path.isfile(output_dir / "model.safetensors")
    # Two connected ranks trained it (`--cpu --num_processes 2` would have run a single process).
    training_args = torch.load(output_dir / "training_args.bin", weights_only=False)
    assert training_args.world_size == 2
    print(f"accelerate launch, 2 CPU processes: {elapsed:.1f} s")


def test_text_classifier_end_to_end(tmp_path, one_thread):
    """`text` + `label` columns (the layout of e.g. ag_news or imdb) through a local tokenizer into a BERT classifier."""
    from transformers import (
        AutoModelForSequenceClassification,
        BertConfig,
        BertForSequenceClassification,
        BertTokenizer,
    )

    words = ["good", "bad", "film", "plot", "goal", "match", "team", "score"]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
    model_dir = tmp_path / "bert"
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(words) + 5,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    BertForSequenceClassification(config).save_pretrained(model_dir)
    BertTokenizer(str(vocab)).save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    for name, topic in (("reviews", words[:4]), ("sports", words[4:])):
        splits = {
            split: Dataset.from_dict(
                {"text": [" ".join(rng.choice(topic, 5)) for _ in range(n)], "label": rng.integers(0, 3, n).tolist()}
            )
            for split, n in (("train", 16), ("test", 8))
        }
        DatasetDict(splits).save_to_disk(str(tmp_path / name))

    output_dir = tmp_path / "protected"
    script_args, training_args, model_args = script.parse_args(
        [*FAST, "--output_dir", str(output_dir), "--original_dataset", str(tmp_path / "reviews"),
         "--restricted_dataset", str(tmp_path / "sports"), "--model_name_or_path", str(model_dir), "--max_length", "8",
         "--simulation_strategies", "full_reinit_head", "lora"]
    )  # fmt: skip
    metrics = script.main(script_args, training_args, model_args)
    assert {"eval_original_accuracy", "eval_restricted_accuracy"} <= set(metrics)
    protected = AutoModelForSequenceClassification.from_pretrained(output_dir)
    assert protected.config.num_labels == 3  # the 2-way head was replaced for the 3 labels in the data
    assert os.path.isfile(output_dir / "tokenizer_config.json")
