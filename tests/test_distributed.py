"""Two CPU processes (gloo): every rank simulates its own attacker, and the replicas stay identical."""

import tempfile

import torch
from conftest import SmallCNN, image_dataset, run_two_processes


def _train_on_two_ranks():
    import torch.distributed as dist

    from sophon_hf import SophonConfig, SophonTrainer

    torch.manual_seed(0)
    model = SmallCNN()
    initial = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    args = SophonConfig(
        output_dir=tempfile.mkdtemp(),
        max_steps=4,
        per_device_train_batch_size=8,
        inner_steps=2,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        simulation_strategies=["full", "full_reinit_head", "linear_probe", "lora"],
        inner_optimizers=["sgd", "adam:1e-3"],
        simulation_horizon=4,  # persistent attackers, one per rank
        simulation_support_size=8,
    )
    trainer = SophonTrainer(
        model, args=args, train_dataset=image_dataset(64, seed=1), restricted_dataset=image_dataset(64, seed=2)
    )
    assert args.world_size == 2
    # Each rank draws its restricted batches from its own shard.
    supports, _ = trainer._restricted_batches(trainer._generator(salt=0))
    shard_pixels = supports[0]["pixel_values"].contiguous()
    trainer.train()
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.zeros_like(weights) for _ in range(2)]
    dist.all_gather(gathered, weights)
    pixels = [torch.zeros_like(shard_pixels) for _ in range(2)]
    dist.all_gather(pixels, shard_pixels)
    assert not torch.equal(pixels[0], pixels[1]), "both ranks simulated on the same restricted data"
    assert torch.equal(gathered[0], gathered[1]), "replicas diverged: the meta-gradient was not averaged"
    assert not torch.equal(gathered[0], initial)
    # Each rank's persistent attacker trains on examples of its own shard.
    assert all(i % 2 == args.process_index for i in trainer._attacker.support_pool.tolist())


def test_two_process_training_keeps_replicas_identical():
    run_two_processes(_train_on_two_ranks)
