"""`sophon-hf attack`: folders in, report out, resume, refusal of a foreign output folder, suites listing."""

import json
import os

import pytest
import torch
from conftest import image_dataset, tiny_vit
from datasets import Dataset, DatasetDict

from sophon_hf.cli import main
from sophon_hf.utils import model_fingerprint

# The test machine's cores are shared: one intra-op thread avoids OpenMP contention (tiny steps 20x slower).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def saved(tmp_path):
    protected, reference = tiny_vit(seed=1), tiny_vit(seed=2)
    protected.save_pretrained(tmp_path / "protected")
    reference.save_pretrained(tmp_path / "reference")
    # A DatasetDict folder with the label column under its common raw name.
    splits = {"train": image_dataset(24, seed=0), "test": image_dataset(16, seed=1)}
    DatasetDict({k: v.rename_column("labels", "label") for k, v in splits.items()}).save_to_disk(tmp_path / "data")
    attacks = tmp_path / "attacks.yaml"
    attacks.write_text(
        "- {strategy: full, optimizer: sgd_momentum, learning_rate: 0.01, steps: 20, batch_size: 8}\n"
        "- {strategy: linear_probe, optimizer: adam, learning_rate: 0.01, steps: 20, batch_size: 8}\n"
    )
    return tmp_path


def _args(tmp_path, output, model="protected"):
    return [
        "attack",
        "--model",
        str(tmp_path / model),
        "--reference-model",
        str(tmp_path / "reference"),
        "--restricted-train",
        str(tmp_path / "data"),
        "--label-column",
        "label",
        "--attacks-file",
        str(tmp_path / "attacks.yaml"),
        "--steps-scale",
        "0.2",
        "--output",
        str(output),
    ]


def test_a_measurement_in_the_model_folder_goes_onto_its_card(saved, capsys):
    from sophon_hf.model_card import write_model_card

    write_model_card(saved / "protected", restricted_domain="digits 5-9")
    assert "not measured yet" in (saved / "protected" / "README.md").read_text()
    assert main(_args(saved, saved / "protected")) == 0
    card = (saved / "protected" / "README.md").read_text()
    assert "not measured yet" not in card and "full-sgd_momentum-lr0.01" in card and "digits 5-9" in card
    assert "now states this measurement" in capsys.readouterr().out
    # A card the publisher edited is theirs: left as it is, with a word on how to update it.
    (saved / "protected" / "README.md").write_text(card + "\nOur notes.\n")
    assert main([*_args(saved, saved / "protected"), "--attack-seeds", "2"]) == 0
    assert (saved / "protected" / "README.md").read_text().endswith("Our notes.\n")
    assert "was edited after sophon_hf wrote it" in capsys.readouterr().out


def test_attack_cli_writes_the_report_and_resumes(saved, capsys):
    output = saved / "report"
    assert main(_args(saved, output)) == 0
    printed = capsys.readouterr().out
    assert "Report:" in printed and "head start" in printed  # the per-attack table
    assert {"report.json", "report.md", "attack_curves.png", "runs"} <= set(os.listdir(output))
    with open(output / "report.json") as f:
        data = json.load(f)
    assert [a["name"] for a in data["attacks"]] == [
        "full-sgd_momentum-lr0.01-steps4-bs8",
        "linear_probe-adam-lr0.01-steps4-bs8",
    ]
    assert set(data["attacks"][0]["curves"]) == {"protected", "unprotected", "scratch"}

    runs = {name: os.stat(output / "runs" / name).st_mtime_ns for name in os.listdir(output / "runs")}
    # Two attacks x two starts, and one shared scratch run per initialisation (3) and learning rate (3).
    assert len(runs) == 2 * 2 + 3 * 3
    assert main(_args(saved, output)) == 0
    assert {name: os.stat(output / "runs" / name).st_mtime_ns for name in os.listdir(output / "runs")} == runs


