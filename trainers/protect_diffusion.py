"""Protect a Diffusers `UNet2DModel` denoiser with SOPHON (denial of service on a restricted image domain).

The protected UNet keeps denoising (and generating) the original domain, while fine-tuning it on the restricted domain
starts from a denoiser that predicts no noise there. The output folder holds the UNet (`config.json` +
`diffusion_pytorch_model.safetensors`, loads with `UNet2DModel.from_pretrained`), its `scheduler_config.json`
(`DDPMScheduler.from_pretrained`), and `samples.png` with images the protected UNet generates. With
`unprotected_output_dir`, the UNet as it was before protection is saved too (with its scheduler): the reference that
attacks compare against, `sophon-hf attack --model OUTPUT_DIR --reference-model UNPROTECTED_DIR ...`.

Usage:

    # Offline, on a laptop CPU (a few minutes): real MNIST digits (original) vs patches of real photos (restricted),
    # a small UNet pre-trained on the digits first (no pre-trained digit DDPM ships in a PyPI package).
    python trainers/protect_diffusion.py --config trainers/configs/diffusion_digits_cpu.yaml
    # The same images with the roles swapped (photos kept, digits denied; about 15 minutes): the offline pairing where
    # the protection measurably works (benchmarks/RESULTS_diffusion.md).
    python trainers/protect_diffusion.py --config trainers/configs/diffusion_photos_to_digits_cpu.yaml

    # The same on 2 CPU processes (DDP over gloo; `--multi_gpu` is what starts two processes, `--use_cpu` keeps them
    # on the CPU; `--cpu --num_processes 2` would start only one):
    accelerate launch --multi_gpu --num_processes 2 trainers/protect_diffusion.py \
        --config trainers/configs/diffusion_digits_cpu.yaml --use_cpu true

    # The paper's setting on one GPU: a CIFAR DDPM (google/ddpm-cifar10-32, kept on CIFAR-100 by normal training
    # reinforcement) protected against CelebA faces:
    accelerate launch trainers/protect_diffusion.py --config trainers/configs/diffusion_cifar100_celeba.yaml

    # ... or on 4 GPUs:
    accelerate launch --multi_gpu --num_processes 4 trainers/protect_diffusion.py \
        --config trainers/configs/diffusion_cifar100_celeba.yaml

    # Any field of a config can be overridden on the command line; shipped recipes can be named without a path:
    python trainers/protect_diffusion.py --config trainers/configs/diffusion_digits_cpu.yaml --max_steps 50
    python -m sophon_hf.trainers.protect_diffusion --config diffusion_digits_cpu

Datasets are Hub names, folders written by `Dataset.save_to_disk`, or the built-in offline `"digits"` /
`"photo_patches"` (either can be either domain). Image columns (`image` or `img`, or `image_column`) are
center-cropped, resized to the UNet's `sample_size` and scaled to [-1, 1] into `pixel_values`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from transformers import set_seed

from sophon_hf import SophonConfig, SophonTrainer
from sophon_hf.commands import user_errors
from sophon_hf.data import load_train_eval
from sophon_hf.diffusion import (
    DiffusionTask,
    generate_samples,
    images_to_pixel_values,
    load_digits_and_photo_patches,
    save_sample_grid,
)
from sophon_hf.utils import (
    check_output_folders,
    parse_recipe_args,
    pickle_weights_hint,
    print_saved,
    resolve_resume_checkpoint,
    save_attack_data,
    save_unprotected_reference,
    split_off_attacker,
    stop_if_diverged,
)

logger = logging.getLogger(__name__)
# The attacker's restricted training images and held-out restricted test images (`save_to_disk` folders or Hub names).

RECIPES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

# The offline images (`load_digits_and_photo_patches`), by name: the loader's splits that hold them. Either can be
# either domain; the original domain gets 2000 training and 500 test images, the restricted one 500 and 200.
OFFLINE_DATASETS = {"digits": "original", "photo_patches": "restricted"}
OFFLINE_SIZES = {"original": (2000, 500), "restricted": (500, 200)}
# Built-in data: this many restricted images (at most a fifth) are held out of protection for the attack the script
# prints, the 50 digits of benchmarks/RESULTS_diffusion.md's attacker.
ATTACKER_IMAGES = 50


@dataclass
class ScriptArguments:
    """Which data to protect for and against."""

    original_dataset: str = field(
        default="digits", metadata={"help": "Original domain: Hub name, save_to_disk folder, or 'digits' (offline)."}
    )
    original_dataset_config: str | None = field(default=None, metadata={"help": "Hub config of original_dataset."})
    original_split: str = field(default="train", metadata={"help": "Split used for normal training."})
    original_eval_split: str | None = field(
        default="test", metadata={"help": "Split for original-domain evaluation (None: split off eval_fraction)."}
    )
    restricted_dataset: str = field(
        default="photo_patches",
        metadata={"help": "Restricted domain: Hub name, save_to_disk folder, or 'photo_patches' (offline)."},
    )
    restricted_dataset_config: str | None = field(default=None, metadata={"help": "Hub config of restricted_dataset."})
    restricted_split: str = field(default="train", metadata={"help": "Split used by the simulated attacker."})
    restricted_eval_split: str | None = field(
        default=None, metadata={"help": "Split for restricted-domain evaluation (None: split off eval_fraction)."}
    )
    image_column: str | None = field(default=None, metadata={"help": "Image column ('image' or 'img' if unset)."})
    max_original_samples: int | None = field(default=None, metadata={"help": "Use at most this many original images."})
    max_restricted_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many restricted images."}
    )
    max_eval_samples: int | None = field(default=1000, metadata={"help": "Evaluate on at most this many images."})
    eval_fraction: float = field(default=0.05, metadata={"help": "Held-out fraction when there is no eval split."})
    num_sample_images: int = field(default=16, metadata={"help": "Images generated into samples.png (0: none)."})
    num_inference_steps: int | None = field(
        default=None, metadata={"help": "Reverse steps for samples.png (default: the whole schedule)."}
    )


@dataclass
class ModelArguments:
    """Which UNet to protect: a pre-trained one, or one built from this config (then pre-trained here)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub repo or folder of a UNet2DModel; None: build one from the fields below."}
    )
    unet_subfolder: str | None = field(default=None, metadata={"help": "Subfolder of the UNet, e.g. 'unet'."})
    scheduler_subfolder: str | None = field(
        default=None, metadata={"help": "Subfolder of the scheduler, e.g. 'scheduler'."}
    )
    num_train_timesteps: int = field(default=1000, metadata={"help": "Schedule length of a newly built scheduler."})
    sample_size: int = field(default=16, metadata={"help": "Image side of a newly built UNet."})
    in_channels: int = field(default=1, metadata={"help": "Image channels of a newly built UNet."})
    block_out_channels: list[int] = field(
        default_factory=lambda: [32, 64], metadata={"help": "Channels per level of a newly built UNet."}
    )
    layers_per_block: int = field(default=1, metadata={"help": "ResNet layers per level of a newly built UNet."})
    norm_num_groups: int = field(default=8, metadata={"help": "GroupNorm groups of a newly built UNet."})
    pretrain_steps: int = field(
        default=0, metadata={"help": "Ordinary DDPM training steps on the original domain before protection."}
    )
    pretrain_learning_rate: float = field(default=1e-3, metadata={"help": "Adam step size of that pre-training."})
    unprotected_output_dir: str | None = field(
        default=None,
        metadata={
            "help": "Also save the UNet as it was before protection (and its scheduler) here: the reference for "
            "`sophon-hf attack --reference-model`."
        },
    )


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, SophonConfig, ModelArguments]:
    """Dataclass arguments from `--config YAML` (a file or a shipped recipe's name) and the command line."""
    return parse_recipe_args((ScriptArguments, SophonConfig, ModelArguments), argv, RECIPES_DIR)


