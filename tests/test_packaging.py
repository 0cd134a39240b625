"""`pip install .` (not editable) must ship every module, script, recipe and template.

An editable install (what `make install` does) imports from the source tree and hides a package missing from
pyproject's explicit `packages` list; a user's `pip install .` would then get a `sophon-hf` that cannot import it.
"""

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_SUFFIXES = {".py", ".yaml", ".md", ".jinja", ".png"}


def _setuptools_config() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def _shipped_folders() -> dict[str, Path]:
    """Package name -> folder, for every folder under the mapped roots that holds files a user needs."""
    folders = {}
    for package, directory in _setuptools_config()["package-dir"].items():
        root = ROOT / directory
        for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
            if "__pycache__" in folder.parts or not any(f.suffix in SHIPPED_SUFFIXES for f in folder.iterdir()):
                continue
            folders[".".join([package, *folder.relative_to(root).parts])] = folder
    return folders


def test_every_folder_of_modules_or_data_is_a_listed_package():
    folders = _shipped_folders()
    assert {"sophon_hf.commands", "sophon_hf.trainers.configs", "sophon_hf.model_cards"} <= set(folders)
    missing = sorted(set(folders) - set(_setuptools_config()["packages"]))
    assert not missing, f"not in [tool.setuptools] packages, so not installed by `pip install .`: {missing}"


def test_every_data_file_matches_a_package_data_pattern():
    package_data = _setuptools_config()["package-data"]
    for package, folder in _shipped_folders().items():
        for path in folder.iterdir():
            if path.suffix in SHIPPED_SUFFIXES - {".py"}:
                patterns = package_data.get(package, [])
                assert any(fnmatch.fnmatch(path.name, p) for p in patterns), f"{path} is not package data"


def test_the_command_line_starts_without_loading_torch():
    # `sophon-hf --help` and argument errors should answer at once; the public names load on first use.
    import subprocess
    import sys

    code = "import sys, sophon_hf.cli; sophon_hf.cli.build_parser(); print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"
    code = "from sophon_hf import SophonTrainer, kl_uniform; print(SophonTrainer.__module__, kl_uniform.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.split() == ["sophon_hf.trainer", "sophon_hf.losses"]
