"""Two gloo processes give the same reconstruction as one process with the same global batch.

Each rank is a real process (``RANK``/``WORLD_SIZE``/``MASTER_*`` as torchrun sets them) running
the tiny 1AKE set (D=32, 64 images, global batch 16, 3 heads) for one amortized and one direct
epoch. Compared with the one-process run: the first step's gradients (to float32 round-off), then
the map, every image's pose and each epoch's loss of the whole run (tolerances in
``assert_same_run``: measured 3e-7 on the losses, 2e-6 on the map, 0.04 degrees at most on a pose).
The 2-rank run's epoch-1 checkpoint, resumed in one process, ends like the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from cryospin_lab.engine.distributed import free_port
from cryospin_lab.physics import so3

RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    import torch.distributed as dist
    from cryospin_lab.engine.config import TrainingConfig
    from cryospin_lab.io.particles import ParticleStack
    from cryospin_lab.engine.distributed import init_from_env
    from cryospin_lab.model.encoder import EncoderConfig
    from cryospin_lab.engine.events import EpochEvent
    from cryospin_lab.engine.trainer import Trainer

    star, out, resume = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    comm = init_from_env()
    stack = ParticleStack(star)
    config = TrainingConfig(encoder=EncoderConfig(box_size=32, n_heads=3), batch_size=16, n_epochs=2,
                            switch="1", n_tracked=0, volume_interval_s=1e9, device="cpu", threads=1,
                            encoder_lr=1e-5, decoder_lr=1e-4, decoder_lr_direct=1e-4, pose_lr=0.005)
    if resume in ("-", "grads"):
        trainer = Trainer(stack, config, out_dir=out, comm=comm)
    else:
        trainer = Trainer.resume(stack, resume, out_dir=out, comm=comm)
    if resume == "grads":  # the first step's summed gradients, instead of the optimiser step
        branch = trainer.branches[0]
        params = [*branch.encoder.named_parameters(), *branch.volume.named_parameters()]
        def save_gradients():
            if comm.is_main:
                torch.save({name: p.grad.clone() for name, p in params}, out + "/grads.pt")
            raise KeyboardInterrupt
        branch.encoder_opt.step = save_gradients
        try:
            next(e for e in trainer.events() if False)
        except KeyboardInterrupt:
            pass
        if comm.active:
            dist.barrier()
            dist.destroy_process_group()
        sys.exit(0)
    losses = [e.mean_loss for e in trainer.events() if isinstance(e, EpochEvent)]
    if comm.is_main:
        rotations, _ = trainer.poses()
        torch.save({"volume": trainer.volume_real(), "rotations": rotations}, out + "/final.pt")
        with open(out + "/losses.json", "w") as file:
            json.dump(losses, file)
    if comm.active:
        dist.barrier()  # the ranks tear the process group down together
        dist.destroy_process_group()
    """
)