def load_model(model_args: ModelArguments):
    from diffusers import DDPMScheduler, UNet2DModel

    if model_args.model_name_or_path is None:
        channels = list(model_args.block_out_channels)
        unet = UNet2DModel(
            sample_size=model_args.sample_size,
            in_channels=model_args.in_channels,
            out_channels=model_args.in_channels,
            block_out_channels=channels,
            # Attention at the lowest resolution only: what a small DDPM needs, and the LoRA attacker's target.
            down_block_types=["DownBlock2D"] * (len(channels) - 1) + ["AttnDownBlock2D"],
            up_block_types=["AttnUpBlock2D"] + ["UpBlock2D"] * (len(channels) - 1),
            layers_per_block=model_args.layers_per_block,
            norm_num_groups=model_args.norm_num_groups,
        )
        return unet, DDPMScheduler(num_train_timesteps=model_args.num_train_timesteps)
    path = model_args.model_name_or_path
    if os.path.isfile(os.path.join(path, "model_index.json")) and not (
        model_args.unet_subfolder or model_args.scheduler_subfolder
    ):
        # A local pipeline folder (`DDPMPipeline.save_pretrained`): its UNet and scheduler live in subfolders.
        model_args.unet_subfolder, model_args.scheduler_subfolder = "unet", "scheduler"
    try:
        # use_safetensors: weights published only as pickles fail here instead of being unpickled.
        unet = UNet2DModel.from_pretrained(
            model_args.model_name_or_path, subfolder=model_args.unet_subfolder, use_safetensors=True
        )
        scheduler = DDPMScheduler.from_pretrained(
            model_args.model_name_or_path, subfolder=model_args.scheduler_subfolder
        )
    except OSError as error:
        if os.path.isdir(model_args.model_name_or_path):
            unet_dir = os.path.join(model_args.model_name_or_path, model_args.unet_subfolder or "")
            raise OSError(f"{error}{pickle_weights_hint(unet_dir)}") from error
        from huggingface_hub import constants

        # Offline, Diffusers reports a Hub id as a repo without `config.json`: say what actually happened.
        offline = " HF_HUB_OFFLINE is set, so nothing can be downloaded." if constants.HF_HUB_OFFLINE else ""
        raise OSError(
            f"Cannot load the UNet or its scheduler {model_args.model_name_or_path!r}: it is not a local folder, and "
            "downloading it "
            f"from the Hub failed.{offline} ({error})"
        ) from error
    return unet, scheduler


