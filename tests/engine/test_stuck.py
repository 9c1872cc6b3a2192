"""The stuck-start check: its structure gain against the truth, and the restart it triggers.

The gain is checked against what it means: a map that is its own spherical
average explains nothing beyond it (gain 0), and the true map at the true poses
explains much of the tiny set (SNR 10). The restart is checked through the
run's events and checkpoints: a new seed, the schedules counted from the
restart, the run's end moved by the stuck attempt's epochs.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from cryospin_lab.engine import stuck
from cryospin_lab.engine.branch import Branch
from cryospin_lab.engine.config import EncoderConfig
from cryospin_lab.engine.events import EpochEvent, LogEvent, Phase, PhaseChangeEvent
from cryospin_lab.engine.run_state import read_run
from cryospin_lab.engine.trainer import Trainer
from cryospin_lab.model.hartley_volume import HartleyVolume
from cryospin_lab.physics.render import image_losses, render_hartley

from helpers import of_type, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_spherical_average_keeps_shell_means_and_radial_volumes():
    d = 16
    g = torch.arange(d) - d // 2
    radius = (g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2).double().sqrt().round()
    radial = torch.exp(-radius / 3.0)  # a function of the rounded radius alone: unchanged
    assert torch.allclose(stuck.spherical_average(radial), radial, atol=1e-12)
    volume = torch.randn(d, d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ball = stuck.spherical_average(volume)
    for r in (0, 1, 5, 11):
        shell = radius == r
        assert float(ball[shell].std(unbiased=False)) < 1e-12  # constant on the shell
        assert math.isclose(float(ball[shell].mean()), float(volume[shell].mean()), abs_tol=1e-12)


def _trainer_with_volume(tiny_stack, real_map):
    trainer = Trainer(tiny_stack, tiny_config())
    branch = trainer.branch()
    branch.volume.load_state_dict(HartleyVolume.from_real(real_map).state_dict())
    return trainer, branch


def test_a_featureless_map_has_no_structure_gain(tiny_stack, tiny_ground_truth):
    trainer, branch = _trainer_with_volume(tiny_stack, tiny_ground_truth)
    ball = stuck.spherical_average(branch.volume.hartley().detach())
    with torch.no_grad():  # mantissa 1, exponent log|ball|: the volume is the ball (sign in the mantissa)
        branch.volume.mantissa.copy_(torch.sign(ball) + (ball == 0))
        branch.volume.exponent.copy_(torch.log(ball.abs() + 1e-30))
    assert abs(stuck.structure_gain(trainer.step_context, branch)) < 1e-5


def test_the_true_map_at_the_true_poses_has_a_large_gain(tiny_stack, tiny_ground_truth, monkeypatch):
    trainer, branch = _trainer_with_volume(tiny_stack, tiny_ground_truth)
    ctx, feed = trainer.step_context, trainer.feed
    disc = feed.disc(0)
    rows = torch.arange(len(tiny_stack))
    _, observed, ctf = feed.batch(rows, disc)
    kw = dict(pixel_size_angstrom=ctx.pixel_size_angstrom, ctf_values=ctf, contrast=ctx.config.contrast)
    clean = render_hartley(branch.volume.hartley().detach(), trainer.true_rotations.float(), disc, **kw)
    with torch.no_grad():  # the map at the images' scale (least squares)
        branch.volume.exponent += math.log(float((clean * observed).sum() / (clean * clean).sum()))

    def true_candidates(ctx, branch, idx, disc):  # every head proposes the true pose
        _, obs, ctf = feed.batch(idx, disc)
        rot = trainer.true_rotations[idx].float()
        kw["ctf_values"] = ctf
        losses = image_losses(
            render_hartley(branch.volume.hartley(), rot, disc, **kw), obs, disc, ctx.loss_kind
        )
        return rot[:, None], None, losses[:, None]

    monkeypatch.setattr(stuck, "encoder_candidates", true_candidates)
    gain = stuck.structure_gain(ctx, branch)
    assert gain > 0.2, gain  # SNR 10: most of the loss is signal the truth explains
    assert gain > 5 * ctx.config.stuck_min_gain


def test_a_stuck_start_restarts_from_a_new_seed_and_the_run_ends_later(tiny_stack, tmp_path):
    # every start counts as stuck: gain under 100 % after one epoch; one restart allowed
    config = tiny_config(n_epochs=3, stuck_check_epoch=1, stuck_min_gain=1.0, stuck_restarts=1, switch="2")
    trainer = Trainer(tiny_stack, config, out_dir=tmp_path)
    events = list(trainer.events())

    epochs = of_type(events, EpochEvent)
    assert [e.epoch for e in epochs] == [1, 2, 3, 4]  # 1 stuck epoch + the 3 of attempt 2
    assert [math.isfinite(e.structure_gain) for e in epochs] == [True, True, True, False]  # nan when direct
    restarts = [e for e in of_type(events, PhaseChangeEvent) if e.reason == "restart"]
    assert [(e.epoch, e.previous, e.new) for e in restarts] == [(1, Phase.AMORTIZED, Phase.AMORTIZED)]
    assert "attempt 2" in restarts[0].detail
    warnings = [e.message for e in of_type(events, LogEvent) if e.level == "warning"]
    assert any("ends after epoch 4" in m for m in warnings)
    assert any("no restart left" in m for m in warnings)  # attempt 2 is stuck too, after its epoch 1
    assert trainer.branch().stuck  # which gives its direct stage rescue_extra_epochs_stuck
    # the switch ("2") counts from the restart: after epoch 1 + 2
    switch = [e for e in of_type(events, PhaseChangeEvent) if e.new is Phase.DIRECT]
    assert [e.epoch for e in switch] == [3]

    saved = read_run(tmp_path / "checkpoints" / "epoch_0002.pt")
    state = saved.branches[0]
    assert (state["attempt"], state["epoch_offset"], state["seed_offset"]) == (2, 1, 0)
    resumed = Trainer(tiny_stack, config)
    resumed.restore(saved)
    assert (resumed.branch().attempt, resumed.branch().schedule_epoch) == (2, 1)
    assert resumed.branch().stuck  # kept across a resume
    assert not read_run(tmp_path / "checkpoints" / "epoch_0001.pt").branches[0]["stuck"]  # it restarted


def test_a_restart_starts_from_the_initialisation_of_a_new_seed(tiny_stack):
    config = tiny_config(n_epochs=3, stuck_check_epoch=1, stuck_min_gain=1.0, stuck_restarts=1)
    trainer = Trainer(tiny_stack, config)
    device = trainer.device
    first = Branch("main", config, trainer.feed, device)
    second = Branch("main", config, trainer.feed, device, seed_offset=1000)
    for event in trainer.events():
        if isinstance(event, PhaseChangeEvent) and event.reason == "restart":
            break
    restarted = trainer.branch()
    assert (restarted.epoch, restarted.step, restarted.schedule_epoch) == (1, 4, 0)
    fresh = second.encoder.state_dict()
    assert all(torch.equal(value, fresh[name]) for name, value in restarted.encoder.state_dict().items())
    assert torch.equal(restarted.volume.mantissa, second.volume.mantissa)
    assert not torch.equal(restarted.volume.mantissa, first.volume.mantissa)


def test_a_shifted_start_is_judged_by_its_own_lower_threshold():
    # a gain of 2 %: stuck for centred data (under 4 %), not with estimated shifts (over 1.1 %)
    at_check = SimpleNamespace(schedule_epoch=4, pending_switch=None, attempt=1)
    centred = tiny_config(stuck_check_epoch=4)
    shifted = tiny_config(
        stuck_check_epoch=4,
        encoder=EncoderConfig(
            box_size=centred.encoder.box_size, estimate_shifts=True, max_shift_angstrom=5.0
        ),
    )
    assert stuck.min_gain(centred) == centred.stuck_min_gain
    assert stuck.min_gain(shifted) == shifted.stuck_min_gain_shifted < centred.stuck_min_gain
    assert "under 4 %" in stuck.restart_reason(at_check, 0.02, centred)
    assert stuck.restart_reason(at_check, 0.02, shifted) is None
    assert "under 1.1 %" in stuck.restart_reason(at_check, 0.005, shifted)
    at_check.schedule_epoch = 3  # judged once, after the check epoch only
    assert stuck.restart_reason(at_check, 0.005, shifted) is None
