"""Shared test fixtures: tiny models built from configs and small datasets. Everything is offline."""

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from datasets import Dataset  # noqa: E402


class SmallCNN(nn.Module):
    """A plain classifier whose forward takes `pixel_values` positionally and returns logits (BatchNorm inside)."""

    def __init__(self, num_labels: int = 5, channels: int = 1, width: int = 8):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * width, 32),
            nn.ReLU(),
        )
        self.fc = nn.Linear(32, num_labels)

    def forward(self, pixel_values):
        return self.fc(self.body(pixel_values))


def tiny_vit(num_labels: int = 5, image_size: int = 8, seed: int = 0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=image_size,
        patch_size=4,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=num_labels,
    )
    return ViTForImageClassification(config)


def tiny_resnet(num_labels: int = 5, seed: int = 0):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    config = ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=num_labels)
    return ResNetForImageClassification(config)


def tiny_bert(num_labels: int = 5, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


def image_dataset(n: int = 32, num_labels: int = 5, size: int = 8, seed: int = 0, shift: float = 0.0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_labels, (n,), generator=g)
    # Learnable: the label is written into the mean intensity of the image.
    pixels = torch.rand(n, 1, size, size, generator=g) * 0.5 + labels.view(-1, 1, 1, 1) / num_labels + shift
    return Dataset.from_dict({"pixel_values": pixels.numpy(), "labels": labels.numpy()})


def text_dataset(n: int = 32, num_labels: int = 5, length: int = 8, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_labels, (n,), generator=g)
    ids = torch.randint(5, 50, (n, length), generator=g)
    ids[:, 0] = labels + 1  # the first token gives the label away
    return Dataset.from_dict(
        {"input_ids": ids.numpy(), "attention_mask": torch.ones(n, length, dtype=torch.long).numpy(), "labels": labels}
    )


def tiny_config(output_dir, **overrides):
    """A `SophonConfig` for seconds-long CPU tests (3 outer iterations, K=2, batches of 8, seed 0, nothing saved)."""
    from sophon_hf import SophonConfig

    defaults = dict(
        output_dir=str(output_dir),
        max_steps=3,
        per_device_train_batch_size=8,
        inner_steps=2,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
    )
    return SophonConfig(**{**defaults, **overrides})


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tmp_output(tmp_path):
    return str(tmp_path / "out")


def _rank_entry(rank: int, fn, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # two processes on two cores: intra-op threads would fight over them
    fn(*args)
    import torch.distributed as dist

    if dist.is_initialized():
        # Exiting with a live gloo group aborts the process ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()


def run_two_processes(fn, *args, timeout: float = 300) -> None:
    """Run `fn(*args)` on 2 CPU processes (gloo), like `accelerate.debug_launcher` but spawned, not forked.

    Forking a process whose OpenMP pool already runs (any earlier torch work in this pytest process) deadlocks the
    children, so `debug_launcher` hangs when it is not the first torch test. `fn` must be importable (module level).
    A run still going after `timeout` seconds (e.g. one rank blocked in a collective the other skipped) is killed and
    fails the test instead of hanging the suite.
    """
    import socket

    from accelerate.utils import patch_environment

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with patch_environment(world_size=2, master_addr="127.0.0.1", master_port=str(port), accelerate_use_cpu="yes"):
        context = torch.multiprocessing.start_processes(
            _rank_entry, args=(fn, args), nprocs=2, start_method="spawn", join=False
        )
        deadline = time.monotonic() + timeout
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"the two processes were still running after {timeout:.0f} s (a rank is blocked)")