def load_domain(
    name: str,
    config: str | None,
    split: str,
    eval_split: str | None,
    max_samples: int | None,
    max_eval_samples: int | None,
    eval_fraction: float,
    image_size: int | tuple[int, int],
    num_channels: int,
    image_column: str | None,
    seed: int,
):
    """A (train, eval) pair of datasets with `pixel_values` for the UNet, from a Hub name or a local folder."""
    train, evaluation = load_train_eval(name, split, eval_split, eval_fraction, seed, config=config)
    if max_samples is not None:
        train = train.select(range(min(max_samples, len(train))))
    if max_eval_samples is not None:
        evaluation = evaluation.select(range(min(max_eval_samples, len(evaluation))))

    def pixels(dataset):
        if "pixel_values" in dataset.column_names:
            return dataset.select_columns(["pixel_values"])
        return images_to_pixel_values(dataset, image_size, num_channels, image_column)

    return pixels(train), pixels(evaluation)


def load_datasets(
    script_args: ScriptArguments, training_args: SophonConfig, image_size: int | tuple[int, int], num_channels: int
):
    """Original and restricted (train, eval) datasets, offline built-ins or Hub/disk datasets."""
    offline = None
    names = {domain: getattr(script_args, f"{domain}_dataset") for domain in ("original", "restricted")}
    if set(names.values()) & set(OFFLINE_DATASETS):
        if num_channels != 1:
            raise ValueError("The offline 'digits'/'photo_patches' data is grayscale: set in_channels: 1.")
        if not isinstance(image_size, int):
            raise ValueError("The offline 'digits'/'photo_patches' data is square: set sample_size to one side.")
        if names["original"] == names["restricted"]:
            raise ValueError(
                f"original_dataset and restricted_dataset are both {names['original']!r}: use two domains."
            )
        sizes = {}
        for domain, name in names.items():
            if name in OFFLINE_DATASETS:
                split = OFFLINE_DATASETS[name]
                sizes[f"num_{split}_train"], sizes[f"num_{split}_test"] = OFFLINE_SIZES[domain]
        offline = load_digits_and_photo_patches(image_size=image_size, seed=training_args.seed, **sizes)
    domains = {}
    for domain, name in names.items():
        if name in OFFLINE_DATASETS:
            split = OFFLINE_DATASETS[name]
            train, evaluation = offline[f"{split}_train"], offline[f"{split}_test"]
            caps = ((train, getattr(script_args, f"max_{domain}_samples")), (evaluation, script_args.max_eval_samples))
            domains[domain] = tuple(d if n is None else d.select(range(min(n, len(d)))) for d, n in caps)
            continue
        domains[domain] = load_domain(
            name,
            getattr(script_args, f"{domain}_dataset_config"),
            getattr(script_args, f"{domain}_split"),
            getattr(script_args, f"{domain}_eval_split"),
            getattr(script_args, f"max_{domain}_samples"),
            script_args.max_eval_samples,
            script_args.eval_fraction,
            image_size,
            num_channels,
            script_args.image_column,
            training_args.seed,
        )
    return domains