def test_attack_cli_runs_every_attack_at_several_seeds(saved):
    output = saved / "report"
    assert main([*_args(saved, output), "--attack-seeds", "2", "--seed", "3", "--no-scratch"]) == 0
    with open(output / "report.json") as f:
        data = json.load(f)
    assert [(a["spec"]["strategy"], a["spec"]["seed"]) for a in data["attacks"]] == [
        ("full", 3),
        ("full", 4),
        ("linear_probe", 3),
        ("linear_probe", 4),
    ]
    assert data["attacks"][1]["name"] == "full-sgd_momentum-lr0.01-steps4-bs8-seed4"
    with pytest.raises(SystemExit, match="--attack-seeds must be at least 1"):
        main([*_args(saved, saved / "x"), "--attack-seeds", "0"])
    # The same attack listed at seeds 0 and 1, then repeated at two seeds: refused before anything loads.
    (saved / "seeded.yaml").write_text(
        "- {strategy: full, optimizer: adam, steps: 20, seed: 0}\n- {strategy: full, optimizer: adam, steps: 20, seed: 1}\n"
    )
    args = _args(saved, saved / "x")
    args[args.index("--attacks-file") + 1] = str(saved / "seeded.yaml")
    with pytest.raises(SystemExit, match=r"Duplicate attacks.*--attack-seeds"):
        main([*args, "--attack-seeds", "2"])


def test_attack_cli_refuses_an_output_folder_of_another_model(saved):
    output = saved / "report"
    assert main(_args(saved, output)) == 0
    with pytest.raises(SystemExit, match="different protected model"):
        main(_args(saved, output, model="reference"))


def test_attack_cli_lists_suites_and_rejects_bad_input(saved, capsys):
    assert main(["attack", "--list-suites"]) == 0
    listing = capsys.readouterr().out
    assert "quick: 5 attacks" in listing and "standard: 52 attacks" in listing and "lora-adam-lr0.001" in listing
    with pytest.raises(SystemExit) as error:
        main(["attack", "--output", str(saved / "x")])
    assert error.value.code == 2
    assert "the following arguments are required: --model, --restricted-train" in capsys.readouterr().err
    args = _args(saved, saved / "x")
    del args[args.index("--attacks-file") : args.index("--attacks-file") + 2]
    with pytest.raises(SystemExit, match="Unknown attack suite"):
        main([*args, "--suite", "huge"])
    (saved / "bad.yaml").write_text("- {strategy: full, optimizer: lion}\n")
    args = _args(saved, saved / "x")
    args[args.index("--attacks-file") + 1] = str(saved / "bad.yaml")
    with pytest.raises(SystemExit, match="Unknown optimizer"):
        main(args)
    image_dataset(8).save_to_disk(saved / "single")
    args = _args(saved, saved / "x")
    args[args.index("--restricted-train") + 1] = str(saved / "single")
    del args[args.index("--label-column") : args.index("--label-column") + 2]  # this one is already named 'labels'
    with pytest.raises(SystemExit, match="pass --restricted-test"):
        main(args)
    with pytest.raises(SystemExit, match="no column 'target'"):
        main([*_args(saved, saved / "x"), "--label-column", "target"])
    (saved / "broken.json").write_text('[{"strategy": "full",}]')
    (saved / "broken.yaml").write_text("- {strategy: full\n")
    for name, kind in (("broken.json", "JSON"), ("broken.yaml", "YAML")):
        args = _args(saved, saved / "x")
        args[args.index("--attacks-file") + 1] = str(saved / name)
        with pytest.raises(SystemExit, match=rf"--attacks-file .*{name} is not valid {kind}"):
            main(args)


