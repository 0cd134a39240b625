"""Publishing: what arrives on a (local, patched) Hub, and every way a push must refuse or fail cleanly.

There is no local Hub server, so the four `HfApi` methods `push_folder` calls are patched to commit into a temp
folder (one sub-folder per repo and branch), applying commit operations atomically as the Hub does.
"""

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.hf_api import CommitInfo, RepoUrl
from test_model_card import classification_report, tiny_unet, tiny_vit
from transformers import ViTForImageClassification

from sophon_hf.cli import main as cli_main
from sophon_hf.hub import HubPublishError, load_pretrained_model, push_folder, select_files
from sophon_hf.model_card import card_report_mismatches, final_metrics, generate_model_card, write_model_card
from sophon_hf.utils import model_fingerprint

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class FakeHub:
    """Remote repositories as folders: `root/<namespace>/<name>/<branch>/...`."""

    def __init__(self, root: Path):
        self.root = root
        self.calls: list[str] = []
        self.fail_next_commit: Exception | None = None
        self.private: dict[str, bool] = {}

    def branch_dir(self, repo_id: str, revision: str | None = None) -> Path:
        return self.root / repo_id / (revision or "main")

    def files(self, repo_id: str, revision: str | None = None) -> list[str]:
        base = self.branch_dir(repo_id, revision)
        return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())

    def install(self, monkeypatch):
        hub = self
        # The tests run offline (conftest): the faked Hub is reachable, as a real one would be online.
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)

        def create_repo(api, repo_id, *, private=False, exist_ok=False, repo_type=None, **kwargs):
            hub.calls.append("create_repo")
            repo_id = repo_id if "/" in repo_id else f"me/{repo_id}"
            hub.branch_dir(repo_id).mkdir(parents=True, exist_ok=True)
            hub.private.setdefault(repo_id, private)
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_branch(api, repo_id, *, branch, exist_ok=False, **kwargs):
            hub.calls.append("create_branch")
            if not hub.branch_dir(repo_id, branch).exists():
                shutil.copytree(hub.branch_dir(repo_id), hub.branch_dir(repo_id, branch))

        def list_repo_files(api, repo_id, *, revision=None, **kwargs):
            hub.calls.append("list_repo_files")
            return hub.files(repo_id, revision)

        def create_commit(api, repo_id, operations, *, commit_message, revision=None, **kwargs):
            hub.calls.append("create_commit")
            if hub.fail_next_commit is not None:
                # The Hub applies a commit all at once or not at all: a failure leaves the branch as it was.
                error, hub.fail_next_commit = hub.fail_next_commit, None
                raise error
            base = hub.branch_dir(repo_id, revision)
            for op in operations:
                if isinstance(op, CommitOperationDelete):
                    (base / op.path_in_repo).unlink()
                else:
                    assert isinstance(op, CommitOperationAdd)
                    (base / op.path_in_repo).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(op.path_or_fileobj, base / op.path_in_repo)
            return CommitInfo(
                commit_url=f"https://huggingface.co/{repo_id}/commit/{len(hub.calls):040d}",
                commit_message=commit_message,
                commit_description="",
                oid=f"{len(hub.calls):040d}",
            )

        def whoami(api, token=None, **kwargs):
            return {"name": "me"}

        for name, function in [
            ("whoami", whoami),
            ("create_repo", create_repo),
            ("create_branch", create_branch),
            ("list_repo_files", list_repo_files),
            ("create_commit", create_commit),
        ]:
            monkeypatch.setattr(HfApi, name, function)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    fake = FakeHub(tmp_path / "remote")
    fake.install(monkeypatch)
    return fake