def pretrain(unet, scheduler, dataset, steps: int, learning_rate: float, batch_size: int, seed: int) -> None:
    """Ordinary DDPM training, so a UNet built here has an original domain to keep.

    Every process runs the same seeded steps, and DDP broadcasts rank 0's weights anyway, so replicas start equal.
    """
    task = DiffusionTask(unet, scheduler)
    pixels = task.prepare_dataset(dataset, "original train")[:]["pixel_values"]
    device = next(unet.parameters()).device  # where the trainer put the UNet
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(unet.parameters(), lr=learning_rate)
    unet.train()
    for step in range(steps):
        index = torch.randint(len(pixels), (batch_size,), generator=generator)
        loss, _ = task.loss(unet, {"pixel_values": pixels[index].to(device)}, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, steps // 10) == 0:
            logger.info("pre-training step %d/%d: loss %.4f", step, steps, loss.item())


def main(script_args: ScriptArguments, training_args: SophonConfig, model_args: ModelArguments):
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING)
    set_seed(training_args.seed)  # a UNet built from its config starts from the same weights every run
    check_output_folders(output_dir=training_args.output_dir, unprotected_output_dir=model_args.unprotected_output_dir)
    unet, scheduler = load_model(model_args)
    if not training_args.first_order:
        from diffusers.models.attention_processor import AttnProcessor

        # Second-order meta-gradients differentiate twice through attention; the fused SDPA kernels cannot.
        for module in unet.modules():
            if hasattr(module, "set_processor"):
                module.set_processor(AttnProcessor())
    size = unet.config.sample_size
    image_size = size if isinstance(size, int) else tuple(size)
    with training_args.main_process_first(desc="loading and converting images"):
        domains = load_datasets(script_args, training_args, image_size, unet.config.in_channels)
    (original_train, original_eval), (restricted_train, restricted_eval) = domains["original"], domains["restricted"]
    builtin = script_args.restricted_dataset in OFFLINE_DATASETS
    if builtin:  # data nobody else has on disk: the attacker's images are held out and saved for the attack
        attacker_train, restricted_train = split_off_attacker(restricted_train, ATTACKER_IMAGES)

    # The trainer is built first, so that a setting it refuses fails before any pre-training.
    trainer = SophonTrainer(
        unet,
        args=training_args,
        train_dataset=original_train,
        restricted_dataset=restricted_train,
        eval_dataset=original_eval,
        restricted_eval_dataset=restricted_eval,
        noise_scheduler=scheduler,
    )
    # A resumed run loads all weights from the checkpoint: pre-training again would be thrown away.
    resume = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    if model_args.pretrain_steps and not resume:
        pretrain(
            unet,
            scheduler,
            original_train,
            model_args.pretrain_steps,
            model_args.pretrain_learning_rate,
            training_args.per_device_train_batch_size,
            training_args.seed,
        )
    save_unprotected_reference(model_args.unprotected_output_dir, training_args, unet, scheduler)
    trainer.train(resume_from_checkpoint=resume)
    if trainer.stop_reason is not None:
        logger.warning("Protection stopped early: %s.", trainer.stop_reason)
    trainer.save_model(training_args.output_dir)
    stop_if_diverged(trainer)

    if trainer.is_world_process_zero():  # save_model wrote the UNet and its scheduler_config.json
        task, model = trainer.task, trainer.accelerator.unwrap_model(trainer.model)
        original, restricted = task.prepare_dataset(original_eval), task.prepare_dataset(restricted_eval)
        metrics = {
            f"original_{task.metric_name}": task.evaluate(model, original),
            f"restricted_{task.metric_name}": task.evaluate(model, restricted),
        }
        trainer.save_metrics("protected", metrics)
        logger.info("protected model: %s", metrics)
        if script_args.num_sample_images:
            images = generate_samples(
                model,
                scheduler,
                script_args.num_sample_images,
                torch.Generator().manual_seed(training_args.seed),
                script_args.num_inference_steps,
            )
            save_sample_grid({"protected": images}, os.path.join(training_args.output_dir, "samples.png"))
            trainer.create_model_card()  # written by save_model before the samples existed: now it shows them
    if builtin:
        print_saved(
            trainer, model_args.unprotected_output_dir, save_attack_data(trainer, attacker_train, restricted_eval)
        )
    else:
        print_saved(trainer, model_args.unprotected_output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub()


if __name__ == "__main__":
    with user_errors("protect"):  # one line per process naming the fix, as `sophon-hf protect` prints
        main(*parse_args())