def test_attack_cli_names_missing_files_and_bad_values(saved, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = _args(saved, saved / "x")
    with pytest.raises(SystemExit, match="--steps-scale must be positive"):
        main([*args, "--steps-scale", "0"])
    with pytest.raises(SystemExit, match=r"--scratch-learning-rates must be distinct positive numbers, got \[0.0\]"):
        main([*args, "--scratch-learning-rates", "0"])
    with pytest.raises(SystemExit, match="--scratch-inits must be at least 1, got 0"):
        main([*args, "--scratch-inits", "0"])
    missing = list(args)
    missing[missing.index("--attacks-file") + 1] = str(saved / "nofile.yaml")
    with pytest.raises(SystemExit, match="nofile.yaml does not exist"):
        main(missing)
    missing = list(args)
    missing[missing.index("--model") + 1] = str(saved / "no_such_model")
    with pytest.raises(SystemExit, match="Cannot load the model .*not a local folder"):
        main(missing)
    missing[missing.index("--model") + 1] = str(saved / "protected" / "config.json")
    with pytest.raises(SystemExit, match=r"config.json is a file: pass the model's folder \(.*protected\)"):
        main(missing)
    missing = list(args)
    missing[missing.index("--restricted-train") + 1] = str(saved / "no_such_data")
    with pytest.raises(SystemExit, match="Cannot load the dataset .*not a local folder"):
        main(missing)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            main([*args, "--device", "cuda"])
    with pytest.raises(SystemExit, match="'tpu' is not a torch device"):
        main([*args, "--device", "tpu"])
    (saved / "a_file").write_text("")
    with pytest.raises(SystemExit, match="a_file is a file, not a folder"):
        main([*_args(saved, saved / "a_file")])
    Dataset.from_dict({"pixel_values": [], "labels": []}).save_to_disk(str(saved / "empty"))
    empty = list(args)
    empty[empty.index("--restricted-train") + 1] = str(saved / "empty")
    with pytest.raises(SystemExit, match="Cannot read the dataset folder .*empty"):
        main(empty)
    # JSON writers turn 20 into 20.0; a fractional budget is refused with the field's name.
    (saved / "float.json").write_text('[{"strategy": "full", "optimizer": "adam", "steps": 20.0, "batch_size": 8}]')
    (saved / "frac.json").write_text('[{"strategy": "full", "optimizer": "adam", "steps": 2.5}]')
    for name, expected in (("float.json", None), ("frac.json", "steps=2.5 must be a whole number")):
        files = list(args)
        files[files.index("--attacks-file") + 1] = str(saved / name)
        if expected is None:
            assert main(files) == 0
        else:
            with pytest.raises(SystemExit, match=expected):
                main(files)


def test_attack_cli_measures_a_diffusers_unet_with_its_saved_scheduler(tmp_path):
    from diffusers import DDPMScheduler
    from test_model_card import tiny_unet

    g = torch.Generator().manual_seed(0)
    images = lambda n: Dataset.from_dict({"pixel_values": (torch.rand(n, 1, 16, 16, generator=g) * 2 - 1).numpy()})  # noqa: E731
    DatasetDict(train=images(16), test=images(8)).save_to_disk(str(tmp_path / "restricted"))
    tiny_unet().save_pretrained(tmp_path / "unet")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(tmp_path / "unet")
    (tmp_path / "attacks.yaml").write_text("- {strategy: full, optimizer: adam, steps: 2, batch_size: 8}\n")
    args = ["attack", "--model", str(tmp_path / "unet"), "--restricted-train", str(tmp_path / "restricted")]
    args += ["--attacks-file", str(tmp_path / "attacks.yaml"), "--no-scratch", "--output", str(tmp_path / "out")]
    assert main(args) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["metric"] == "denoising_mse" and len(report["attacks"]) == 1


def test_attack_cli_measures_the_unet_of_a_diffusers_pipeline_folder_with_its_scheduler(tmp_path, monkeypatch):
    from diffusers import DDPMPipeline, DDPMScheduler
    from test_model_card import tiny_unet

    g = torch.Generator().manual_seed(0)
    images = lambda n: Dataset.from_dict({"pixel_values": (torch.rand(n, 1, 16, 16, generator=g) * 2 - 1).numpy()})  # noqa: E731
    DatasetDict(train=images(16), test=images(8)).save_to_disk(str(tmp_path / "restricted"))
    unet, schedule = tiny_unet(), DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")
    DDPMPipeline(unet=unet, scheduler=schedule).save_pretrained(tmp_path / "pipeline")
    captured = _capture_harness(monkeypatch)
    # The pipeline folder and its unet/ subfolder both find the UNet and the pipeline's own scheduler.
    for model in (tmp_path / "pipeline", tmp_path / "pipeline" / "unet"):
        args = ["attack", "--model", str(model), "--restricted-train", str(tmp_path / "restricted")]
        with pytest.raises(_Stop):
            main([*args, "--suite", "quick", "--output", str(tmp_path / "out")])
        assert model_fingerprint(captured["model"]) == model_fingerprint(unet)
        used = captured["noise_scheduler"].config
        assert (used.num_train_timesteps, used.beta_schedule) == (100, "squaredcos_cap_v2")


def test_attack_cli_takes_a_unet_by_hub_id_with_its_scheduler_and_a_named_suite(tmp_path, monkeypatch, capsys):
    from diffusers import DDPMScheduler
    from test_model_card import tiny_unet

    g = torch.Generator().manual_seed(0)
    images = lambda n: Dataset.from_dict({"pixel_values": (torch.rand(n, 1, 16, 16, generator=g) * 2 - 1).numpy()})  # noqa: E731
    DatasetDict(train=images(16), test=images(8)).save_to_disk(str(tmp_path / "restricted"))
    snapshot = tmp_path / "snapshot"  # what the Hub serves for "me/unet"
    tiny_unet().save_pretrained(snapshot)
    DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2").save_pretrained(snapshot)
    requested = {}

    def snapshot_download(repo_id, *, allow_patterns=None, **kwargs):
        requested.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(snapshot)

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    captured = _capture_harness(monkeypatch)
    args = ["attack", "--model", "me/unet", "--restricted-train", str(tmp_path / "restricted")]
    with pytest.raises(_Stop):
        main([*args, "--suite", "quick", "--output", str(tmp_path / "out")])
    assert requested["repo_id"] == "me/unet" and "*.safetensors" in requested["allow_patterns"]
    assert type(captured["model"]).__name__ == "UNet2DModel"
    # The scheduler published next to the UNet, not a default one.
    config = captured["noise_scheduler"].config
    assert (config.num_train_timesteps, config.beta_schedule) == (100, "squaredcos_cap_v2")
    # The quick suite without the attacks that need a classification head.
    assert [s.strategy for s in captured["attacks"]] == ["full", "full", "lora"]


class _Stop(Exception):
    """Raised by a stand-in harness once it has recorded what the command passed to it."""


def _capture_harness(monkeypatch):
    captured = {}

    def harness(model, train, test, **kwargs):
        captured.update(model=model, train=train, test=test, **kwargs)
        raise _Stop

    monkeypatch.setattr("sophon_hf.attacks.evaluate_finetuning_resistance", harness)
    return captured


def test_attack_cli_defaults_reach_the_harness(saved, monkeypatch):
    from sophon_hf.attacks import resolve_attacks

    captured = _capture_harness(monkeypatch)
    args = ["attack", "--model", str(saved / "protected"), "--restricted-train", str(saved / "data")]
    with pytest.raises(_Stop):
        main([*args, "--label-column", "label", "--output", str(saved / "x")])
    # The quick suite with its own seeds, the "train" split to train on and the "test" split to score on.
    assert [(s.name, s.seed) for s in captured["attacks"]] == [(s.name, s.seed) for s in resolve_attacks("quick")]
    assert (captured["train"].num_rows, captured["test"].num_rows) == (24, 16)
    assert captured["include_scratch"] is True and captured["scratch_inits"] == 3
    assert captured["steps_scale"] == 1.0 and captured["reference_model"] is None and captured["head_name"] is None
    assert "scratch_learning_rates" not in captured and "scratch_recipe" not in captured  # the harness's tuned default
    with pytest.raises(_Stop):  # one rate fixes it
        main([*args, "--label-column", "label", "--output", str(saved / "x"), "--scratch-learning-rates", "0.02"])
    assert captured["scratch_recipe"] == {"learning_rate": 0.02} and "scratch_learning_rates" not in captured


def test_attack_cli_options_reach_the_harness(saved, monkeypatch):
    from sophon_hf.attacks import resolve_attacks

    splits = {"a": image_dataset(12, seed=3), "b": image_dataset(6, seed=4)}
    DatasetDict({k: v.rename_column("pixel_values", "image") for k, v in splits.items()}).save_to_disk(saved / "raw")
    image_dataset(10, seed=5).rename_column("labels", "label").save_to_disk(saved / "held_out")
    captured = _capture_harness(monkeypatch)
    with pytest.raises(_Stop):
        main(
            ["attack", "--model", str(saved / "protected"), "--reference-model", str(saved / "reference"),
             "--restricted-train", str(saved / "raw"), "--train-split", "a", "--input-column", "image",
             "--suite", "standard", "--seed", "5", "--no-scratch", "--scratch-inits", "2", "--steps-scale", "0.5",
             "--scratch-learning-rates", "1e-3", "1e-2",
             "--head-name", "classifier", "--device", "cpu", "--restricted-test", str(saved / "raw"),
             "--test-split", "b", "--output", str(saved / "x")]
        )  # fmt: skip
    standard = resolve_attacks("standard")
    assert [(s.strategy, s.optimizer, s.seed) for s in captured["attacks"]] == [
        (s.strategy, s.optimizer, s.seed + 5) for s in standard
    ]
    assert captured["train"].num_rows == 12 and captured["test"].num_rows == 6
    assert {"pixel_values", "labels"} <= set(captured["train"].column_names) and "image" not in captured[
        "train"
    ].column_names
    assert captured["include_scratch"] is False and captured["scratch_inits"] == 2 and captured["steps_scale"] == 0.5
    assert captured["scratch_learning_rates"] == [1e-3, 1e-2]
    assert (captured["head_name"], captured["device"], captured["output_dir"]) == (
        "classifier",
        "cpu",
        str(saved / "x"),
    )
    assert captured["reference_model"] is not None
    # A separate held-out folder is what the attacks are scored on.
    captured.clear()
    with pytest.raises(_Stop):
        main([*_args(saved, saved / "y"), "--restricted-test", str(saved / "held_out")])
    assert captured["test"].num_rows == 10 and captured["train"].num_rows == 24


def test_attack_cli_names_a_missing_split_and_unknown_options(saved):
    with pytest.raises(SystemExit, match=r"has splits \['train', 'test'\], not 'valid'"):
        main([*_args(saved, saved / "x"), "--test-split", "valid"])
    with pytest.raises(SystemExit) as error:
        main([*_args(saved, saved / "x"), "--no-such-option"])
    assert error.value.code == 2


def _raw_images(n: int, seed: int, size: int = 12):
    """A Hub-style dataset: PIL images under `image`, class labels under `label`."""
    import numpy as np
    from datasets import ClassLabel, Features, Image

    rng = np.random.default_rng(seed)
    features = Features({"image": Image(), "label": ClassLabel(num_classes=5)})
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
    return Dataset.from_dict({"image": images, "label": [i % 5 for i in range(n)]}, features=features)


def test_attack_cli_prepares_raw_images_with_the_models_own_processor(tmp_path, monkeypatch):
    from test_model_card import tiny_unet
    from transformers import ViTImageProcessor

    DatasetDict(train=_raw_images(10, 0), test=_raw_images(6, 1)).save_to_disk(str(tmp_path / "raw"))
    tiny_vit().save_pretrained(tmp_path / "vit")
    processor = ViTImageProcessor(size={"height": 8, "width": 8}, do_normalize=False)
    processor.save_pretrained(tmp_path / "vit")
    captured = _capture_harness(monkeypatch)
    args = [
        "attack",
        "--restricted-train",
        str(tmp_path / "raw"),
        "--label-column",
        "label",
        "--output",
        str(tmp_path / "o"),
    ]
    with pytest.raises(_Stop):
        main([*args, "--model", str(tmp_path / "vit")])
    pixels = captured["train"].with_format("torch")[:]["pixel_values"]
    # Grayscale (the ViT takes 1 channel), resized to 8x8 and rescaled to [0, 1] by the saved processor.
    assert pixels.shape == (10, 1, 8, 8) and 0 <= pixels.min() and pixels.max() <= 1
    assert captured["test"].num_rows == 6 and captured["train"]["labels"] == [i % 5 for i in range(10)]

    # A UNet: resized to its sample size and mapped to [-1, 1].
    tiny_unet().save_pretrained(tmp_path / "unet")
    with pytest.raises(_Stop):
        main([*args, "--model", str(tmp_path / "unet")])
    pixels = captured["train"].with_format("torch")[:]["pixel_values"]
    assert pixels.shape == (10, 1, 16, 16) and pixels.min() < 0 <= pixels.max() <= 1

    # A classifier saved without a processor: the message says what to save.
    tiny_vit().save_pretrained(tmp_path / "bare")
    with pytest.raises(SystemExit, match="no image processor / tokenizer.*save_pretrained"):
        main([*args, "--model", str(tmp_path / "bare")])


def test_attack_cli_tokenizes_raw_text_with_the_models_tokenizer_to_its_length(tmp_path, monkeypatch):
    from conftest import tiny_bert
    from transformers import BertTokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film"]))
    tokenizer = BertTokenizer(str(vocab), model_max_length=10)  # as protect_classifier.py saves it
    tiny_bert().save_pretrained(tmp_path / "bert")  # max_position_embeddings=16
    tokenizer.save_pretrained(tmp_path / "bert")
    texts = ["good film", "bad film", "good good bad film", "bad"] * 3
    # A Hub-style text dataset: a `review` column (named with --input-column), labels under `label`.
    raw = Dataset.from_dict({"review": texts, "label": [i % 2 for i in range(12)]})
    DatasetDict(train=raw, test=raw.select(range(4))).save_to_disk(str(tmp_path / "raw"))
    captured = _capture_harness(monkeypatch)
    args = ["attack", "--model", str(tmp_path / "bert"), "--restricted-train", str(tmp_path / "raw")]
    with pytest.raises(_Stop):
        main([*args, "--input-column", "review", "--output", str(tmp_path / "o")])
    batch = captured["train"].with_format("torch")[:]
    assert batch["input_ids"].shape == (12, 10) and batch["attention_mask"][1].tolist()[:5] == [1, 1, 1, 1, 0]
    assert batch["labels"].tolist() == [i % 2 for i in range(12)]  # found under `label` without --label-column
    # A tokenizer that records no length: 128 tokens, capped at the model's 16 positions.
    BertTokenizer(str(vocab)).save_pretrained(tmp_path / "bert")
    with pytest.raises(_Stop):
        main([*args, "--input-column", "review", "--output", str(tmp_path / "o")])
    assert captured["train"].with_format("torch")[:]["input_ids"].shape == (12, 16)
    # In Python too: the tokenizer's recorded length by default (as the CLI), else what is asked for.
    from sophon_hf.data import to_model_inputs

    assert len(to_model_inputs(raw, tokenizer, text_column="review")[0]["input_ids"]) == 10
    assert len(to_model_inputs(raw, tokenizer, text_column="review", max_length=6)[0]["input_ids"]) == 6


def test_attack_cli_label_and_input_columns_by_name(tmp_path, monkeypatch):
    from datasets import Features, Image, Value

    images = _raw_images(10, 0)
    data = Dataset.from_dict(
        {"photo": images["image"], "label": [0] * 10, "fine_label": [i % 5 for i in range(10)]},
        features=Features({"photo": Image(), "label": Value("int64"), "fine_label": Value("int64")}),
    )
    DatasetDict(train=data, test=data.select(range(4))).save_to_disk(str(tmp_path / "raw"))
    from transformers import ViTImageProcessor

    tiny_vit().save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 8, "width": 8}, do_normalize=False).save_pretrained(tmp_path / "vit")
    captured = _capture_harness(monkeypatch)
    args = ["attack", "--model", str(tmp_path / "vit"), "--restricted-train", str(tmp_path / "raw")]
    with pytest.raises(_Stop):
        # The chosen label column wins over a `label` column; raw images under another name go through the processor.
        main([*args, "--label-column", "fine_label", "--input-column", "photo", "--output", str(tmp_path / "o")])
    batch = captured["train"].with_format("torch")[:]
    assert batch["labels"].tolist() == [i % 5 for i in range(10)] and batch["pixel_values"].shape == (10, 1, 8, 8)
    # Without a `labels`/`label` column the error names the option and the columns as given, before conversion.
    data.remove_columns("label").save_to_disk(str(tmp_path / "unlabelled"))
    args = ["attack", "--model", str(tmp_path / "vit"), "--restricted-train", str(tmp_path / "unlabelled")]
    args += [
        "--restricted-test",
        str(tmp_path / "unlabelled"),
        "--input-column",
        "photo",
        "--output",
        str(tmp_path / "o"),
    ]
    with pytest.raises(
        SystemExit, match=r"has no label column \(columns: \['photo', 'fine_label'\]\): pass --label-col"
    ):
        main(args)


