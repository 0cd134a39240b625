"""Model cards for SOPHON-protected models: what the model is for, what it resists, and the measured numbers.

The card is rendered from the Jinja template shipped in `sophon_hf.model_cards` (the top-level `model_cards/`
folder of the repository, installed as package data). Its metadata carries a `model-index` built from the attack
report, so the Hub shows the measured resistance and `ModelCard.load(...).data.eval_results` gives the numbers back.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import re
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import jinja2
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .report import recomputed_report, signed

logger = logging.getLogger(__name__)

TEMPLATE_NAME = "sophon_model_card.md.jinja"

TASKS = ("image-classification", "text-classification", "unconditional-image-generation")
LIBRARIES = ("transformers", "diffusers")
STARTS = ("protected", "unprotected", "scratch")

SOPHON_CITATION = """\
@inproceedings{deng2024sophon,
    title         = {{SOPHON}: Non-Fine-Tunable Learning to Restrain Task Transferability For Pre-trained Models},
    author        = {Jiangyi Deng and Shengyuan Pang and Yanjiao Chen and Liangming Xia and Yijie Bai and Haiqin Weng and Wenyuan Xu},
    booktitle     = {2024 IEEE Symposium on Security and Privacy (SP)},
    year          = {2024},
    eprint        = {2404.12699},
    archivePrefix = {arXiv}
}"""

# Attacks no sophon_hf measurement covers: the card lists them so that silence is never read as resistance.
OUTSIDE_HARNESS = {
    "classification": (
        "parameter-efficient methods other than LoRA (prefix or prompt tuning, adapters, IA3, BitFit)",
        "quantising, pruning or distilling the model before fine-tuning it",
        "distilling the protected features into a fresh model, or probing intermediate layers instead of the output",
        "fine-tuning on the original and the restricted domain together, or on a related proxy domain first",
        "more restricted-domain data, larger budgets or different data augmentation than the measurement used",
        "combinations of the above, and adaptive attacks designed against SOPHON specifically",
    ),
    "diffusion": (
        "parameter-efficient methods other than LoRA, and DreamBooth / textual-inversion style personalisation",
        "quantising, pruning or distilling the UNet before fine-tuning it",
        "training with other noise schedules, prediction targets (v-prediction) or timestep weightings",
        "fine-tuning on the original and the restricted domain together, or on a related proxy domain first",
        "more restricted-domain data or larger budgets than the measurement used",
        "combinations of the above, and adaptive attacks designed against SOPHON specifically",
    ),
}

# SophonConfig fields worth showing on a card, in reading order, with what they mean there.
CARD_HYPERPARAMETERS = {
    "restricted_loss": "suppression loss on the restricted domain",
    "feature_suppression_weight": "weight of the restricted-feature suppression term",
    "simulation_strategies": "simulated attacker strategies, sampled per outer iteration",
    "inner_optimizers": "simulated attacker optimizers (`name:lr`), sampled per outer iteration",
    "inner_steps": "simulated fine-tuning steps per outer iteration",
    "simulation_horizon": "steps a persistent simulated attacker takes before a fresh one starts",
    "simulation_support_size": "restricted examples each simulated attacker fine-tunes on",
    "inner_learning_rate": "default simulated attacker step size",
    "first_order": "first-order meta-gradient",
    "fts_learning_rate": "suppression (meta-gradient) step size",
    "fts_max_grad_norm": "meta-gradient clip norm",
    "learning_rate": "original-domain (normal training) step size",
    "lr_scheduler_type": "schedule of the normal-training step size",
    "fts_follows_lr_schedule": "the suppression step size follows that schedule",
    "ntr_steps": "original-domain steps per outer iteration",
    "max_steps": "outer iterations",
    "lora_r": "rank of the simulated LoRA attacker",
    "diffusion_timestep": "fixed suppression timestep (empty: uniform over the schedule)",
    "diffusion_timestep_range": "suppression timesteps, uniform in this inclusive range",
    "original_accuracy_floor": "original-domain accuracy floor",
    "seed": "random seed",
}

# Written next to README.md by `write_model_card`: the card's inputs that only the publisher knows.
CARD_METADATA_FILE = "sophon_card.json"
CARD_HASH_KEY = "card_sha256"
PUBLISHER_FIELDS = (
    "model_name",
    "base_model",
    "original_domain",
    "restricted_domain",
    "sophon_config",
    "original_metrics",
    "datasets",
    "repo_id",
    "tags",
    "license",
)

_AUTO_CLASSES = {
    "image-classification": "AutoModelForImageClassification",
    "text-classification": "AutoModelForSequenceClassification",
}
_TASK_LABELS = {
    "image-classification": "image classification",
    "text-classification": "text classification",
    "unconditional-image-generation": "unconditional image generation",
}


def _format_value(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return "diverged"
        return f"{value:.4f}" if value == 0 or abs(value) >= 0.01 else f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(f"`{v}`" for v in value) if value else "none"
    return str(value)


def _format_setting(value: Any) -> str:
    if isinstance(value, str):
        return f"`{value}`"
    if isinstance(value, float):
        return f"{value:g}"
    return _format_value(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _slug(text: str) -> str:
    # model-index dataset types are identifiers; keep Hub ids ("org/name") as they are.
    return re.sub(r"[^A-Za-z0-9_./-]+", "-", text.strip()).strip("-").lower() or "dataset"


def final_metrics(attack: dict[str, Any]) -> dict[str, float | None]:
    """The metric each start reached at the end of an attack, as the attacker would keep it.

    The harness's `effective_final` when present (a diverged run counts with its best value before divergence: an
    attacker keeps the last good checkpoint), else `final`.

    Args:
        attack (`dict`):
            One entry of `report["attacks"]`.

    Returns:
        `dict`: start (`"protected"`, `"unprotected"`, `"scratch"`) -> value, `None` where there is none.

    Example:
    ```python
    >>> final_metrics({"final": {"protected": None, "scratch": 0.8}, "effective_final": {"protected": 0.4, "scratch": 0.8}})
    {'protected': 0.4, 'unprotected': None, 'scratch': 0.8}
    ```
    """
    effective, final = attack.get("effective_final") or {}, attack.get("final") or {}
    values = {}
    for start in STARTS:
        value = effective.get(start, final.get(start))
        values[start] = float(value) if _is_number(value) else None
    return values


def attack_advantage(attack: dict[str, Any], higher_is_better: bool) -> float | None:
    """The head start the protected model gave the attacker over scratch (positive: the protection failed).

    Args:
        attack (`dict`):
            One entry of `report["attacks"]`.
        higher_is_better (`bool`):
            `report["higher_is_better"]`: whether a larger metric is better for the attacker.

    Returns:
        `float` or `None`: the harness's `head_start` when recorded, else `protected - scratch` (accuracy-like
        metrics) or `scratch - protected` (error-like metrics); `None` without both numbers.

    Example:
    ```python
    >>> attack_advantage({"final": {"protected": 0.3, "scratch": 0.8}}, higher_is_better=True)
    -0.5
    ```
    """
    if _is_number(attack.get("head_start")):
        return float(attack["head_start"])
    final = final_metrics(attack)
    if final["protected"] is None or final["scratch"] is None:
        return None
    difference = final["protected"] - final["scratch"]
    return difference if higher_is_better else -difference


def eval_results_from_report(
    report: dict[str, Any],
    *,
    task: str,
    original_domain: str | None = None,
    restricted_domain: str | None = None,
    original_metrics: dict[str, float] | None = None,
) -> list[EvalResult]:
    """The `model-index` entries of a card, built from an attack report.

    Restricted domain: one result (task x restricted test set) whose metrics are the final metric of every attack
    from every start, named `"<metric> after <attack> (<start>)"` and tagged with `metric_args={"attack": ...,
    "start": ...}` so that a reader (and `sophon-hf verify`) can match them to `report.json`. Original domain: one
    result with the protected and unprotected metric. Diverged or missing numbers are left out.

    Args:
        report (`dict`):
            Content of `report.json` (`ResistanceReport.to_dict()`).
        task (`str`):
            Hub task type, e.g. `"image-classification"`.
        original_domain (`str`, *optional*), restricted_domain (`str`, *optional*):
            Names of the domains; used as dataset names.
        original_metrics (`dict`, *optional*):
            `{"protected": float, "unprotected": float}` on the original domain, used when the report has no
            `original` section (a report's own measurement is what the card must publish).

    Returns:
        `list[EvalResult]`: one entry per (attack, start) with a finite final metric, then the original-domain ones.

    Example:
    ```python
    >>> report = {"metric": "accuracy", "higher_is_better": True, "attacks": [
    ...     {"name": "full-adam-lr0.001", "spec": {}, "final": {"protected": 0.3, "unprotected": 0.9, "scratch": 0.8}}]}
    >>> [r.metric_value for r in eval_results_from_report(report, task="image-classification")]
    [0.3, 0.9, 0.8]
    ```
    """
    metric = report.get("metric", "metric")
    results = []
    restricted_name = restricted_domain or "restricted domain"
    for attack in report.get("attacks", []):
        for start, value in final_metrics(attack).items():
            if value is None:
                continue
            results.append(
                EvalResult(
                    task_type=task,
                    task_name="fine-tuning attack on the restricted domain",
                    dataset_type=_slug(restricted_domain) if restricted_domain else "restricted-domain",
                    dataset_name=f"{restricted_name} (restricted domain, test)",
                    dataset_split="test",
                    metric_type=metric,
                    metric_name=f"{metric} after {attack['name']} ({start})",
                    metric_value=float(value),
                    metric_args={"attack": attack["name"], "start": start},
                )
            )
    original = report.get("original") or original_metrics or {}  # the report's own measurement wins
    for start in ("protected", "unprotected"):
        value = original.get(start)
        if not _is_number(value):
            continue
        results.append(
            EvalResult(
                task_type=task,
                task_name="original domain",
                dataset_type=_slug(original_domain) if original_domain else "original-domain",
                dataset_name=f"{original_domain or 'original domain'} (original domain, test)",
                dataset_split="test",
                metric_type=metric,
                metric_name=f"{metric} ({start})",
                metric_value=float(value),
                metric_args={"start": start},
            )
        )
    return results


def framework_versions() -> dict[str, str]:
    """Versions of Python and the libraries a protected model and its measurement depend on."""
    versions = {"Python": platform.python_version()}
    for package in ("sophon_hf", "torch", "transformers", "diffusers", "peft", "accelerate", "datasets"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    versions["huggingface_hub"] = metadata.version("huggingface_hub")
    return versions


def _untested(report: dict[str, Any], task: str) -> list[str]:
    # What the harness can run and this report lacks is "not tested"; the harness's own lists keep this in sync.
    from .attacks import OPTIMIZERS, SCHEDULES, STRATEGIES, AttackSpec

    specs = [attack.get("spec", {}) for attack in report.get("attacks", [])]
    lines = []
    strategies = {spec.get("strategy") for spec in specs}
    candidates = STRATEGIES if task != "unconditional-image-generation" else ("full", "lora")
    missing = [s for s in candidates if s not in strategies]
    if missing:
        lines.append("strategies: " + ", ".join(f"`{s}`" for s in missing))
    optimizers = {spec.get("optimizer") for spec in specs}
    missing = [o for o in OPTIMIZERS if o not in optimizers]
    if missing:
        lines.append("optimizers: " + ", ".join(f"`{o}`" for o in missing))
    schedules = {spec.get("schedule", "constant") for spec in specs}
    missing = [s for s in SCHEDULES if s not in schedules]
    if missing:
        lines.append("learning-rate schedules: " + ", ".join(f"`{s}`" for s in missing))
    rates = [spec["learning_rate"] for spec in specs if _is_number(spec.get("learning_rate"))]
    if rates:
        lines.append(f"learning rates below {min(rates):g} or above {max(rates):g}")
    steps = [spec["steps"] for spec in specs if _is_number(spec.get("steps"))]
    if steps:
        lines.append(f"budgets longer than {max(steps)} steps")
    batch_sizes = {spec["batch_size"] for spec in specs if _is_number(spec.get("batch_size"))}
    if len(batch_sizes) == 1:
        lines.append(f"batch sizes other than {batch_sizes.pop()}")
    lora = [attack for attack in report.get("attacks", []) if attack.get("spec", {}).get("strategy") == "lora"]
    if lora:
        # Which modules get adapters decides what LoRA can change: on a small UNet, adapters on the attention
        # projections alone hardly fine-tune at all (RESULTS_diffusion.md, ninth session).
        named, long_defaults, unresolved = set(), set(), False
        for attack in lora:
            # Explicit targets are in the spec; defaults are resolved per model into `lora_targets` (older reports
            # lack it).
            given, resolved = attack["spec"].get("lora_target_modules"), attack.get("lora_targets")
            if given:
                named.update([given] if isinstance(given, str) else given)
            elif not resolved:
                unresolved = True
            elif len(resolved) <= 8:
                named.update(resolved)
            else:  # every layer of a convolutional network: a count reads better than dozens of names
                long_defaults.add(len(resolved))
        used = [f"`{t}`" for t in sorted(named)]
        used += [
            f"the {n} linear and convolution layers below the head (the harness's default)"
            for n in sorted(long_defaults)
        ]
        if unresolved:
            used.append(
                "the harness's default targets (a Diffusers UNet's attention projections and ResNet convolutions; "
                "else the attention query and value projections, or a fused query-key-value projection, where the "
                "model has them; else every linear and convolution layer but the head)"
            )
        lines.append("LoRA adapters on other modules than " + ", ".join(used))
        ranks = sorted({attack["spec"].get("lora_rank", AttackSpec.lora_rank) for attack in lora})
        lines.append("LoRA ranks other than " + ", ".join(str(rank) for rank in ranks))
    # An attack counts as repeated when its settings ran at two or more seeds (as `ResistanceReport.across_seeds`).
    from .report import setting_key

    seeds_per_setting: dict[str, set] = {}
    for spec in specs:
        seeds_per_setting.setdefault(setting_key(spec), set()).add(spec.get("seed", 0))
    single = sum(len(seeds) < 2 for seeds in seeds_per_setting.values())
    if single == len(seeds_per_setting):
        lines.append("more than one seed per attack (each protected or unprotected number above is a single run)")
    elif single:
        lines.append(
            f"more than one seed for {single} of the {len(seeds_per_setting)} attack settings (their protected and "
            "unprotected numbers are single runs)"
        )
    if not any("unprotected" in attack.get("curves", attack.get("final", {})) for attack in report.get("attacks", [])):
        lines.append("the unprotected original as a starting point (no reference model was given)")
    return lines


def _simulated(spec: dict[str, Any], sophon_config: dict[str, Any]) -> str:
    """Whether the protection simulated this attack: its strategy, its optimizer, and that optimizer's step size."""
    if spec.get("strategy") not in (sophon_config.get("simulation_strategies") or []):
        return "no"
    default_lr = sophon_config.get("inner_learning_rate")
    rates = {}
    for entry in sophon_config.get("inner_optimizers") or []:
        name, _, lr = str(entry).partition(":")
        rates.setdefault(name, set()).add(float(lr) if lr else default_lr)
    if spec.get("optimizer") not in rates:
        return "no"
    learning_rate = spec.get("learning_rate")
    if _is_number(learning_rate) and any(
        _is_number(r) and math.isclose(learning_rate, r) for r in rates[spec["optimizer"]]
    ):
        return "yes"
    return "optimizer only (other step size)"


def generate_model_card(
    *,
    model_name: str | None = None,
    base_model: str | None = None,
    task: str = "image-classification",
    library_name: str = "transformers",
    model_class: str | None = None,
    original_domain: str | None = None,
    restricted_domain: str | None = None,
    sophon_config: dict[str, Any] | None = None,
    report: dict[str, Any] | None = None,
    original_metrics: dict[str, float] | None = None,
    datasets: list[str] | None = None,
    repo_id: str | None = None,
    revision: str | None = None,
    tags: list[str] | None = None,
    license: str | None = None,
    curves_image: str | None = None,
    has_report_md: bool = False,
    has_image_processor: bool = False,
    has_tokenizer: bool = False,
    samples_image: str | None = None,
) -> ModelCard:
    """Render the model card of a SOPHON-protected model (pure: reads no files, writes none).

    Args:
        model_name (`str`, *optional*):
            Title of the card and name in the `model-index`. Defaults to `repo_id`, else `"sophon-protected-model"`.
        base_model (`str`, *optional*):
            Hub id of the unprotected model the protection started from.
        task (`str`, *optional*, defaults to `"image-classification"`):
            One of `"image-classification"`, `"text-classification"`, `"unconditional-image-generation"`.
        library_name (`str`, *optional*, defaults to `"transformers"`):
            `"transformers"` or `"diffusers"`.
        model_class (`str`, *optional*):
            Class of the model (e.g. `"ViTForImageClassification"`, `"UNet2DModel"`), shown in the usage snippet.
        original_domain (`str`, *optional*), restricted_domain (`str`, *optional*):
            What the model is for and what it is protected against, as the publisher names them.
        sophon_config (`dict`, *optional*):
            The protection hyper-parameters, e.g. `SophonConfig.to_dict()` (only the fields that matter are shown),
            plus `stop_reason`, `diverged`, `completed_outer_iterations` and `planned_outer_iterations` when
            protection stopped before its last outer iteration or on a guard (the card says so).
        report (`dict`, *optional*):
            Content of `report.json` from the attack harness. Without it the card says plainly that resistance has
            not been measured yet.
        original_metrics (`dict`, *optional*):
            `{"protected": float, "unprotected": float}` on the original domain, used when the report has no
            `original` section (a report's own measurement is what the card must publish).
        datasets (`list[str]`, *optional*):
            Hub dataset ids used for protection and measurement (card metadata).
        repo_id (`str`, *optional*):
            Hub repository of the model, used in the usage and reproduction commands.
        revision (`str`, *optional*):
            The branch of `repo_id` the model is published to, when it is not the default branch: the usage and
            reproduction commands load that branch.
        tags (`list[str]`, *optional*):
            Extra tags; `sophon`, `non-fine-tunable` and the task are always present.
        license (`str`, *optional*):
            License identifier of the weights.
        curves_image (`str`, *optional*):
            Relative path of the attack-curves PNG to embed (e.g. `"attack_curves.png"`).
        has_report_md (`bool`, *optional*, defaults to `False`):
            Whether a `report.md` is published next to the card (linked when true).
        has_image_processor (`bool`, *optional*, defaults to `False`):
            Whether an image processor (`preprocessor_config.json`) is published with an image classifier: the usage
            snippet then prepares an image with it; otherwise it says that no processor ships with the model.
        has_tokenizer (`bool`, *optional*, defaults to `False`):
            The same for a text classifier's tokenizer (`tokenizer_config.json`).
        samples_image (`str`, *optional*):
            Diffusion only: relative path of a PNG of images the model generates, shown under the usage snippet.

    Returns:
        [`~huggingface_hub.ModelCard`]: the card; `card.data.eval_results` holds the report's numbers.

    Example:
    ```python
    >>> from sophon_hf.model_card import generate_model_card
    >>> report = {"task": "image-classification", "metric": "accuracy", "higher_is_better": True,
    ...           "attacks": [{"name": "full-adam-lr0.001", "spec": {"strategy": "full", "optimizer": "adam"},
    ...                        "final": {"protected": 0.3, "unprotected": 0.95, "scratch": 0.8}}],
    ...           "summary": {"worst_attack": "full-adam-lr0.001", "worst_protected_minus_scratch": -0.5}}
    >>> card = generate_model_card(model_name="vit-protected", restricted_domain="CIFAR-10", report=report)
    >>> card.data.eval_results[0].metric_value
    0.3
    ```
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not supported; use one of {TASKS}.")
    if library_name not in LIBRARIES:
        raise ValueError(f"library_name={library_name!r} is not supported; use one of {LIBRARIES}.")
    is_diffusion = library_name == "diffusers"
    if base_model is not None:
        try:
            validate_repo_id(base_model)
        except HFValidationError as error:
            raise ValueError(
                f"base_model={base_model!r} is not a Hub model id ({error}): the card's base_model names the "
                "unprotected model on the Hub, e.g. 'google/vit-base-patch16-224'. Leave it unset for a local model."
            ) from None
    if report is not None and report.get("task") in TASKS and report["task"] != task:
        raise ValueError(
            f"The report measures a {report['task']!r} model but the card is for task={task!r}: pass the report "
            "that was measured on this model."
        )
    # The curves are the measurement: finals, head starts and the summary are read from them, not taken on trust.
    report = (recomputed_report(report) or report) if report is not None else None
    model_name = model_name or repo_id or "sophon-protected-model"
    sophon_config = sophon_config or {}
    original_domain = original_domain or sophon_config.get("original_domain")
    restricted_domain = restricted_domain or sophon_config.get("restricted_domain")

    eval_results = (
        eval_results_from_report(
            report,
            task=task,
            original_domain=original_domain,
            restricted_domain=restricted_domain,
            original_metrics=original_metrics,
        )
        if report is not None
        else None
    )
    card_data = ModelCardData(
        model_name=model_name,
        base_model=base_model,
        library_name=library_name,
        license=license,
        datasets=list(datasets) if datasets else None,
        pipeline_tag=task,
        tags=["sophon", "non-fine-tunable", task, *(tags or [])],
        eval_results=eval_results or None,
    )

    metric = (report or {}).get("metric", "denoising error" if is_diffusion else "accuracy")
    higher_is_better = bool((report or {}).get("higher_is_better", not is_diffusion))
    original = (report or {}).get("original") or original_metrics or {}  # the report's own measurement wins
    original_sentence = "; ".join(
        f"{start} {_format_value(original[start])}" for start in ("protected", "unprotected") if start in original
    )
    if original_sentence:
        original_sentence = f"{metric} on original-domain test data: {original_sentence}."

    context: dict[str, Any] = {
        "card_data": card_data.to_yaml(),
        "model_name": model_name,
        "base_model": base_model,
        "is_diffusion": is_diffusion,
        "task_label": _TASK_LABELS[task],
        "model_class": model_class or ("UNet2DModel" if is_diffusion else _AUTO_CLASSES[task]),
        "auto_class": _AUTO_CLASSES.get(task, ""),
        "task": task,
        "model_ref": repo_id or "path/to/this/model",
        "meta_gradient": "exact second-order" if sophon_config.get("first_order") is False else "first-order",
        "revision_arg": f", revision={revision!r}" if revision and repo_id else "",
        "revision_flag": f" --revision {revision}" if revision and repo_id else "",
        "repo_ref": repo_id or "<your-name>/<model-name>",
        "local_dir": "path/to/this/model",
        "original_domain": original_domain or "not stated by the publisher",
        "restricted_domain": restricted_domain or "not stated by the publisher",
        "original_sentence": original_sentence,
        "metric_label": metric,
        "higher_is_better": higher_is_better,
        "hyperparameter_rows": [
            {"name": name, "value": _format_setting(sophon_config[name]), "help": help_text}
            for name, help_text in CARD_HYPERPARAMETERS.items()
            # Unset options and the LoRA rank of a simulation without LoRA say nothing about this model.
            if sophon_config.get(name) is not None
            and (name != "lora_r" or "lora" in (sophon_config.get("simulation_strategies") or []))
        ],
        "early_stop": (
            f"after {sophon_config.get('completed_outer_iterations')} of "
            f"{sophon_config.get('planned_outer_iterations')} outer iterations: {sophon_config['stop_reason']}"
            if sophon_config.get("stop_reason")
            else None
        ),
        "report": report,
        "report_warnings": (report or {}).get("warnings", []),
        "curves_image": curves_image,
        "has_report_md": has_report_md,
        "has_image_processor": has_image_processor,
        "has_tokenizer": has_tokenizer,
        "samples_image": samples_image if is_diffusion else None,
        "datasets": datasets or [],
        "outside_suite": OUTSIDE_HARNESS["diffusion" if is_diffusion else "classification"],
        "framework_versions": framework_versions(),
        "citation": SOPHON_CITATION,
    }
    if report is None:
        context["headline"] = "**not measured yet** (see below); this card makes no resistance claim."
    else:
        context.update(_report_context(report, metric, higher_is_better, sophon_config, task))

    template_text = resources.files("sophon_hf.model_cards").joinpath(TEMPLATE_NAME).read_text(encoding="utf-8")
    # StrictUndefined: a typo in the template fails loudly instead of printing an empty claim.
    environment = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    content = environment.from_string(template_text).render(**context)
    return ModelCard(re.sub(r"\n{3,}", "\n\n", content).strip() + "\n")


def _describe_scratch_recipe(recipe: dict[str, Any] | str) -> str:
    if not isinstance(recipe, dict):
        return str(recipe)
    parts = []
    if "optimizer" in recipe:
        parts.append(f"`{recipe['optimizer']}`")
    if _is_number(recipe.get("learning_rate")):
        parts.append(f"learning rate {recipe['learning_rate']:g}")
    elif recipe.get("learning_rates"):
        rates = ", ".join(f"{rate:g}" for rate in recipe["learning_rates"])
        parts.append(
            f"the best of learning rates {rates} at each budget (chosen on the test set; the table shows the rate "
            "chosen next to each scratch value)"
        )
    if recipe.get("schedule"):
        parts.append(f"{recipe['schedule']} schedule")
    if _is_number(recipe.get("weight_decay")):
        parts.append(f"weight decay {recipe['weight_decay']:g}")
    if not parts:
        return ""
    described = ", ".join(parts) + "; the same steps, batch size and seed as each attack"
    if _is_number(recipe.get("initialisations")) and recipe["initialisations"] > 1:
        described += f"; the mean curve of {recipe['initialisations']} random initialisations"
    return described


def _report_context(
    report: dict[str, Any], metric: str, higher_is_better: bool, sophon_config: dict[str, Any], task: str
) -> dict[str, Any]:
    attacks = report.get("attacks", [])
    tolerance = float(report.get("tolerance") or 0.0)
    advantages = {attack["name"]: attack_advantage(attack, higher_is_better) for attack in attacks}
    worst = (report.get("summary") or {}).get("worst_attack")
    if worst is None and any(v is not None for v in advantages.values()):
        worst = max((v, name) for name, v in advantages.items() if v is not None)[1]
    simulated_column = bool(sophon_config.get("simulation_strategies") and sophon_config.get("inner_optimizers"))
    # A tuned scratch baseline names the rate it chose for each attack's budget next to its value.
    tuned_scratch = all(_is_number(attack.get("scratch_learning_rate")) for attack in attacks)

    columns = ["attack", "strategy", "optimizer", "learning rate", "steps", "protected", "unprotected", "scratch"]
    columns += ["head start over scratch", "verdict"] + (["seen in simulation"] if simulated_column else [])
    rows = []
    for attack in attacks:
        spec, final, advantage = attack.get("spec", {}), final_metrics(attack), advantages[attack["name"]]
        diverged = attack.get("diverged") or {}
        verdict = attack.get("verdict")
        if verdict is None:
            if advantage is None:
                verdict = "no scratch baseline"
            elif advantage <= tolerance:
                verdict = "no head start over scratch at the end"
            else:
                verdict = f"head start of {advantage:.3g} {metric} over scratch"
        name = f"**{attack['name']}**" if attack["name"] == worst else attack["name"]
        row = [name, spec.get("strategy", "n/a"), spec.get("optimizer", "n/a")]
        row += [_format_value(spec.get("learning_rate")), _format_value(spec.get("steps"))]
        row += [
            _format_value(final[start])
            + (" (diverged; best before)" if diverged.get(start) else "")
            + (f" (lr {attack['scratch_learning_rate']:g})" if start == "scratch" and tuned_scratch else "")
            for start in STARTS
        ]
        row += ["n/a" if advantage is None else signed(advantage), verdict]
        if simulated_column:
            row.append(_simulated(spec, sophon_config))
        rows.append(row)

    measured = [v for v in advantages.values() if v is not None]
    broken = [name for name, v in advantages.items() if v is not None and v > tolerance]
    if worst is not None and advantages.get(worst) is not None:
        worst_final = final_metrics(next(attack for attack in attacks if attack["name"] == worst))
        worst_sentence = (
            f"`{worst}`: the protected start reached {metric} {_format_value(worst_final['protected'])} against "
            f"{_format_value(worst_final['scratch'])} from scratch"
            + (
                f" and {_format_value(worst_final['unprotected'])} from the unprotected original"
                if worst_final["unprotected"] is not None
                else ""
            )
            + f"; head start over scratch {signed(advantages[worst])}"
            + (" (the protection fails here)." if advantages[worst] > tolerance else " (no head start).")
        )
    else:
        worst_sentence = "not available: no attack has both a protected and a scratch result."
    # Attacks that end no better than scratch but led it at some evaluation point: the first line a reader sees
    # must not claim more than the curves show.
    ahead = (report.get("summary") or {}).get("attacks_ahead_during_training") or []
    verb = "was" if len(ahead) == 1 else "were"
    during = f"{len(ahead)} {'more ' if broken else ''}{verb} ahead of scratch during training" if ahead else ""
    if not attacks:
        overall = "The report lists no attacks, so it supports no resistance claim."
        headline = "**not measured**: the report lists no attacks; this card makes no resistance claim."
    elif not measured:
        overall = "No attack could be compared with scratch, so this report supports no resistance claim."
        headline = "measured, but no attack has a scratch baseline to compare with."
    elif broken:
        overall = (
            f"{len(broken)} of {len(measured)} attacks gave the attacker a head start over training from scratch: "
            + ", ".join(f"`{name}`" for name in broken)
            + ". The protection does not hold against these."
        )
        headline = f"{len(broken)} of {len(measured)} measured attacks beat training from scratch; worst: `{worst}`"
        headline += f"; {during}." if during else "."
    else:
        overall = (
            f"None of the {len(measured)} attacks gave the attacker a head start over training from scratch "
            "(within the attacks, data and budgets listed here)."
        )
        headline = (
            f"no head start over training from scratch at the end of any of {len(measured)} measured attacks, but "
            f"{during}; closest: `{worst}` (see below)."
            if during
            else f"no head start over training from scratch in any of {len(measured)} measured attacks; "
            f"closest: `{worst}` (see below)."
        )
    if ahead:
        overall += (
            f" {len(ahead)} of the attacks that end no better than scratch for the attacker {verb} ahead of it at "
            "some evaluation point (compared at equal step budgets; at step 0 that is the released model itself "
            "against an untrained one): " + ", ".join(f"`{name}`" for name in ahead) + "."
        )
    if tolerance:
        overall += f" A head start of at most {tolerance:g} {metric} counts as none (the report's tolerance)."
    recipe = report.get("scratch_recipe") or {}
    fingerprints = report.get("fingerprints") or {}
    # What the attacks started from: a report without a reference model or without scratch has fewer starts.
    starts = [start for start in STARTS if any(final_metrics(attack)[start] is not None for attack in attacks)]
    # The same attack at several seeds (`sophon-hf attack --attack-seeds N`): the spread of its head start. Reports
    # written before the summary carried it are grouped here.
    groups = (report.get("summary") or {}).get("across_seeds")
    if groups is None:
        from .report import ResistanceReport

        try:
            groups = ResistanceReport.from_dict(report).across_seeds()
        except (KeyError, TypeError):  # a hand-made report without curves: no spread to show
            groups = []
    seed_rows = [
        [
            f"`{group['attack']}`",
            ", ".join(str(seed) for seed in group["seeds"]),
            ", ".join(signed(value) for value in group["head_starts"]),
            *(signed(group[key]) for key in ("mean", "min", "max")),
        ]
        for group in groups
    ]
    return {
        "seed_rows": seed_rows,
        "headline": headline,
        "attack_columns": columns,
        "attack_rows": rows,
        "worst_sentence": worst_sentence,
        "overall_sentence": overall,
        "starts_sentence": _starts_sentence(starts, _describe_scratch_recipe(recipe)),
        "has_scratch": "scratch" in starts,
        "verify_tolerance": f"{default_tolerance(report):.2g}",
        "untested": _untested(report, task) or ["nothing within the harness's families"],
        "fingerprint": fingerprints.get("protected"),
    }


def _starts_sentence(starts: list[str], scratch_recipe: str) -> str:
    described = {
        "protected": "this **protected** model",
        "unprotected": "the **unprotected** original it was made from",
        "scratch": "**scratch** (the same architecture freshly initialised"
        + (f", trained with: {scratch_recipe})" if scratch_recipe else ")"),
    }
    parts = [described[start] for start in starts]
    if not parts:
        return "no recorded start"
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{len(parts)} point{'s' if len(parts) != 1 else ''}: {listed}"


def default_tolerance(report: dict[str, Any]) -> float:
    """`sophon-hf verify`'s tolerance when none is given: 0.05 for accuracy; for other metrics 5% of the median of
    the published final values (0.05 on a denoising error of about 0.1 would accept almost any re-run)."""
    if report.get("metric", "accuracy") == "accuracy":
        return 0.05
    values = sorted(
        abs(value) for attack in report.get("attacks", []) for value in final_metrics(attack).values() if value
    )
    return 0.05 * values[len(values) // 2] if values else 0.05


def detect_model_folder(folder: str | Path) -> dict[str, str]:
    """Read what kind of model a saved folder holds from its `config.json`.

    Args:
        folder (`str` or `Path`):
            A folder written by `save_pretrained` (Transformers or Diffusers).

    Returns:
        `dict`: `{"library_name": ..., "model_class": ..., "task": ...}`.

    Example:
    ```python
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> model = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                                             intermediate_size=37, image_size=8, patch_size=4))
    >>> model.save_pretrained("tiny-vit")
    >>> detect_model_folder("tiny-vit")["task"]
    'image-classification'
    ```
    """
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json, so it is not a model folder written by `save_pretrained`. Save the model "
            "with `trainer.save_model(...)` or `model.save_pretrained(...)` first."
        )
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if "_class_name" in config:
        return {
            "library_name": "diffusers",
            "model_class": config["_class_name"],
            "task": "unconditional-image-generation",
        }
    architectures = config.get("architectures") or []
    if not architectures:
        raise ValueError(
            f"{config_path} names no architecture (`architectures` is empty), so the model class is unknown. Save "
            "the model with `save_pretrained` from its class (e.g. `ViTForImageClassification`)."
        )
    model_class = architectures[0]
    if model_class.endswith("ForImageClassification"):
        task = "image-classification"
    elif model_class.endswith("ForSequenceClassification"):
        task = "text-classification"
    else:
        raise ValueError(
            f"{model_class} is neither an image nor a sequence classifier; sophon_hf protects "
            "`*ForImageClassification`, `*ForSequenceClassification` and Diffusers UNets."
        )
    return {"library_name": "transformers", "model_class": model_class, "task": task}


def write_model_card(output_dir: str | Path, **kwargs: Any) -> Path:
    """Write `README.md` (the model card) into a saved model folder.

    Reads what the folder holds: the model kind from `config.json` (unless `task`, `library_name` or `model_class`
    are given), the measurement from `report.json` when it exists (unless `report` is given), and links
    `attack_curves.png` and `report.md` when they exist. Without a report the card says plainly that resistance has
    not been measured yet. `SophonTrainer.create_model_card` calls this on the main process.

    Args:
        output_dir (`str` or `Path`):
            The model folder (written by `save_pretrained` / `trainer.save_model`).
        **kwargs:
            Keyword arguments of [`generate_model_card`] (`model_name`, `base_model`, `original_domain`,
            `restricted_domain`, `sophon_config`, `original_metrics`, `datasets`, `repo_id`, `tags`, `license`, ...),
            and `weights_fingerprint`: the fingerprint of the weights in the folder, so that a `report.json` measured
            on other weights is left out of the card.

    Returns:
        `Path`: the written `README.md`.

    Example:
    ```python
    >>> from sophon_hf.model_card import write_model_card
    >>> write_model_card("out", repo_id="me/vit-protected", original_domain="ImageNette",
    ...                  restricted_domain="CIFAR-10", sophon_config=trainer.args.to_dict())
    PosixPath('out/README.md')
    ```
    """
    output_dir = Path(output_dir)
    # The publisher's own words (domains, hyper-parameters, base model) are kept next to the card, so that a card
    # regenerated later (e.g. by `sophon-hf push` after a new measurement) still carries them.
    sidecar = output_dir / CARD_METADATA_FILE
    stored = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else {}
    if stored.get("base_model") is not None and not _is_repo_id(stored["base_model"]):
        # Written by an older version, which stored local paths: not a Hub reference, and publishing it leaks a path.
        logger.warning("Dropping base_model=%r kept in %s: it is not a Hub model id.", stored["base_model"], sidecar)
        del stored["base_model"]
    for key in PUBLISHER_FIELDS:
        if kwargs.get(key) is None and stored.get(key) is not None:
            kwargs[key] = stored[key]
    if kwargs.get("sophon_config") is not None:
        kept = (
            *CARD_HYPERPARAMETERS,
            "original_domain",
            "restricted_domain",
            "stop_reason",
            "diverged",
            "completed_outer_iterations",
            "planned_outer_iterations",
        )
        kwargs["sophon_config"] = {k: v for k, v in kwargs["sophon_config"].items() if k in kept}
    if any(kwargs.get(key) is None for key in ("task", "library_name", "model_class")):
        for key, value in detect_model_folder(output_dir).items():
            if kwargs.get(key) is None:
                kwargs[key] = value
    report_path = output_dir / "report.json"
    weights_fingerprint = kwargs.pop("weights_fingerprint", None)
    if kwargs.get("report") is None and report_path.is_file():
        kwargs["report"] = json.loads(report_path.read_text(encoding="utf-8"))
        measured = (kwargs["report"].get("fingerprints") or {}).get("protected")
        if weights_fingerprint is not None and measured != weights_fingerprint:
            logger.warning(
                "%s was measured on other weights than the ones saved now (trained further since?): the card says "
                "resistance has not been measured. Re-run the attacks (`sophon-hf attack --model %s --output %s`).",
                report_path,
                output_dir,
                output_dir,
            )
            kwargs["report"] = None
    if kwargs.get("report") is not None:
        if kwargs.get("curves_image") is None and (output_dir / "attack_curves.png").is_file():
            kwargs["curves_image"] = "attack_curves.png"
        kwargs.setdefault("has_report_md", (output_dir / "report.md").is_file())
    kwargs.setdefault("has_image_processor", (output_dir / "preprocessor_config.json").is_file())
    kwargs.setdefault("has_tokenizer", (output_dir / "tokenizer_config.json").is_file())
    if kwargs.get("samples_image") is None and (output_dir / "samples.png").is_file():
        kwargs["samples_image"] = "samples.png"  # written by trainers/protect_diffusion.py
    card = generate_model_card(**kwargs)
    path = output_dir / "README.md"
    card.save(path)
    publisher_fields = {key: kwargs.get(key) for key in PUBLISHER_FIELDS if kwargs.get(key) is not None}
    if kwargs.get("revision"):
        # Recorded (for `sophon-hf push` to tell a card about another branch) but never carried over: the branch is
        # where this push goes, not a detail of the model.
        publisher_fields["revision"] = kwargs["revision"]
    # What was written, so that `sophon-hf push` can tell a card the publisher edited since (and must keep).
    publisher_fields[CARD_HASH_KEY] = card_digest(path)
    sidecar.write_text(json.dumps(publisher_fields, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    return path


def free_copy_path(card: Path) -> Path:
    """Where a hand-edited card is saved aside before it is rewritten: `README.md.edited`, else the first free
    `README.md.edited.N`, so that every earlier copy is kept."""
    path, index = card.with_name(card.name + ".edited"), 1
    while path.exists():
        path, index = card.with_name(f"{card.name}.edited.{index}"), index + 1
    return path


def card_digest(path: str | Path) -> str:
    """sha256 of a card file's bytes (`write_model_card` records it for the card it wrote)."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _is_repo_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _result_key(result: EvalResult) -> tuple[str, ...] | None:
    args = result.metric_args or {}
    if "start" not in args:
        return None
    return (args.get("attack", "original domain"), args["start"])


def card_report_mismatches(card: ModelCard, report: dict[str, Any] | None) -> list[str]:
    """Where a card's `model-index` disagrees with a report: the card must publish exactly the report's numbers.

    Args:
        card (`ModelCard`):
            A card, e.g. `ModelCard.load("out/README.md")`.
        report (`dict`, *optional*):
            The `report.json` published next to it, or `None` when there is none.

    Returns:
        `list[str]`: one readable line per disagreement; empty when the card and the report agree.

    Example:
    ```python
    >>> card = generate_model_card(report=report)
    >>> card_report_mismatches(card, report)
    []
    ```
    """
    published = {key: result.metric_value for result in card.data.eval_results or [] if (key := _result_key(result))}
    if report is None:
        return ["the card publishes resistance numbers but there is no report.json"] if published else []
    task = report.get("task") or (card.data.eval_results[0].task_type if card.data.eval_results else TASKS[0])
    expected = {_result_key(result): result.metric_value for result in eval_results_from_report(report, task=task)}
    problems = []
    for key, value in expected.items():
        if key not in published:
            problems.append(f"{key[1]} result of {key[0]} is in report.json but not on the card")
        elif not math.isclose(float(published[key]), value, rel_tol=1e-9, abs_tol=1e-12):
            problems.append(f"{key[1]} result of {key[0]}: card says {published[key]}, report.json says {value}")
    problems += [
        f"{key[1]} result of {key[0]} is on the card but not in report.json"
        for key in published
        if key not in expected and key[0] != "original domain"
    ]
    # The harness's warnings qualify every number above: a card without them overstates the measurement.
    problems += [
        f"report.json warns that {warning[:60]}..., and the card does not say so"
        for warning in report.get("warnings", [])
        if warning not in card.text
    ]
    return problems
