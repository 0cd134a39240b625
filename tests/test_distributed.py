"""Two CPU processes (gloo): every rank simulates its own attacker, the replicas stay identical, resume works."""

import pytest
import torch
from conftest import SmallCNN, image_dataset, run_two_processes, tiny_config


def _train_on_two_ranks(output_dir):
    import torch.distributed as dist

    from sophon_hf import SophonTrainer

    torch.manual_seed(0)
    model = SmallCNN()
    initial = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    args = tiny_config(
        output_dir,
        max_steps=4,
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
    # The logged simulation metrics are the mean over the ranks' attackers, the same on every rank.
    logged = [[h["fts/query_loss"] for h in trainer.state.log_history if "fts/query_loss" in h] for _ in range(2)]
    dist.all_gather_object(logged, logged[0])
    assert len(logged[0]) == 4 and logged[0] == logged[1], logged
    # Each rank's persistent attacker trains on examples of its own shard.
    assert all(i % 2 == args.process_index for i in trainer._attacker.support_pool.tolist())


def test_two_process_training_keeps_replicas_identical(tmp_path):
    run_two_processes(_train_on_two_ranks, str(tmp_path))


def _two_rank_trainer(output_dir, trainer_class=None, **overrides):
    from sophon_hf import SophonTrainer

    torch.manual_seed(0)
    settings = dict(
        max_steps=4,
        simulation_strategies=["full", "full_reinit_head"],
        inner_optimizers=["sgd", "adam:1e-3"],
        simulation_horizon=4,
    )
    args = tiny_config(output_dir, **{**settings, **overrides})
    return (trainer_class or SophonTrainer)(
        SmallCNN(), args=args, train_dataset=image_dataset(64, seed=1), restricted_dataset=image_dataset(64, seed=2)
    )


def _resume_on_two_ranks(output_dir):
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2

    straight = _two_rank_trainer(f"{output_dir}/straight")
    straight.train()
    interrupted = _two_rank_trainer(f"{output_dir}/interrupted", save_strategy="steps", save_steps=2)
    interrupted.add_callback(Interrupt())
    interrupted.train()
    # Multi-process CPU training runs on device "cpu:0", a location torch.load and safetensors reject.
    resumed = _two_rank_trainer(f"{output_dir}/interrupted", save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=f"{output_dir}/interrupted/checkpoint-2")
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_two_process_resume_continues_exactly(tmp_path):
    run_two_processes(_resume_on_two_ranks, str(tmp_path))


def _non_finite_on_one_rank(output_dir):
    from sophon_hf import SophonTrainer

    class NaNOnRankOne(SophonTrainer):
        def _ntr_loss(self, model, batch, generator):
            if self.args.process_index != 1 or self.state.global_step != 2:
                return super()._ntr_loss(model, batch, generator)
            # A loss that diverges on finite data (NaN data is refused as bad data instead).
            task_loss = self.task.loss
            self.task.loss = lambda *args, **kwargs: (task_loss(*args, **kwargs)[0] * float("nan"), None)
            try:
                return super()._ntr_loss(model, batch, generator)
            finally:
                del self.task.loss

    trainer = _two_rank_trainer(output_dir, NaNOnRankOne)
    trainer.train()
    assert trainer.state.global_step == 3 and "non-finite" in trainer.stop_reason and trainer.diverged


def _nan_data_on_one_rank(output_dir):
    from datasets import Dataset

    from sophon_hf import SophonTrainer

    poisoned = image_dataset(64, seed=1).to_dict()
    poisoned["pixel_values"][5][0][0][0] = float("nan")  # in one rank's shard only
    args = tiny_config(output_dir, max_steps=8, simulation_strategies=["full"])
    trainer = SophonTrainer(
        SmallCNN(), args=args, train_dataset=Dataset.from_dict(poisoned), restricted_dataset=image_dataset(64, seed=2)
    )
    # Every rank reports bad data (not a step size to lower), and none waits for the other in a collective.
    with pytest.raises(
        ValueError, match=r"`train_dataset` has NaN or infinite values in (rows another|'pixel_values')"
    ):
        trainer.train()


def test_nan_data_on_one_rank_is_reported_as_bad_data_on_every_rank(tmp_path):
    run_two_processes(_nan_data_on_one_rank, str(tmp_path), timeout=120)


def test_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    # The rank that stops skips its backward: the other would wait in DDP's all-reduce forever.
    run_two_processes(_non_finite_on_one_rank, str(tmp_path), timeout=120)


def _diffusion_noise_on_two_ranks(output_dir):
    import torch.distributed as dist
    from test_diffusion import config, pixels_dataset, scheduler, tiny_unet

    from sophon_hf import SophonTrainer

    class Recording(SophonTrainer):
        # Records the timesteps and noise that normal training (not the simulation) draws.
        def _ntr_loss(self, model, batch, generator):
            original, drawn = self.task._noise, []

            def recording(*args, **kwargs):
                drawn.append(original(*args, **kwargs))
                return drawn[-1]

            self.task._noise = recording
            try:
                return super()._ntr_loss(model, batch, generator)
            finally:
                self.task._noise = original
                self.ntr_draws.append(torch.cat([drawn[0][2].float(), drawn[0][1].reshape(-1)]))

    args = config(output_dir, max_steps=2, ntr_steps=2)
    trainer = Recording(
        tiny_unet(),
        args=args,
        train_dataset=pixels_dataset(16),
        restricted_dataset=pixels_dataset(16, seed=1),
        noise_scheduler=scheduler(),
    )
    trainer.ntr_draws = []
    trainer.train()
    draws = torch.stack(trainer.ntr_draws)
    assert len(draws) == 4  # 2 outer iterations x 2 normal-training steps
    gathered = [torch.zeros_like(draws) for _ in range(2)]
    dist.all_gather(gathered, draws)
    for step in range(4):
        assert not torch.equal(gathered[0][step], gathered[1][step]), "both ranks drew the same noise"
    assert not torch.equal(draws[0], draws[1])  # each normal-training step draws new noise ...
    assert not torch.equal(draws[0], draws[2])  # ... and so does each outer iteration


def test_two_process_diffusion_training_draws_its_own_noise_on_each_rank(tmp_path):
    # The global RNG is seeded alike on every rank: without a per-rank stream the ranks would add the same noise to
    # their different images, halving the independent draws of a global batch.
    run_two_processes(_diffusion_noise_on_two_ranks, str(tmp_path))