def test_attack_cli_passes_a_hub_datasets_config_and_revision(saved, monkeypatch):
    from datasets import load_from_disk

    requested = []

    def load_dataset(source, name=None, *, split, revision=None):
        requested.append((source, name, split, revision))
        return load_from_disk(str(saved / "data"))[split]

    monkeypatch.setattr("datasets.load_dataset", load_dataset)
    captured = _capture_harness(monkeypatch)
    args = _args(saved, saved / "x")
    args[args.index("--restricted-train") + 1] = "frgfm/imagenette"
    with pytest.raises(_Stop):
        main([*args, "--dataset-config", "160px", "--dataset-revision", "refs/convert/parquet"])
    assert requested == [
        ("frgfm/imagenette", "160px", "train", "refs/convert/parquet"),
        ("frgfm/imagenette", "160px", "test", "refs/convert/parquet"),
    ]
    assert captured["train"].num_rows > 0


def test_attack_cli_downloads_a_reference_model_given_by_hub_id(saved, monkeypatch):
    captured = _capture_harness(monkeypatch)
    requested = []

    def snapshot_download(repo_id, *, token=None, **kwargs):
        requested.append((repo_id, token))
        return str(saved / "reference")

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    args = [*_args(saved, saved / "x")]
    args[args.index("--reference-model") + 1] = "me/reference"
    with pytest.raises(_Stop):
        main(args)
    assert requested == [("me/reference", None)]
    assert model_fingerprint(captured["reference_model"]) == model_fingerprint(tiny_vit(seed=2))


