"""A truth-free sign that the amortized stage is stuck on the low-resolution plateau.

**Structure gain.** On a fixed probe set of images (``PROBE_IMAGES``, evenly
spread over the stack), the share of the loss that the map at each image's
best candidate removes compared with the map's own spherical average::

    gain = (L(ball at that pose) - L(map at best head)) / L(ball at that pose)

The spherical average is a featureless ball with the map's radial profile; its
projection is (up to interpolation) the same at every pose, so it is what a map
without usable structure explains. A run that has left the plateau explains several percent
more than its ball within a few epochs; a stuck run's map, however detailed it
looks, explains barely more, because its features do not line up with the
images at the poses the encoder gives them (docs/decisions.md#stuck-start).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from cryospin_lab.engine.branch import Branch
from cryospin_lab.engine.config import TrainingConfig
from cryospin_lab.engine.distributed import convert_batchnorm
from cryospin_lab.engine.events import Event, LogEvent, Phase, PhaseChangeEvent
from cryospin_lab.engine.steps import StepContext, encoder_candidates
from cryospin_lab.physics.render import image_losses, render_hartley

__all__ = ["PROBE_IMAGES", "min_gain", "restart", "restart_reason", "spherical_average", "structure_gain"]

PROBE_IMAGES = 512  # enough for the gain to vary by well under a percent between probe sets


def spherical_average(volume_ht: Tensor) -> Tensor:
    """The centred ``(D, D, D)`` Hartley volume averaged over shells of integer radius."""
    d = volume_ht.shape[-1]
    g = torch.arange(d, device=volume_ht.device) - d // 2
    radius = (g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2).sqrt().round().long()
    flat = radius.flatten()
    count = torch.bincount(flat).clamp(min=1)
    mean = torch.bincount(flat, volume_ht.flatten().to(torch.float64)) / count
    return mean.to(volume_ht.dtype)[radius]


@torch.no_grad()
def structure_gain(ctx: StepContext, branch: Branch) -> float:
    """The amortized branch's structure gain (see the module) on its next epoch's disc."""
    feed = ctx.feed
    rows = branch.rows(torch.arange(len(feed)))
    probe = rows[torch.linspace(0, len(rows) - 1, min(PROBE_IMAGES, len(rows))).round().long()]
    probe = ctx.comm.local(probe).to(feed.device)
    disc = feed.disc(branch.schedule_epoch)
    rotations, shifts, losses = encoder_candidates(ctx, branch, probe, disc)
    _, observed, ctf = feed.batch(probe, disc)
    ball = spherical_average(branch.volume.hartley().detach())
    best = losses.argmin(1)
    picked = torch.arange(len(probe), device=best.device)
    # the ball at the best candidate's pose: a grid-aligned slice (the identity) samples the shells
    # without interpolation and would not be the same image as at the other poses
    flat = render_hartley(
        ball, rotations[picked, best], disc, pixel_size_angstrom=ctx.pixel_size_angstrom, ctf_values=ctf,
        shifts_angstrom=None if shifts is None else shifts[picked, best], contrast=ctx.config.contrast,
    )  # fmt: skip
    best_loss, ball_loss = ctx.comm.sum_floats(
        losses.min(1).values.sum(), image_losses(flat, observed, disc, ctx.loss_kind).sum()
    )
    return (ball_loss - best_loss) / ball_loss


def min_gain(config: TrainingConfig) -> float:
    """The gain under which a start counts as stuck: ``stuck_min_gain`` (4 %), or
    ``stuck_min_gain_shifted`` (1.1 %) when shifts are estimated, because a shifted start's map
    lines up with fewer images while the shift heads learn, so its gain runs lower."""
    return config.stuck_min_gain_shifted if config.encoder.estimate_shifts else config.stuck_min_gain


def restart_reason(branch: Branch, gain: float, config: TrainingConfig) -> str | None:
    """Why ``branch`` restarts now (its structure gain after epoch ``stuck_check_epoch`` of its attempt
    is under :func:`min_gain`, and it has restarts left), else None."""
    cfg, threshold = config, min_gain(config)
    if not cfg.stuck_check_epoch or branch.schedule_epoch != cfg.stuck_check_epoch:
        return None
    if branch.pending_switch is not None or not gain < threshold:
        return None
    return (
        f"stuck start: after epoch {branch.schedule_epoch} of attempt {branch.attempt} the map explains "
        f"the images only {100 * gain:.1f} % better than its own spherical average (under "
        f"{100 * threshold:.3g} %)"
    )


def restart(
    branch: Branch, why: str, stamp: dict, ctx: StepContext, device: torch.device, gold_standard: bool
) -> Iterator[Event]:
    """Begin a stuck start again from a new seed while restarts are left (``stuck_restarts``, default 2);
    the run's end moves by the epochs the stuck attempt took. Gold-standard halves are not restarted
    (their epochs must stay in step); they only warn."""
    cfg = ctx.config
    if gold_standard or branch.attempt > cfg.stuck_restarts:
        left = "gold-standard halves are not restarted" if gold_standard else "no restart left"
        branch.stuck = True
        yield LogEvent(
            message=f"{why}; {left} (stuck_restarts={cfg.stuck_restarts})", level="warning", **stamp
        )
        return
    branch.restart(cfg, ctx.feed, device)
    convert_batchnorm(branch.encoder, ctx.comm)
    end = branch.last_epoch(cfg.n_epochs)
    message = f"{why}: attempt {branch.attempt} starts from a new seed; the run now ends after epoch {end}"
    yield LogEvent(message=message, level="warning", **stamp)
    detail = f"attempt {branch.attempt}: {why}"
    yield PhaseChangeEvent(
        previous=Phase.AMORTIZED, new=Phase.AMORTIZED, reason="restart", detail=detail, **stamp
    )