def run_ranks(star: Path, out: Path, world: int, resume: str = "-") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    ranks = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        ranks.append(
            subprocess.Popen(
                [sys.executable, "-c", RANK_SCRIPT, str(star), str(out), resume],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    for rank, process in enumerate(ranks):
        output = process.communicate(timeout=600)[0]
        assert process.returncode == 0, f"rank {rank} of {world} failed:\n{output[-3000:]}"
    if resume == "grads":
        return torch.load(out / "grads.pt", weights_only=True)
    result = torch.load(out / "final.pt", weights_only=True)
    result["losses"] = json.loads((out / "losses.json").read_text())
    return result


def test_two_ranks_sum_to_the_one_process_gradient(tiny_simulation, tmp_path):
    """The exact part: the first step's gradients (global batch-norm statistics, per-rank sums over
    the global batch size, one all-reduce) equal the one-process gradients to float32 round-off.
    Parameters whose gradient is round-off itself (a linear bias in front of a batch norm) are left
    out: their norm is below 1e-5 of the largest."""
    star = Path(tiny_simulation.star_path)
    one = run_ranks(star, tmp_path / "one", 1, resume="grads")
    two = run_ranks(star, tmp_path / "two", 2, resume="grads")
    assert one.keys() == two.keys()
    largest = max(float(g.norm()) for g in one.values())
    compared = 0
    for name, grad in one.items():
        if float(grad.norm()) > 1e-5 * largest:
            relative = float((grad - two[name]).norm() / grad.norm())
            assert relative < 1e-4, f"{name}: gradients differ by {relative:.1e}"
            compared += 1
    assert compared > 0.8 * len(one)


@pytest.fixture(scope="module")
def one_and_two(tiny_simulation, tmp_path_factory):
    star = Path(tiny_simulation.star_path)
    base = tmp_path_factory.mktemp("ranks")
    return star, base, run_ranks(star, base / "one", 1), run_ranks(star, base / "two", 2)


def assert_same_run(a: dict, b: dict) -> None:
    """Whole runs. The run uses small learning rates: Adam turns a round-off-sized gradient into a
    step of the learning rate, so with the default rates round-off grows with every step (as between
    one-process runs with 1 and 2 torch threads: epoch losses 1e-3 apart, poses ~10 degrees after 8
    steps); with these, the runs stay together and a real difference would show."""
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-5)
    volume_a, volume_b = a["volume"].double(), b["volume"].double()
    relative = float((volume_a - volume_b).norm() / volume_a.norm())
    assert relative < 1e-4, f"maps differ by {relative:.2e} (relative L2)"
    angles = so3.geodesic_angle_deg(a["rotations"].double(), b["rotations"].double())
    assert float(angles.median()) < 0.01 and float(angles.max()) < 1.0, (
        f"poses differ by {float(angles.median()):.3f} (median), {float(angles.max()):.3f} degrees (max)"
    )


def test_two_gloo_ranks_reconstruct_as_one_process(one_and_two):
    _, _, one, two = one_and_two
    assert len(one["losses"]) == 2
    assert_same_run(one, two)


def test_a_two_rank_checkpoint_resumes_in_one_process(one_and_two):
    star, base, one, _ = one_and_two
    checkpoint = base / "two" / "checkpoints" / "epoch_0001.pt"
    assert checkpoint.is_file(), "rank 0 writes the checkpoints"
    assert not (base / "two" / "checkpoints" / "epoch_0002.pt").with_name("interrupted.pt").exists()
    resumed = run_ranks(star, base / "resumed", 1, resume=str(checkpoint))
    resumed["losses"] = one["losses"][:1] + resumed["losses"]
    assert_same_run(one, resumed)


def test_torchrun_reconstruct_writes_one_set_of_results_and_resumes_in_one_process(tiny_simulation, tmp_path):
    """``torchrun --nproc_per_node 2 ... reconstruct``: rank 0 prints and writes, as a one-process run
    would; its checkpoint continues in one process."""
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "out"
    common = [str(tiny_simulation.star_path), "--out", str(out), "--heads", "3", "--batch-size", "16"]
    common += ["--switch", "1", "--threads", "1", "--no-progress"]
    argv = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port())]
    argv += ["-m", "cryospin_lab", "reconstruct", *common, "--epochs", "2"]
    run = subprocess.run(
        argv, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    epoch_lines = [line for line in run.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 2, run.stdout  # printed once, by rank 0
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_0001.pt", "epoch_0002.pt"]
    from cryospin_lab.app.event_file import read_events
    from cryospin_lab.engine.events import EpochEvent

    logged = read_events(out / "events.jsonl")  # rank 0's events, for watching from a notebook
    assert [e.epoch for e in logged if isinstance(e, EpochEvent)] == [1, 2]
    resumed = subprocess.run(
        [sys.executable, "-m", "cryospin_lab", "reconstruct", *common, "--epochs", "3", "--resume"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        "resuming" in resumed.stdout and len((out / "metrics.csv").read_text().strip().splitlines()) == 1 + 3
    )