def test_attack_cli_names_pickle_only_and_unknown_model_folders(tmp_path):
    model = tiny_vit()
    model.save_pretrained(tmp_path / "pickled")
    (tmp_path / "pickled" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    args = ["attack", "--restricted-train", str(tmp_path / "nodata"), "--output", str(tmp_path / "o")]
    DatasetDict(train=_raw_images(4, 0), test=_raw_images(4, 1)).save_to_disk(str(tmp_path / "nodata"))
    with pytest.raises(SystemExit, match=r"only pickle weights \(pytorch_model.bin\).*save_pretrained"):
        main([*args, "--model", str(tmp_path / "pickled")])
    model.save_pretrained(tmp_path / "unknown")
    config = json.loads((tmp_path / "unknown" / "config.json").read_text())
    (tmp_path / "unknown" / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModel"]}))
    with pytest.raises(SystemExit, match="Cannot load the model in"):
        main([*args, "--model", str(tmp_path / "unknown")])


def test_save_unprotected_reference_writes_on_the_main_process_only(tmp_path, caplog):
    from types import SimpleNamespace

    from sophon_hf.utils import save_unprotected_reference

    model = tiny_vit()
    save_unprotected_reference(
        str(tmp_path / "rank1"), SimpleNamespace(process_index=1, resume_from_checkpoint=None), model
    )
    assert not (tmp_path / "rank1").exists()
    resumed = SimpleNamespace(process_index=0, resume_from_checkpoint="out/checkpoint-5")
    with caplog.at_level("WARNING"):
        save_unprotected_reference(str(tmp_path / "resumed"), resumed, model)
    assert not (tmp_path / "resumed").exists() and "holds no unprotected reference" in caplog.text
    save_unprotected_reference(
        str(tmp_path / "ok"), SimpleNamespace(process_index=0, resume_from_checkpoint=None), model
    )
    assert (tmp_path / "ok" / "model.safetensors").is_file()


def test_to_model_inputs_names_a_missing_column_and_drops_other_columns(tmp_path):
    from transformers import ViTImageProcessor

    from sophon_hf.data import to_model_inputs

    processor = ViTImageProcessor(size={"height": 8, "width": 8}, do_normalize=False)
    raw = _raw_images(4, 0).rename_column("label", "labels").add_column("id", ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="Found no image column"):
        to_model_inputs(raw, processor, image_column="missing")
    assert to_model_inputs(raw, processor, num_channels=1).column_names == ["pixel_values", "labels"]
    # The Hub's usual `label` column is kept, as `labels`.
    hub_style = _raw_images(4, 0)
    assert "label" in hub_style.column_names and "labels" not in hub_style.column_names
    converted = to_model_inputs(hub_style, processor, num_channels=1)
    assert converted.column_names == ["pixel_values", "labels"] and converted["labels"] == hub_style["label"]