def snapshot(folder: Path) -> dict[str, str]:
    """Every local file and its content hash: a push must leave this unchanged."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def http_error(status: int, message: str = "denied") -> HfHubHTTPError:
    # A stand-in for the HTTP response object (its class depends on the huggingface_hub version).
    return HfHubHTTPError(message, response=SimpleNamespace(status_code=status, headers={}, request=None))


def protected_folder(path: Path, model=None, with_report: bool = True) -> Path:
    """A Trainer-like output folder: weights, card, report, plus pickles and a checkpoint that must stay local."""
    model = model if model is not None else tiny_vit()
    model.save_pretrained(path)
    if with_report:
        classification_report(model).save(str(path))
    write_model_card(path, restricted_domain="digits 5-9", original_domain="digits 0-4")
    torch.save({"lr": 1e-3}, path / "training_args.bin")
    (path / "checkpoint-10").mkdir()
    torch.save({}, path / "checkpoint-10" / "optimizer.pt")
    (path / "checkpoint-10" / "config.json").write_text("{}")
    return path


def test_push_transformers_folder_arrives_loadable_without_pickles(tmp_path, hub):
    model = tiny_vit()
    folder = protected_folder(tmp_path / "out", model)
    before = snapshot(folder)

    url = push_folder(folder, "me/vit-sophon")

    assert url.startswith("https://huggingface.co/me/vit-sophon/commit/")
    arrived = hub.files("me/vit-sophon")
    assert arrived == sorted(
        [
            "README.md",
            "attack_curves.png",
            "config.json",
            "model.safetensors",
            "report.json",
            "report.md",
            "sophon_card.json",
        ]
    )
    assert not [name for name in arrived if name.endswith(PICKLE_SUFFIXES)]
    remote = hub.branch_dir("me/vit-sophon")
    reloaded = ViTForImageClassification.from_pretrained(remote)
    assert model_fingerprint(reloaded) == model_fingerprint(model)

    card = ModelCard.load(remote / "README.md")
    report = json.loads((remote / "report.json").read_text())
    assert card_report_mismatches(card, report) == []
    by_key = {(r.metric_args.get("attack"), r.metric_args["start"]): r.metric_value for r in card.data.eval_results}
    for attack in report["attacks"]:
        for start, value in final_metrics(attack).items():
            assert by_key[(attack["name"], start)] == pytest.approx(value)
    assert report["summary"]["worst_attack"] in card.text and "scratch" in card.text
    assert snapshot(folder) == before


def test_push_diffusers_unet_folder(tmp_path, hub):
    unet = tiny_unet()
    folder = tmp_path / "unet"
    unet.save_pretrained(folder)
    write_model_card(folder, restricted_domain="faces")
    # The card tells users to load the noise schedule from the repo: a UNet without one is not published.
    with pytest.raises(ValueError, match=r"no scheduler_config.json: .*noise_scheduler.save_pretrained\(folder\)"):
        push_folder(folder, "me/unet-sophon", private=True)
    assert "me/unet-sophon" not in hub.private
    DDPMScheduler(num_train_timesteps=100).save_pretrained(folder)

    push_folder(folder, "me/unet-sophon", private=True)

    assert hub.files("me/unet-sophon") == [
        "README.md",
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "scheduler_config.json",
        "sophon_card.json",
    ]
    assert hub.private["me/unet-sophon"] is True
    reloaded = UNet2DModel.from_pretrained(hub.branch_dir("me/unet-sophon"))
    assert model_fingerprint(reloaded) == model_fingerprint(unet)
    card = ModelCard.load(hub.branch_dir("me/unet-sophon") / "README.md")
    assert card.data.library_name == "diffusers" and "not been measured yet" in card.text


def test_push_to_a_revision_and_stale_weights_of_an_earlier_push_are_removed(tmp_path, hub):
    folder = protected_folder(tmp_path / "out")
    remote = hub.branch_dir("me/vit-sophon")
    remote.mkdir(parents=True)
    (remote / "pytorch_model.bin").write_bytes(b"old unprotected weights")
    (remote / "logo.png").write_bytes(b"kept")

    push_folder(folder, "me/vit-sophon", revision="v1")

    assert "create_branch" in hub.calls
    assert "pytorch_model.bin" not in hub.files("me/vit-sophon", "v1")
    assert "logo.png" in hub.files("me/vit-sophon", "v1")  # only files a push owns are replaced
    assert "pytorch_model.bin" in hub.files("me/vit-sophon")  # main untouched


def test_no_token_is_a_clear_error_and_nothing_is_sent(tmp_path, hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    folder = protected_folder(tmp_path / "out")
    before = snapshot(folder)

    with pytest.raises(HubPublishError, match=r"No Hugging Face token.*hf auth login.*HF_TOKEN"):
        push_folder(folder, "me/vit-sophon")
    assert hub.calls == []
    assert snapshot(folder) == before


@pytest.mark.parametrize(
    "status, message",
    [(401, r"rejected the token.*hf auth login"), (403, r"may not write to 'other/vit'.*write access")],
)
def test_no_permission_is_a_clear_error_and_local_files_are_intact(tmp_path, hub, status, message):
    folder = protected_folder(tmp_path / "out")
    before = snapshot(folder)
    hub.fail_next_commit = http_error(status)

    with pytest.raises(HubPublishError, match=message):
        push_folder(folder, "other/vit")
    assert snapshot(folder) == before
    assert hub.files("other/vit") == []


class TransportError(Exception):
    """Like httpx's transport errors: not an OSError."""


@pytest.mark.parametrize("error", [ConnectionResetError("connection reset by peer"), TransportError("timed out")])
def test_failure_half_way_loses_nothing_and_a_rerun_completes(tmp_path, hub, error):
    folder = protected_folder(tmp_path / "out")
    before = snapshot(folder)
    hub.fail_next_commit = error

    with pytest.raises(HubPublishError, match="run the same push again"):
        push_folder(folder, "me/vit-sophon")
    assert snapshot(folder) == before
    assert hub.files("me/vit-sophon") == []  # no half-published model: weights never arrive without their card

    push_folder(folder, "me/vit-sophon")
    assert "model.safetensors" in hub.files("me/vit-sophon") and "README.md" in hub.files("me/vit-sophon")
    assert snapshot(folder) == before


@pytest.mark.parametrize("repo_id", ["bad//id", "-leading-dash/x", "me/" + "x" * 100, "me/has space", ""])
def test_malformed_repo_id_is_refused_before_anything_happens(tmp_path, hub, repo_id):
    folder = protected_folder(tmp_path / "out")
    with pytest.raises(ValueError, match="not a valid Hub repo id.*namespace/name"):
        push_folder(folder, repo_id)
    assert hub.calls == []


