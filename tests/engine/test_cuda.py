"""The CUDA path: the same engine on a GPU agrees with the CPU and trains, saves and resumes.

Skipped where no GPU is visible (CI and the 2-core development machine have
none); run on the device machine with ``pytest tests/engine/test_cuda.py``. The CPU
results are the reference: rendering and one training step must agree with
them to float32 round-off, a checkpoint written on the GPU must resume on the
CPU, and the bf16 mixed-precision encoder must give float32 orthonormal
rotations and finite losses.
"""

from __future__ import annotations

import math

import pytest
import torch

from cryospin_lab.engine.config import TrainingConfig
from cryospin_lab.engine.events import EpochEvent, Phase, PhaseChangeEvent, StepEvent
from cryospin_lab.engine.trainer import Trainer
from cryospin_lab.io.particles import ParticleStack
from cryospin_lab.model.encoder import EncoderConfig
from cryospin_lab.model.hartley_volume import HartleyVolume
from cryospin_lab.physics import so3
from cryospin_lab.physics.projection import FourierDisc
from cryospin_lab.physics.render import LossKind, image_losses, render_hartley

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")

BOX = 32


@pytest.fixture(scope="module")
def stack(tiny_stack) -> ParticleStack:
    """The tiny 1AKE set of conftest.py (D=32, 64 images, SNR 10)."""
    return tiny_stack


def config(device: str, **overrides) -> TrainingConfig:
    values = dict(
        encoder=EncoderConfig(box_size=BOX, n_heads=3),
        batch_size=16,
        n_epochs=2,
        n_tracked=2,
        volume_interval_s=1e9,
        device=device,
    )
    values.update(overrides)
    return TrainingConfig(**values)


def test_render_matches_cpu():
    gen = torch.Generator().manual_seed(0)
    volume = HartleyVolume.from_real(torch.randn(BOX, BOX, BOX, generator=gen)).hartley().detach()
    rotations = so3.random_rotations(8, generator=gen)
    disc = FourierDisc.make(BOX)
    observed = torch.randn(8, disc.n_freqs, generator=gen)
    results = {}
    for device in ("cpu", "cuda"):
        rot = rotations.detach().clone().to(device).requires_grad_(True)
        predicted = render_hartley(volume.to(device), rot, disc.to(device), pixel_size_angstrom=2.5)
        loss = image_losses(predicted, observed.to(device), disc.to(device), LossKind.L2).sum()
        loss.backward()
        results[device] = (predicted.detach().cpu(), rot.grad.cpu())
    # Relative L2 differences: float32 trilinear weights and atomic-add reductions differ by round-off.
    for k, (name, limit) in enumerate((("projections", 1e-5), ("rotation gradients", 1e-4))):
        cuda, cpu = results["cuda"][k].double(), results["cpu"][k].double()
        relative = float((cuda - cpu).norm() / cpu.norm())
        print(f"{name}: relative difference CUDA vs CPU {relative:.2e}")
        assert relative < limit, f"{name}: relative difference {relative:.2e} >= {limit:.0e}"


def test_first_steps_match_cpu(stack):
    """Same seed, same batches: the first step losses agree (cuDNN vs CPU convolutions)."""
    losses = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        trainer = Trainer(stack, config(device, switch="never", n_epochs=1))
        steps = [e for e in trainer.events() if isinstance(e, StepEvent)]
        losses[device] = [e.loss for e in steps]
    assert len(losses["cuda"]) == len(losses["cpu"]) == 4
    assert losses["cuda"][0] == pytest.approx(losses["cpu"][0], rel=1e-3)


def test_train_switch_checkpoint_and_resume_on_cpu(stack, tmp_path):
    trainer = Trainer(stack, config("cuda", switch="1"), out_dir=tmp_path)
    assert trainer.device.type == "cuda"
    events = list(trainer.events())
    assert all(math.isfinite(e.loss) for e in events if isinstance(e, StepEvent))
    changes = [e for e in events if isinstance(e, PhaseChangeEvent) and e.new is Phase.DIRECT]
    assert len(changes) == 1
    table = trainer.branch().pose_table
    assert table.rotations.device.type == "cuda"
    checkpoint = tmp_path / "checkpoints" / "epoch_0002.pt"
    assert checkpoint.is_file()
    resumed = Trainer.resume(stack, checkpoint, n_epochs=3, device="cpu")
    assert resumed.device.type == "cpu"
    torch.testing.assert_close(resumed.branch().pose_table.rotations, table.rotations.cpu())
    more = [e for e in resumed.events() if isinstance(e, EpochEvent)]
    assert [e.epoch for e in more] == [3] and math.isfinite(more[0].mean_loss)


def test_bf16_encoder_gives_float32_rotations_and_trains(stack):
    trainer = Trainer(
        stack,
        config(
            "cuda",
            switch="never",
            n_epochs=1,
            encoder=EncoderConfig(box_size=BOX, n_heads=3, autocast="bf16"),
        ),
    )
    images = trainer.feed.batch(torch.arange(8), trainer.feed.disc(0))[0]
    candidates = trainer.branch().encoder(images)
    assert candidates.rotations.dtype == torch.float32
    r = candidates.rotations.double()
    eye = torch.eye(3, dtype=torch.float64, device=r.device).expand_as(r)
    torch.testing.assert_close(r @ r.transpose(-1, -2), eye, atol=1e-5, rtol=0)
    losses = [e.loss for e in trainer.events() if isinstance(e, StepEvent)]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
