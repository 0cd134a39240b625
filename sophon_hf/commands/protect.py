"""`sophon-hf protect --config YAML`: run a protection recipe (classifier or diffusion) in this process.

For several processes or GPUs, launch the same recipe with accelerate instead:
`accelerate launch -m sophon_hf.trainers.protect_classifier --config RECIPE.yaml`.
"""

import argparse

import yaml

from . import user_errors


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "protect",
        help="protect a model from a YAML recipe (see trainers/configs; sophon_hf/trainers/configs once installed)",
        description="Protect a classifier or a diffusion UNet from a YAML recipe: a file, or the name of a shipped "
        "recipe such as mnist_vit_cpu.yaml. Extra arguments override recipe fields (e.g. --max_steps 50); "
        "`python -m sophon_hf.trainers.protect_classifier --help` (or `protect_diffusion`) lists them.",
    )
    parser.add_argument("--config", required=True, help="recipe YAML file or shipped recipe name")
    parser.set_defaults(func=run, pass_unknown=True)


def run(args: argparse.Namespace) -> int:
    from ..trainers import protect_classifier, protect_diffusion

    try:
        path = protect_classifier.resolve_config_path(args.config)
        with open(path) as f:
            recipe = yaml.safe_load(f) or {}
        if not isinstance(recipe, dict):
            raise ValueError(
                f"{path} must hold a mapping of recipe fields (field: value), not a {type(recipe).__name__}."
            )
        script = protect_diffusion if recipe.get("restricted_loss") == "denial_of_service" else protect_classifier
        parsed = script.parse_args(["--config", path, *args.extra])
    except yaml.YAMLError as error:
        raise SystemExit(f"sophon-hf protect: {args.config} is not valid YAML: {error}") from None
    except (FileNotFoundError, ValueError) as error:  # a missing recipe, a misspelt field, a refused setting
        raise SystemExit(f"sophon-hf protect: {error}") from None
    with user_errors("protect"):
        script.main(*parsed)
    return 0