def test_report_of_another_model_is_refused(tmp_path, hub):
    folder = protected_folder(tmp_path / "out", tiny_vit(seed=0))
    tiny_vit(seed=1).save_pretrained(folder)  # new weights, old report
    with pytest.raises(ValueError, match="measured on other weights"):
        push_folder(folder, "me/vit-sophon")
    assert hub.calls == []

    report = json.loads((folder / "report.json").read_text())
    del report["fingerprints"]
    (folder / "report.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match="records no fingerprint"):
        push_folder(folder, "me/vit-sophon")


def test_fingerprint_covers_names_shapes_dtypes_and_buffers():
    def fingerprint(**tensors):
        module = torch.nn.Module()
        for name, tensor in tensors.items():
            module.register_buffer(name, tensor)
        return model_fingerprint(module)

    values = torch.arange(6, dtype=torch.float32)
    assert fingerprint(a=values) == fingerprint(a=values.clone())
    assert fingerprint(a=values) != fingerprint(b=values)
    assert fingerprint(a=values.view(2, 3)) != fingerprint(a=values.view(3, 2))
    assert fingerprint(a=torch.zeros(2, dtype=torch.float32)) != fingerprint(a=torch.zeros(2, dtype=torch.int32))
    # Buffers count: a model whose BatchNorm statistics changed is other weights.
    model = torch.nn.BatchNorm1d(3)
    before = model_fingerprint(model)
    model.running_mean += 1
    assert model_fingerprint(model) != before


def test_card_that_predates_the_report_is_refused(tmp_path, hub):
    model = tiny_vit()
    folder = tmp_path / "out"
    model.save_pretrained(folder)
    write_model_card(folder)  # "not measured yet"
    classification_report(model).save(str(folder))  # then the attacks ran
    with pytest.raises(ValueError, match="does not match its report.json"):
        push_folder(folder, "me/vit-sophon")
    (folder / "README.md").unlink()
    with pytest.raises(ValueError, match="has no model card"):
        push_folder(folder, "me/vit-sophon")
    assert hub.calls == []


def test_pickle_only_weights_are_refused_with_the_fix(tmp_path, hub):
    folder = tmp_path / "out"
    tiny_vit().save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pickle weights \(pytorch_model.bin\).*save_pretrained"):
        push_folder(folder, "me/vit-sophon")


def test_select_files_keeps_pickles_checkpoints_and_logs_local(tmp_path):
    folder = protected_folder(tmp_path / "out")
    (folder / "runs").mkdir()
    (folder / "runs" / "events.json").write_text("{}")
    # What SophonTrainer and Trainer keep next to checkpoint weights: training state, never a published model.
    for name in ("simulated_attacker_rank0.safetensors", "original_floor_weights.safetensors", "trainer_state.json"):
        (folder / name).write_bytes(b"{}")
    (folder / "last-checkpoint").mkdir()
    (folder / "last-checkpoint" / "model.safetensors").write_bytes(b"{}")
    upload, skipped = select_files(folder)
    assert "model.safetensors" in upload and "report.json" in upload
    assert set(skipped) == {
        "training_args.bin",
        "checkpoint-10/optimizer.pt",
        "checkpoint-10/config.json",
        "runs/events.json",
        "simulated_attacker_rank0.safetensors",
        "original_floor_weights.safetensors",
        "trainer_state.json",
        "last-checkpoint/model.safetensors",
    }


def test_cli_push_writes_a_missing_or_stale_card_then_publishes(tmp_path, hub, capsys):
    model = tiny_vit()
    folder = tmp_path / "out"
    model.save_pretrained(folder)
    write_model_card(folder, original_domain="digits 0-4")  # saved by the trainer before the attacks ran
    classification_report(model).save(str(folder))

    code = cli_main(["push", "--model", str(folder), "--repo-id", "me/vit-sophon", "--restricted-domain", "5-9"])

    assert code == 0
    assert "Published" in capsys.readouterr().out
    card = ModelCard.load(hub.branch_dir("me/vit-sophon") / "README.md")
    assert "digits 0-4" in card.text and "5-9" in card.text  # the trainer's words survive the rewrite
    assert card_report_mismatches(card, json.loads((folder / "report.json").read_text())) == []
    assert "me/vit-sophon" in card.text

    with pytest.raises(SystemExit, match="not a valid Hub repo id"):
        cli_main(["push", "--model", str(folder), "--repo-id", "not//valid"])


def test_cli_push_without_a_token_leaves_the_folder_as_it_was(tmp_path, hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    folder = tmp_path / "out"
    tiny_vit().save_pretrained(folder)
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(SystemExit, match="No Hugging Face token.*Nothing in .* was changed"):
        cli_main(["push", "--model", str(folder), "--repo-id", "me/vit-sophon"])
    assert sorted(p.name for p in folder.iterdir()) == before  # no card written for a push that cannot happen
    with pytest.raises(SystemExit, match="is not a folder"):
        cli_main(["push", "--model", str(tmp_path / "missing"), "--repo-id", "me/vit-sophon"])
    # What is wrong with the folder comes first: a token would not make it publishable.
    (folder / "model.safetensors").unlink()
    with pytest.raises(SystemExit, match="holds no safetensors weights"):
        cli_main(["push", "--model", str(folder), "--repo-id", "me/vit-sophon"])


def test_trainer_saves_a_card_and_pushes_through_push_folder(tmp_path, hub):
    from conftest import image_dataset, tiny_config

    from sophon_hf import SophonTrainer

    model = tiny_vit()
    args = tiny_config(
        tmp_path / "vit-protected", max_steps=2, hub_model_id="me/vit-protected", restricted_domain="digits 5-9"
    )
    trainer = SophonTrainer(
        model, args=args, train_dataset=image_dataset(16, seed=1), restricted_dataset=image_dataset(16, seed=2)
    )
    trainer.train()
    trainer.save_model()
    card = ModelCard.load(tmp_path / "vit-protected" / "README.md")
    assert "sophon" in card.data.tags and "not been measured" in card.text and "digits 5-9" in card.text

    trainer.push_to_hub()
    arrived = hub.files("me/vit-protected")
    assert "model.safetensors" in arrived and "README.md" in arrived
    assert not any(name.endswith(PICKLE_SUFFIXES) for name in arrived)
    reloaded = ViTForImageClassification.from_pretrained(hub.branch_dir("me/vit-protected"))
    assert model_fingerprint(reloaded) == model_fingerprint(model)


def test_cli_push_regenerates_a_stale_card_without_new_details(tmp_path, hub):
    model = tiny_vit()
    folder = tmp_path / "out"
    model.save_pretrained(folder)
    write_model_card(folder, original_domain="digits 0-4")  # saved before the attacks ran
    classification_report(model).save(str(folder))

    assert cli_main(["push", "--model", str(folder), "--repo-id", "me/vit-sophon"]) == 0
    card = ModelCard.load(hub.branch_dir("me/vit-sophon") / "README.md")
    assert card_report_mismatches(card, json.loads((folder / "report.json").read_text())) == []
    assert "digits 0-4" in card.text


def test_cli_push_passes_new_details_visibility_branch_and_datasets(tmp_path, hub):
    folder = protected_folder(tmp_path / "out")  # its card already matches its report
    code = cli_main(
        ["push", "--model", str(folder), "--repo-id", "me/vit-sophon", "--restricted-domain", "street signs",
         "--dataset", "me/signs", "--private", "--revision", "v2", "--commit-message", "first release"]
    )  # fmt: skip
    assert code == 0
    assert hub.private["me/vit-sophon"] is True
    assert "README.md" in hub.files("me/vit-sophon", "v2") and hub.files("me/vit-sophon") == []
    card = ModelCard.load(hub.branch_dir("me/vit-sophon", "v2") / "README.md")
    assert "street signs" in card.text and "me/signs" in card.data.datasets
    # The card on the branch loads the branch: `main` is empty (or holds another model).
    assert """from_pretrained("me/vit-sophon", revision='v2')""" in card.text
    assert "sophon-hf verify --model me/vit-sophon --revision v2" in card.text
    assert "sophon-hf attack --model me/vit-sophon --revision v2" in card.text
    # The same folder pushed to `main` afterwards gets a card without the branch.
    assert cli_main(["push", "--model", str(folder), "--repo-id", "me/vit-sophon"]) == 0
    main_card = ModelCard.load(hub.branch_dir("me/vit-sophon") / "README.md").text
    assert 'from_pretrained("me/vit-sophon")' in main_card and "--revision" not in main_card


def test_cli_push_of_a_report_of_other_weights_leaves_the_card_alone(tmp_path, hub):
    folder = protected_folder(tmp_path / "out", tiny_vit(seed=0))
    tiny_vit(seed=1).save_pretrained(folder)  # new weights, old report and card
    before = snapshot(folder)
    with pytest.raises(SystemExit, match="measured on other weights"):
        cli_main(["push", "--model", str(folder), "--repo-id", "me/vit-sophon", "--restricted-domain", "new words"])
    assert snapshot(folder) == before and hub.calls == []


def test_push_uses_the_given_token_and_commit_message(tmp_path, hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    folder = protected_folder(tmp_path / "out")
    tokens, messages = [], []
    commit = HfApi.create_commit

    def create_commit(api, repo_id, operations, *, commit_message, **kwargs):
        tokens.append(api.token)
        messages.append(commit_message)
        return commit(api, repo_id, operations, commit_message=commit_message, **kwargs)

    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    push_folder(folder, "me/vit-sophon", token="hf_given", commit_message="protected v1")
    push_folder(folder, "me/vit-sophon", token="hf_given")
    assert tokens == ["hf_given", "hf_given"]
    assert messages == ["protected v1", "Upload SOPHON-protected model"]


def test_stale_files_in_subfolders_of_the_remote_are_kept(tmp_path, hub):
    folder = protected_folder(tmp_path / "out")
    remote = hub.branch_dir("me/vit-sophon")
    (remote / "onnx").mkdir(parents=True)
    (remote / "onnx" / "model.safetensors").write_bytes(b"an export the publisher keeps")
    (remote / "model.safetensors").write_bytes(b"old weights")
    push_folder(folder, "me/vit-sophon")
    assert "onnx/model.safetensors" in hub.files("me/vit-sophon")
    assert (remote / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()


# ---------------------------------------------------------------------- found by reviewing the publish path
@pytest.mark.parametrize("status", [403, 500])
def test_cli_push_that_fails_puts_the_card_back(tmp_path, hub, status, capsys):
    folder = protected_folder(tmp_path / "out")
    before = snapshot(folder)
    hub.fail_next_commit = http_error(status, "refused")
    with pytest.raises(SystemExit, match="Nothing in .* was changed"):
        # New details rewrite the card before the upload: a push that fails must not keep that rewrite.
        cli_main(["push", "--model", str(folder), "--repo-id", "me/vit-sophon", "--original-domain", "new words"])
    assert snapshot(folder) == before
    out = capsys.readouterr().out  # the "writing README.md" line is followed by what became of it
    assert out.index("writing") < out.index("The push did not happen: ") and "put back as it was" in out
    assert cli_main(["push", "--model", str(folder), "--repo-id", "me/vit-sophon"]) == 0  # the card names the repo
    capsys.readouterr()
    hub.fail_next_commit = http_error(status, "refused")
    with pytest.raises(SystemExit, match="Nothing in .* was changed"):  # a current card: nothing to put back
        cli_main(["push", "--model", str(folder), "--repo-id", "me/vit-sophon"])
    out = capsys.readouterr().out
    assert "writing" not in out and "put back" not in out


def test_cli_push_of_pickle_only_weights_neither_writes_a_card_nor_unpickles(tmp_path, hub, monkeypatch):
    folder = tmp_path / "out"
    model = tiny_vit()
    model.save_pretrained(folder)
    classification_report(model).save(str(folder))
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    before = snapshot(folder)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called on a pickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(SystemExit, match=r"no safetensors weights.*Nothing in .* was changed"):
        cli_main(["push", "--model", str(folder), "--repo-id", "me/vit-sophon"])
    assert snapshot(folder) == before and hub.calls == []
    with pytest.raises(OSError):  # loading for verify/attack: the safetensors weights or nothing
        load_pretrained_model(folder)


def test_report_companions_travel_only_with_their_report(tmp_path, hub):
    folder = protected_folder(tmp_path / "out")
    (folder / "report.json").unlink()  # what the refusal of a stale report tells the user to do
    write_model_card(folder)
    upload, skipped = select_files(folder)
    assert {"report.md", "attack_curves.png"} <= set(skipped) and "report.md" not in upload
    push_folder(folder, "me/vit-sophon")
    assert not {"report.md", "attack_curves.png"} & set(hub.files("me/vit-sophon"))


def test_models_saved_inside_the_folder_stay_local(tmp_path, hub):
    folder = protected_folder(tmp_path / "out")
    tiny_vit(seed=1).save_pretrained(folder / "unprotected")  # e.g. unprotected_output_dir: out/unprotected
    push_folder(folder, "me/vit-sophon")
    arrived = hub.files("me/vit-sophon")
    assert "model.safetensors" in arrived and not [name for name in arrived if "/" in name]


def test_original_metrics_and_a_report_with_its_own_agree_on_the_card(tmp_path, hub):
    model = tiny_vit()
    folder = tmp_path / "out"
    model.save_pretrained(folder)
    report = classification_report(model)
    report.original = {"protected": 0.984, "unprotected": 0.986}
    report.save(str(folder))
    write_model_card(folder, original_metrics={"protected": 0.97, "unprotected": 0.99})
    push_folder(folder, "me/vit-sophon")  # used to be refused forever: the card said 0.97, the report 0.984
    card = ModelCard.load(hub.branch_dir("me/vit-sophon") / "README.md")
    original = {
        r.metric_args["start"]: r.metric_value for r in card.data.eval_results if "attack" not in r.metric_args
    }
    assert original == {"protected": 0.984, "unprotected": 0.986}


def _vit_trainer(output_dir, model=None):
    """A SophonTrainer of a tiny ViT with one outer iteration, for card and push tests."""
    from conftest import image_dataset, tiny_config

    from sophon_hf import SophonTrainer

    return SophonTrainer(
        model if model is not None else tiny_vit(),
        args=tiny_config(output_dir, max_steps=1),
        train_dataset=image_dataset(16, seed=1),
        restricted_dataset=image_dataset(16, seed=2),
    )


def test_local_paths_are_never_published_as_base_model(tmp_path, hub):
    model = tiny_vit()
    model.config._name_or_path = str(tmp_path / "gone" / "pretrained")  # loaded from a folder deleted since
    trainer = _vit_trainer(tmp_path / "out", model)
    trainer.save_model()
    assert ModelCard.load(tmp_path / "out" / "README.md").data.base_model is None
    with pytest.raises(SystemExit, match="is not a Hub model id"):
        cli_main(["push", "--model", str(tmp_path / "out"), "--repo-id", "me/x", "--base-model", "/tmp/my/model"])


def test_cli_push_card_names_the_repo_it_is_published_in(tmp_path, hub):
    folder = protected_folder(tmp_path / "protected")  # a card written for the local folder, matching its report
    assert cli_main(["push", "--model", str(folder), "--repo-id", "me/mnist-sophon", "--license", "apache-2.0"]) == 0
    card = ModelCard.load(hub.branch_dir("me/mnist-sophon") / "README.md")
    assert card.data.model_name == "mnist-sophon" and card.data.license == "apache-2.0"
    assert 'from_pretrained("me/mnist-sophon")' in card.text and "path/to/this/model" not in card.text
    assert "sophon-hf verify --model me/mnist-sophon" in card.text


def test_trainer_push_to_hub_passes_card_options_like_trainer(tmp_path, hub):
    trainer = _vit_trainer(tmp_path / "vit-protected")
    trainer.push_to_hub(license="mit", dataset_name="me/digits", tags="mnist", finetuned_from="google/vit-base")
    card = ModelCard.load(hub.branch_dir("me/vit-protected") / "README.md")
    assert card.data.license == "mit" and card.data.datasets == ["me/digits"] and "mnist" in card.data.tags
    assert card.data.base_model == "google/vit-base"
    trainer.save_model()  # a later save keeps the publisher's options
    assert ModelCard.load(tmp_path / "vit-protected" / "README.md").data.license == "mit"
    # Trainer's example scripts pass options a SOPHON card has no place for: ignored, not an error.
    trainer.create_model_card(language="en", tasks="image-classification", finetuned_from="./local-folder")
    assert ModelCard.load(tmp_path / "vit-protected" / "README.md").data.base_model == "google/vit-base"  # not a path
    with pytest.raises(TypeError, match=r"unsupported argument\(s\) \['bogus'\]"):
        trainer.push_to_hub(bogus=1)


def test_trainer_push_that_cannot_happen_saves_nothing(tmp_path, hub, monkeypatch):
    # An earlier model saved in the output folder, with its card: a refused push must not overwrite them.
    trainer = _vit_trainer(tmp_path / "vit-protected")
    trainer.save_model()
    before = snapshot(tmp_path / "vit-protected")
    trainer.model = tiny_vit(seed=1)  # what the trainer would save now differs from the folder

    trainer.args.hub_model_id = "bad//id"
    with pytest.raises(ValueError, match="not a valid Hub repo id"):
        trainer.push_to_hub()
    trainer.args.hub_model_id = "me/vit-protected"
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(HubPublishError, match=r"No Hugging Face token.*Nothing was saved"):
        trainer.push_to_hub()
    assert snapshot(tmp_path / "vit-protected") == before
    assert hub.calls == []


def test_a_diverged_run_is_never_pushed_and_an_early_stop_is_on_the_card(tmp_path, hub):
    trainer = _vit_trainer(tmp_path / "vit-protected")
    trainer.args.max_steps, trainer.args.inner_optimizers = 5, ["sgd:1e30"]  # the meta-gradient blows up at once
    trainer.train()
    assert trainer.diverged
    with pytest.raises(RuntimeError, match=r"Not pushing: protection diverged \(the suppression meta-gradient"):
        trainer.push_to_hub()
    assert hub.calls == [] and not (tmp_path / "vit-protected" / "model.safetensors").exists()
    trainer.args.push_to_hub = True  # Trainer's save_model would push too: the work is kept locally, not pushed
    trainer.save_model()
    assert hub.calls == [] and (tmp_path / "vit-protected" / "model.safetensors").is_file()
    card = (tmp_path / "vit-protected" / "README.md").read_text()  # it does not claim 5 outer iterations
    assert "**Protection stopped** after 0 of 5 outer iterations: the suppression meta-gradient" in card
    # `sophon-hf push` re-renders the card from what the trainer stored next to it, and refuses the folder.
    write_model_card(tmp_path / "vit-protected", license="mit")
    assert "after 0 of 5 outer iterations" in (tmp_path / "vit-protected" / "README.md").read_text()
    with pytest.raises(SystemExit, match="holds the weights of a protection that diverged"):
        cli_main(["push", "--model", str(tmp_path / "vit-protected"), "--repo-id", "me/vit-protected"])
    assert hub.calls == []


def test_trainer_card_keeps_the_publishers_name_and_tags_and_names_the_namespaced_repo(tmp_path, hub):
    trainer = _vit_trainer(tmp_path / "vit-protected")
    trainer.create_model_card(model_name="My protected ViT", tags=["mnist"])
    trainer.save_model()  # a later save keeps them
    card = ModelCard.load(tmp_path / "vit-protected" / "README.md")
    assert card.data.model_name == "My protected ViT" and "mnist" in card.data.tags
    trainer.push_to_hub()  # no hub_model_id: the repo is "vit-protected" under the token's user
    pushed = ModelCard.load(hub.branch_dir("me/vit-protected") / "README.md").text
    assert 'from_pretrained("me/vit-protected")' in pushed


def test_cli_push_keeps_a_card_the_publisher_edited(tmp_path, hub, capsys):
    folder = protected_folder(tmp_path / "out")
    card = folder / "README.md"
    card.write_text(card.read_text() + "\n## Our own notes\n\nHand-written.\n")
    assert cli_main(["push", "--model", str(folder), "--repo-id", "me/vit-sophon"]) == 0
    assert "Our own notes" in card.read_text()  # only the repo changed: the edited card is published as it is
    assert "Our own notes" in (hub.branch_dir("me/vit-sophon") / "README.md").read_text()
    assert "edited after sophon_hf wrote it" in capsys.readouterr().out
    # New details rewrite the card: the edited version is saved aside (and not uploaded), never lost.
    assert cli_main(["push", "--model", str(folder), "--repo-id", "me/vit-sophon", "--license", "mit"]) == 0
    assert "Our own notes" in (folder / "README.md.edited").read_text()
    assert "README.md.edited" not in hub.files("me/vit-sophon")
    out = capsys.readouterr().out
    assert "Keeping" not in out and "saved as" in out
    # Edited again and rewritten again: the second version gets its own copy, the first one stays.
    card.write_text(card.read_text() + "\n## Second notes\n")
    assert cli_main(["push", "--model", str(folder), "--repo-id", "me/vit-sophon", "--license", "apache-2.0"]) == 0
    assert "Our own notes" in (folder / "README.md.edited").read_text()
    assert "Second notes" in (folder / "README.md.edited.1").read_text()
    assert "Second notes" not in card.read_text() and "apache-2.0" in card.read_text()


def test_cli_push_replaces_a_readme_that_is_no_sophon_card(tmp_path, hub, capsys):
    folder = protected_folder(tmp_path / "out")
    (folder / "sophon_card.json").unlink()
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# my model\n")
    assert cli_main(["push", "--model", str(folder), "--repo-id", "me/vit-sophon"]) == 0
    out = capsys.readouterr().out
    assert "Model card not a SOPHON card: writing" in out and "edited after" not in out
    assert (folder / "README.md.edited").read_text() == "---\nlicense: mit\n---\n# my model\n"
    published = ModelCard.load(hub.branch_dir("me/vit-sophon") / "README.md")
    assert "sophon" in published.data.tags and published.data.eval_results  # the SOPHON card with its numbers
    # A SOPHON card without a sidecar (`generate_model_card(...).save()`, older versions) is the publisher's: kept.
    (folder / "sophon_card.json").unlink()
    card = generate_model_card(
        restricted_domain="street signs", report=json.loads((folder / "report.json").read_text())
    )
    card.save(folder / "README.md")
    assert cli_main(["push", "--model", str(folder), "--repo-id", "me/vit-sophon"]) == 0
    assert "street signs" in (hub.branch_dir("me/vit-sophon") / "README.md").read_text()
    assert "edited after sophon_hf wrote it" in capsys.readouterr().out


def test_a_report_whose_derived_numbers_disagree_with_its_curves_is_not_published(tmp_path, hub):
    folder = protected_folder(tmp_path / "out")
    report = json.loads((folder / "report.json").read_text())
    honest = {a["name"]: a["head_start"] for a in report["attacks"]}
    broken = report["summary"]["worst_attack"]
    assert honest[broken] > 0
    # Edited to claim no head start: the verdict, the head start and the summary, but not the curves.
    record = next(a for a in report["attacks"] if a["name"] == broken)
    record["head_start"], record["verdict"] = -0.1, "no head start over scratch at the end"
    report["summary"].update(worst_attack="full-sgd_momentum-lr0.01", attacks_with_head_start=[])
    (folder / "report.json").write_text(json.dumps(report))
    before = snapshot(folder)
    with pytest.raises(SystemExit, match="holds numbers its own curves do not give") as error:
        cli_main(["push", "--model", str(folder), "--repo-id", "me/vit-sophon"])
    assert "summary.worst_attack" in str(error.value) and f"{broken}: head_start is -0.1" in str(error.value)
    assert snapshot(folder) == before and hub.calls == []
    # The card is rendered from the curves, whatever the summary says.
    text = write_model_card(folder).read_text()
    assert f"**{broken}**" in text and f"+{honest[broken]:.4f}" in text
    assert "no head start over scratch at the end | " not in text.split(f"**{broken}**")[1].split("\n")[0]


def test_cli_push_names_the_namespaced_repo_and_renames_on_a_second_repo(tmp_path, hub):
    folder = protected_folder(tmp_path / "out")
    assert cli_main(["push", "--model", str(folder), "--repo-id", "first-repo"]) == 0
    first = ModelCard.load(hub.branch_dir("me/first-repo") / "README.md")
    assert first.data.model_name == "first-repo" and "sophon-hf verify --model me/first-repo" in first.text
    assert cli_main(["push", "--model", str(folder), "--repo-id", "me/second-repo"]) == 0
    assert ModelCard.load(hub.branch_dir("me/second-repo") / "README.md").data.model_name == "second-repo"


def test_a_local_base_model_kept_by_an_older_version_is_dropped(tmp_path, hub):
    folder = protected_folder(tmp_path / "out")
    sidecar = folder / "sophon_card.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "base_model": "/home/me/models/vit"}))
    assert cli_main(["push", "--model", str(folder), "--repo-id", "me/vit-sophon", "--license", "mit"]) == 0
    assert ModelCard.load(hub.branch_dir("me/vit-sophon") / "README.md").data.base_model is None


@pytest.mark.parametrize("status", [408, 409, 429])
def test_transient_hub_errors_say_to_push_again(tmp_path, hub, status):
    folder = protected_folder(tmp_path / "out")
    hub.fail_next_commit = http_error(status, "busy")
    with pytest.raises(HubPublishError, match="run the same push again"):
        push_folder(folder, "me/vit-sophon")


def test_hub_refusals_and_offline_mode_get_advice_that_works(tmp_path, hub):
    from huggingface_hub.errors import OfflineModeIsEnabled

    folder = protected_folder(tmp_path / "out")
    hub.fail_next_commit = http_error(400, '"base_model" is not a valid model id')
    with pytest.raises(HubPublishError, match="refused the commit .*fix what the Hub names") as refused:
        push_folder(folder, "me/vit-sophon")
    assert "run the same push again" not in str(refused.value)  # the same content would be refused again
    hub.fail_next_commit = OfflineModeIsEnabled("offline")
    with pytest.raises(HubPublishError, match="HF_HUB_OFFLINE is set.*unset it"):
        push_folder(folder, "me/vit-sophon")


def test_offline_mode_is_refused_before_the_card_is_touched(tmp_path, hub, monkeypatch):
    folder = protected_folder(tmp_path / "out", with_report=False)
    (folder / "README.md").unlink()  # `sophon-hf push` would write a missing card before uploading
    before = snapshot(folder)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    # Said first, also without a token: logging in would not make the push possible.
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(SystemExit, match=r"HF_HUB_OFFLINE is set, so nothing can be uploaded.*Nothing in .* changed"):
        cli_main(["push", "--model", str(folder), "--repo-id", "me/vit-sophon"])
    assert snapshot(folder) == before and hub.calls == []


def test_files_describing_an_earlier_model_are_removed_from_the_branch(tmp_path, hub):
    folder = protected_folder(tmp_path / "out")
    remote = hub.branch_dir("me/vit-sophon")
    remote.mkdir(parents=True)
    earlier = {"samples.png", "preprocessor_config.json", "scheduler_config.json", "tokenizer.json", "vocab.txt"}
    earlier |= {"sophon_card.json"}  # the earlier card's inputs; this folder's own is uploaded when it has one
    (folder / "sophon_card.json").unlink()
    for name in earlier:
        (remote / name).write_bytes(b"from the model pushed before")
    push_folder(folder, "me/vit-sophon")
    assert not earlier & set(hub.files("me/vit-sophon"))


# ---------------------------------------------------------------------- mutation-testing round on this session's code
def test_cli_push_keeps_a_chosen_name_and_renames_a_folder_name(tmp_path, hub):
    chosen = protected_folder(tmp_path / "chosen")
    write_model_card(chosen, model_name="My ViT")
    assert cli_main(["push", "--model", str(chosen), "--repo-id", "me/x"]) == 0
    assert ModelCard.load(hub.branch_dir("me/x") / "README.md").data.model_name == "My ViT"
    # A name that was only the folder's (what trainer.save_model stores) becomes the repo's.
    named = protected_folder(tmp_path / "vit-protected")
    write_model_card(named, model_name="vit-protected")
    assert cli_main(["push", "--model", str(named), "--repo-id", "me/other"]) == 0
    assert ModelCard.load(hub.branch_dir("me/other") / "README.md").data.model_name == "other"


@pytest.mark.parametrize("failure", ["refused", "interrupted"])
def test_cli_push_that_fails_leaves_a_folder_without_a_card_without_one(tmp_path, hub, monkeypatch, failure):
    folder = tmp_path / "out"
    tiny_vit().save_pretrained(folder)
    before = snapshot(folder)
    if failure == "refused":
        hub.fail_next_commit = http_error(403)
        with pytest.raises(SystemExit):
            cli_main(["push", "--model", str(folder), "--repo-id", "me/vit-sophon"])
    else:
        hub.fail_next_commit = KeyboardInterrupt()
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C propagates, after the folder is put back
            cli_main(["push", "--model", str(folder), "--repo-id", "me/vit-sophon"])
    assert snapshot(folder) == before


def test_every_tokenizer_file_of_an_earlier_model_leaves_the_branch(tmp_path, hub):
    from sophon_hf.hub import STALE_REMOTE_PATTERNS

    folder = protected_folder(tmp_path / "out")
    remote = hub.branch_dir("me/vit-sophon")
    remote.mkdir(parents=True)
    names = ["tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt"]
    for name in [*names, "spiece.model"]:
        (remote / name).write_bytes(b"earlier")
    push_folder(folder, "me/vit-sophon")
    assert not {*names, "spiece.model"} & set(hub.files("me/vit-sophon"))
    assert "*.model" in STALE_REMOTE_PATTERNS


def test_resolve_repo_id_uses_the_given_token_and_falls_back_offline(monkeypatch):
    from huggingface_hub.errors import OfflineModeIsEnabled

    from sophon_hf.hub import resolve_repo_id

    monkeypatch.setattr(HfApi, "whoami", lambda api, **kwargs: {"name": f"user-of-{api.token}"})
    assert resolve_repo_id("x", token="hf_other") == "user-of-hf_other/x"
    assert resolve_repo_id("ns/x", token="hf_other") == "ns/x"

    def offline(api, **kwargs):
        raise OfflineModeIsEnabled("offline")

    monkeypatch.setattr(HfApi, "whoami", offline)
    assert resolve_repo_id("x", token="hf_other") == "x"  # the push itself reports the problem


def test_sharded_weights_publish_and_a_folder_without_config_is_refused(tmp_path, hub):
    sharded = tmp_path / "sharded"
    tiny_vit().save_pretrained(sharded, max_shard_size="2KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    write_model_card(sharded)
    push_folder(sharded, "me/sharded")
    assert "model.safetensors.index.json" in hub.files("me/sharded")
    no_config = protected_folder(tmp_path / "no-config")
    (no_config / "config.json").unlink()
    calls = len(hub.calls)
    with pytest.raises(ValueError, match="has no config.json"):
        push_folder(no_config, "me/x")
    assert len(hub.calls) == calls


def test_the_cards_prose_and_metadata_both_give_the_reports_original_numbers(tmp_path):
    model = tiny_vit()
    model.save_pretrained(tmp_path)
    report = classification_report(model)
    report.original = {"protected": 0.984, "unprotected": 0.986}
    report.save(str(tmp_path))
    write_model_card(tmp_path, original_metrics={"protected": 0.97, "unprotected": 0.99})
    text = (tmp_path / "README.md").read_text()
    assert "protected 0.984" in text and "0.97," not in text


def test_a_folder_with_a_tokenizer_gets_a_card_that_loads_it(tmp_path):
    from conftest import tiny_bert
    from transformers import BertTokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good"]))
    tiny_bert().save_pretrained(tmp_path / "bert")
    BertTokenizer(str(vocab)).save_pretrained(tmp_path / "bert")
    write_model_card(tmp_path / "bert")
    assert "AutoTokenizer.from_pretrained" in (tmp_path / "bert" / "README.md").read_text()


def test_trainer_card_takes_trainers_dataset_spelling_and_warns_about_ignored_options(tmp_path, caplog):
    trainer = _vit_trainer(tmp_path / "out")
    with caplog.at_level("WARNING"):
        trainer.create_model_card(dataset="me/digits", language="en", finetuned_from="./local", model_name="Named")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.datasets == ["me/digits"] and card.data.model_name == "Named"  # the card was written
    assert "are ignored" in caplog.text and "is not a Hub model id" in caplog.text


def test_an_existing_relative_folder_is_not_published_as_base_model(tmp_path, monkeypatch):
    from sophon_hf.trainer import _is_hub_model_id

    monkeypatch.chdir(tmp_path)
    assert _is_hub_model_id("models/vit")  # reads like a Hub id ...
    (tmp_path / "models" / "vit").mkdir(parents=True)
    assert not _is_hub_model_id("models/vit")  # ... but it is a local folder
