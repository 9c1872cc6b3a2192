"""A branch of a run: one whole reconstruction state (paper Fig. 4 forks a run into two)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from cryospin_lab.engine.config import TrainingConfig, parse_switch_rule
from cryospin_lab.engine.events import Phase
from cryospin_lab.engine.feed import ParticleFeed
from cryospin_lab.model.encoder import MultiHeadEncoder
from cryospin_lab.model.hartley_volume import HartleyVolume
from cryospin_lab.model.pose_table import PoseTable

if TYPE_CHECKING:
    from cryospin_lab.engine.distributed import Comm

__all__ = ["Branch"]


class Branch:
    """One reconstruction state: volume, encoder or pose table, optimisers, phase.

    Created by :class:`~cryospin_lab.engine.trainer.Trainer`; :meth:`start_direct`
    is the switch; :meth:`copy` makes the independent children of a fork;
    :meth:`state_dict` / :meth:`from_state` go through checkpoints (tensors and
    plain values only).
    """

    def __init__(
        self,
        name: str,
        config: TrainingConfig,
        feed: ParticleFeed,
        device: torch.device,
        *,
        subset: Tensor | None = None,
        seed_offset: int = 0,
    ):
        cfg = config
        seed = cfg.seed + seed_offset
        gen = torch.Generator().manual_seed(seed)
        # The rows this branch trains on (a gold-standard half), None for all; sorted, read-only use.
        self.subset = None if subset is None else torch.as_tensor(subset, dtype=torch.long).sort().values
        self.name = name
        self.phase = Phase.AMORTIZED
        self.epoch = 0  # epochs completed
        self.step = 0
        self.seed_offset = seed_offset
        self.attempt = 1  # amortized starts so far (a stuck start is restarted: engine/stuck.py)
        self.epoch_offset = 0  # the epoch the current attempt started at; schedules count from it
        self.switch_rule = parse_switch_rule(cfg.switch)
        self.pending_switch: str | None = None  # reason of a switch requested for the next step
        if self.switch_rule == 0:
            self.pending_switch = "epoch"  # switch before the first step: direct optimisation from the start
        torch.manual_seed(seed)
        self.encoder: MultiHeadEncoder | None = MultiHeadEncoder(cfg.encoder).to(device)
        self.volume = HartleyVolume(feed.box_size, generator=gen).to(device)
        with torch.no_grad():
            # Start at the data's scale: exponent = log of the expected Hartley magnitude per
            # shell, mantissa small and random (see ParticleFeed._signal_envelope).
            self.volume.exponent.copy_(torch.log(feed.signal_envelope).to(device))
            self.volume.mantissa.mul_(cfg.volume_init_mantissa)
        self.encoder_opt: torch.optim.Optimizer | None = adam(self.encoder.parameters(), cfg.encoder_lr)
        self.decoder_opt = adam(self.volume.parameters(), cfg.decoder_lr)
        self.pose_table: PoseTable | None = None
        n, n_heads = len(feed), cfg.encoder.n_heads
        # Each image's best candidate as last seen in training (amortized) -- for the pose
        # error during the amortized stage and for the auto switch rule.
        self.best_rotations = torch.eye(3).repeat(n, 1, 1)
        self.best_heads = torch.full((n,), -1, dtype=torch.long)
        # and its shift (Å) when shifts are estimated: what an amortized run's poses.star says
        self.best_shifts = torch.zeros(n, 2) if cfg.encoder.estimate_shifts else None
        self.previous_best = self.best_rotations.clone()
        self.head_wins = torch.zeros(n_heads, dtype=torch.long)
        self.epoch_loss_sum, self.epoch_images, self.epoch_gap_sum = 0.0, 0, 0.0
        self.batch_iter: Iterator[Tensor] | None = None
        self.gap_history: list[float] = []  # head loss gap per amortized epoch (auto switch rule)
        self.loss_history: list[float] = []  # mean loss per amortized epoch (auto switch rule)
        # the direct stage's last re-search: its epoch, and whether it moved almost nothing (rescue.py)
        self.last_rescue_epoch, self.rescue_idle = 0, False
        self.last_halfmap_epoch = 0  # the last re-search under the half maps (rescue.py)
        self.extra_epochs = 0  # epochs added past n_epochs while the re-search moved images (rescue.py)
        self.stuck = False  # its last attempt was judged stuck with no restart left (stuck.py)

    def state_dict(self) -> dict:
        return {
            "name": self.name,
            "phase": self.phase.value,
            "epoch": self.epoch,
            "step": self.step,
            "encoder": None if self.encoder is None else self.encoder.state_dict(),
            "encoder_opt": None if self.encoder_opt is None else self.encoder_opt.state_dict(),
            "volume": self.volume.state_dict(),
            "decoder_opt": self.decoder_opt.state_dict(),
            "pose_table": None if self.pose_table is None else self.pose_table.state_dict(),
            "best_rotations": self.best_rotations,
            "best_heads": self.best_heads,
            "best_shifts": self.best_shifts,
            "previous_best": self.previous_best,
            "gap_history": list(self.gap_history),
            "loss_history": list(self.loss_history),
            "pending_switch": self.pending_switch or "",
            "switch_rule": str(self.switch_rule),
            "subset": self.subset,
            "attempt": self.attempt,
            "epoch_offset": self.epoch_offset,
            "seed_offset": self.seed_offset,
            "last_rescue_epoch": self.last_rescue_epoch,
            "rescue_idle": self.rescue_idle,
            "last_halfmap_epoch": self.last_halfmap_epoch,
            "extra_epochs": self.extra_epochs,
            "stuck": self.stuck,
        }

    def merge_ranks(self, comm: Comm) -> None:
        """Several ranks: every rank takes the epoch's counts and sums from all, and each image's row
        (best pose, pose table and its Adam moments) from the rank that owns it. Then the switch rule
        decides alike everywhere, and rank 0 holds the whole state for metrics and checkpoints."""
        comm.sum_(self.head_wins)
        (self.epoch_gap_sum,) = comm.sum_floats(self.epoch_gap_sum)
        self.best_rotations = comm.merge_rows(self.best_rotations)
        self.best_heads = comm.merge_rows(self.best_heads)
        if self.best_shifts is not None:
            self.best_shifts = comm.merge_rows(self.best_shifts)
        table = self.pose_table
        if table is not None:
            table.rotations = comm.merge_rows(table.rotations)
            table.shifts_angstrom = comm.merge_rows(table.shifts_angstrom)
            for adam in (table.rotation_adam, table.shift_adam):
                for name in ("exp_avg", "exp_avg_sq", "steps"):
                    setattr(adam, name, comm.merge_rows(getattr(adam, name)))

    @property
    def schedule_epoch(self) -> int:
        """Epochs completed by the current attempt: what the disc ramp and the switch rule count."""
        return self.epoch - self.epoch_offset

    def last_epoch(self, n_epochs: int) -> int:
        """The epoch the branch ends after: ``n_epochs`` counted from its current attempt, plus the
        epochs its re-search added (``extra_epochs``)."""
        return n_epochs + self.epoch_offset + self.extra_epochs

    def finished(self, n_epochs: int) -> bool:
        """Whether the branch has run to :meth:`last_epoch`."""
        return self.epoch >= self.last_epoch(n_epochs)

    def restart(self, config: TrainingConfig, feed: ParticleFeed, device: torch.device) -> None:
        """A new amortized start: encoder, volume and optimisers from a new seed, epochs and steps
        counted on, the schedules counted from here (a stuck start, engine/stuck.py)."""
        fresh = Branch(self.name, config, feed, device, subset=self.subset,
                       seed_offset=self.seed_offset + 1000 * self.attempt)  # fmt: skip
        kept = dict(epoch=self.epoch, step=self.step, attempt=self.attempt + 1, epoch_offset=self.epoch,
                    seed_offset=self.seed_offset)  # fmt: skip
        self.__dict__.update(fresh.__dict__)
        self.__dict__.update(kept)

    def rows(self, values: Tensor) -> Tensor:
        """``values`` restricted to this branch's rows (all rows outside gold-standard mode)."""
        return values if self.subset is None else values[self.subset.to(values.device)]

    def current_rotations(self) -> Tensor:
        """Every image's rotation ``(N, 3, 3)`` on the CPU: the pose table's (direct stage), else each
        image's best candidate when it was last seen in training (amortized stage)."""
        return self.best_rotations if self.pose_table is None else self.pose_table.rotations.cpu()

    def current_shifts(self) -> Tensor | None:
        """Every image's shift ``(N, 2)`` in Å on the CPU when shifts are estimated, else None: the pose
        table's (direct stage), else each image's best candidate's when it was last seen in training."""
        table = self.pose_table
        if table is None:
            return self.best_shifts
        return table.shifts_angstrom.cpu() if table.estimate_shifts else None

    @torch.no_grad()
    def volume_real(self) -> Tensor:
        """The current real-space map ``(D, D, D)`` (float32, CPU)."""
        return self.volume.to_real().float().cpu()

    def start_epoch(self) -> None:
        """Zero the epoch's sums and head wins; today's best poses become the reference of the next
        epoch's pose change."""
        self.previous_best = self.best_rotations.clone()
        self.head_wins.zero_()
        self.epoch_loss_sum, self.epoch_images, self.epoch_gap_sum = 0.0, 0, 0.0

    def start_direct(self, rotations: Tensor, shifts: Tensor, config: TrainingConfig) -> None:
        """The switch (Eq. 6): the chosen poses become the pose table's rows, the encoder is dropped (poses
        are free parameters now) and the decoder continues at ``decoder_lr_direct``."""
        self.pose_table = _pose_table(config, rotations, shifts)
        self.phase = Phase.DIRECT
        self.encoder, self.encoder_opt = None, None
        for group in self.decoder_opt.param_groups:
            group["lr"] = config.decoder_lr_direct
        self.pending_switch = None
        self.last_rescue_epoch, self.rescue_idle = self.epoch, False
        self.last_halfmap_epoch = self.epoch

    @classmethod
    def from_state(
        cls, state: dict, config: TrainingConfig, feed: ParticleFeed, device: torch.device
    ) -> Branch:
        """A branch restored from :meth:`state_dict`, sharing no tensor with ``state``.

        Copied first: torch's optimisers and the pose table load their moments and rows by
        reference, so training would change ``state``, and a second restore from the same
        object (a benchmark's A/B continuations) would start from the first one's end.
        """
        state = copy.deepcopy(state)
        seed_offset = int(state.get("seed_offset", 0))
        branch = cls(state["name"], config, feed, device, subset=state.get("subset"), seed_offset=seed_offset)
        branch.phase = Phase(state["phase"])
        branch.epoch, branch.step = int(state["epoch"]), int(state["step"])
        branch.attempt, branch.epoch_offset = int(state.get("attempt", 1)), int(state.get("epoch_offset", 0))
        branch.volume.load_state_dict(state["volume"])
        branch.decoder_opt.load_state_dict(state["decoder_opt"])
        if state["encoder"] is None:
            branch.encoder, branch.encoder_opt = None, None
        else:
            branch.encoder.load_state_dict(state["encoder"])
            branch.encoder_opt.load_state_dict(state["encoder_opt"])
        if state["pose_table"] is not None:
            saved = state["pose_table"]
            branch.pose_table = _pose_table(config, saved["rotations"], saved["shifts_angstrom"])
            branch.pose_table.load_state_dict(saved)
        branch.best_rotations = state["best_rotations"].clone()
        branch.best_heads = state["best_heads"].clone()
        if branch.best_shifts is not None and state.get("best_shifts") is not None:
            branch.best_shifts = state["best_shifts"].clone()
        branch.previous_best = state["previous_best"].clone()
        branch.gap_history = [float(g) for g in state.get("gap_history", [])]
        branch.loss_history = [float(g) for g in state.get("loss_history", [])]
        branch.pending_switch = state["pending_switch"] or None
        branch.switch_rule = parse_switch_rule(state["switch_rule"])
        branch.last_rescue_epoch = int(state.get("last_rescue_epoch", 0))
        branch.rescue_idle = bool(state.get("rescue_idle", False))
        branch.last_halfmap_epoch = int(state.get("last_halfmap_epoch", branch.last_rescue_epoch))
        branch.extra_epochs = int(state.get("extra_epochs", 0))
        branch.stuck = bool(state.get("stuck", False))
        return branch

    def fork(self, suffix: str = "") -> tuple[Branch, Branch]:
        """Two independent copies, ``amortized<suffix>`` that never switches and ``direct<suffix>``
        that switches before its next step (paper Fig. 4)."""
        amortized, direct = self.copy(f"amortized{suffix}"), self.copy(f"direct{suffix}")
        amortized.switch_rule, amortized.pending_switch = "never", None
        direct.pending_switch = "manual"
        return amortized, direct

    def copy(self, name: str) -> Branch:
        """An independent copy named ``name`` (deep-copied modules and optimiser state)."""
        parent = self
        child = copy.copy(parent)
        child.name = name
        for attr in ("encoder", "volume", "pose_table"):
            setattr(child, attr, copy.deepcopy(getattr(parent, attr)))
        child.encoder_opt = _copied_optimizer(parent.encoder_opt, child.encoder)
        child.decoder_opt = _copied_optimizer(parent.decoder_opt, child.volume)
        for attr in ("best_rotations", "best_heads", "previous_best", "head_wins"):
            setattr(child, attr, getattr(parent, attr).clone())
        if parent.best_shifts is not None:
            child.best_shifts = parent.best_shifts.clone()
        child.gap_history = list(parent.gap_history)
        child.loss_history = list(parent.loss_history)
        child.batch_iter = None  # the epoch in progress restarts for both children
        child.epoch_loss_sum, child.epoch_images, child.epoch_gap_sum = 0.0, 0, 0.0
        child.head_wins = torch.zeros_like(parent.head_wins)
        return child


def adam(params, lr: float) -> torch.optim.Adam:
    """torch's Adam, fused where all parameters are on the CPU or a CUDA device, else its default.
    Why: one pass over each tensor per step instead of about ten (docs/decisions.md#fused-adam);
    the update is the same up to round-off."""
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") for p in params) or None
    return torch.optim.Adam(params, lr=lr, fused=fused)


def _pose_table(cfg: TrainingConfig, rotations: Tensor, shifts_angstrom: Tensor) -> PoseTable:
    return PoseTable(
        rotations,
        shifts_angstrom,
        lr=cfg.pose_lr,
        betas=cfg.pose_betas,
        shift_lr_angstrom=cfg.shift_lr_angstrom,
        estimate_shifts=cfg.encoder.estimate_shifts,
    )


def _copied_optimizer(optimizer, module):
    if optimizer is None:
        return None
    new = type(optimizer)(module.parameters(), **optimizer.defaults)
    new.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    return new
