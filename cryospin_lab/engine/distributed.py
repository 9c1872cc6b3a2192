"""Data-parallel training over ranks with ``torch.distributed`` (``torchrun``, one process per GPU or CPU).

What a rank does (see :class:`Comm`):

* **Particles are sharded by index**: rank ``r`` of ``W`` owns images ``i`` with
  ``i % W == r``. Every rank walks the same seeded global batches (the order a
  one-process run uses) and trains on the images of each batch it owns, read
  from the memory-mapped stack (no rank loads the whole stack). Ownership is
  fixed, so in the direct stage each rank updates only its own rows of the
  pose table: no table is exchanged per step.
* **Gradients are summed across ranks** after each backward (what
  ``DistributedDataParallel`` does, by hand here because the volume is rendered
  outside a module's forward; one flat all-reduce per step). Each rank's loss is
  the sum over its images divided by the *global* batch size, so the summed
  gradient is the one-process batch-mean gradient exactly, however unevenly a
  batch splits.
* **Batch norm uses the global batch's statistics** (:class:`DistributedBatchNorm`,
  autograd through the all-reduce): ``torch.nn.SyncBatchNorm`` needs a GPU, and
  per-rank statistics would make the run depend on the number of ranks.
* **Epoch ends**: head wins, loss gap and per-image best poses are reduced, so
  the switch rule decides the same on every rank; metrics and events come from
  rank 0; checkpoints are written by rank 0 with every row merged, in the
  one-process format, so any number of ranks can resume them.

``Comm()`` (one process) does nothing: the single-process path is unchanged.
Backends: ``nccl`` on CUDA, ``gloo`` on CPU. Tested with 2 gloo processes
(``tests/engine/test_distributed.py``): the same volume and poses as one process with the
same global batch.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Comm", "DistributedBatchNorm", "convert_batchnorm", "free_port", "init_from_env"]


class Comm:
    """This process's place among ``world`` ranks; collective helpers that are no-ops for one rank."""

    def __init__(self, rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside 0..{world - 1}")
        self.rank, self.world = int(rank), int(world)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def __repr__(self) -> str:
        return f"Comm(rank={self.rank}, world={self.world})"

    def owns(self, indices: Tensor) -> Tensor:
        """Boolean mask: which of ``indices`` (image numbers) this rank trains on."""
        return (indices % self.world) == self.rank

    def local(self, indices: Tensor) -> Tensor:
        return indices if not self.active else indices[self.owns(indices)]

    def sum_(self, tensor: Tensor) -> Tensor:
        """In-place sum over ranks (returns ``tensor``)."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum_floats(self, *values: float) -> list[float]:
        if not self.active:
            return [float(v) for v in values]
        packed = torch.tensor(values, dtype=torch.float64, device=self._device())
        return [float(v) for v in self.sum_(packed).cpu()]

    def sync_grads(self, parameters) -> None:
        """Sum the gradients of ``parameters`` over ranks (missing ones count as zero)."""
        if not self.active:
            return
        params = [p for p in parameters if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        self.sum_(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n

    def merge_rows(self, tensor: Tensor) -> Tensor:
        """A copy of per-image ``tensor`` (rows = images) with every row taken from the rank that owns it."""
        if not self.active:
            return tensor.clone()
        rows = torch.arange(tensor.shape[0], device=tensor.device)
        mask = self.owns(rows).reshape(-1, *([1] * (tensor.ndim - 1)))
        kind = tensor.dtype
        work = torch.where(mask, tensor, torch.zeros((), dtype=kind, device=tensor.device))
        # summed as float64 or int64 on the backend's device (nccl: CUDA only, and no bool sums)
        work = work.to(self._device(), torch.float64 if kind.is_floating_point else torch.int64)
        return self.sum_(work).to(tensor.device, kind)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def _device(self) -> torch.device:
        if self.active and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for ``MASTER_PORT`` of a one-node job, or a local server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> Comm:
    """The :class:`Comm` of a process started by ``torchrun`` (``RANK``/``WORLD_SIZE`` set), after
    ``init_process_group``; ``Comm()`` when ``WORLD_SIZE`` is unset or 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Comm()
    rank = int(os.environ["RANK"])
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Comm(rank, world)


class _SumOverRanks(torch.autograd.Function):
    """``y = sum over ranks of x``; backward: each rank's ``x`` feeds every rank's loss, so its gradient
    is the sum over ranks of ``dL/dy``. (``torch.distributed.nn.functional.all_reduce``, deprecated,
    gave wrong batch-norm gradients here: checked against ``nn.BatchNorm`` in one process.)"""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class DistributedBatchNorm(nn.Module):
    """Batch norm over the global batch (all ranks), for CPU and GPU; wraps a ``nn.BatchNorm*d``'s state.

    Training: mean and biased variance from sums all-reduced with autograd, running
    statistics updated with the unbiased variance as torch does. Evaluation: the
    running statistics, as ``F.batch_norm``.
    """

    def __init__(self, source: nn.modules.batchnorm._BatchNorm, comm: Comm):
        super().__init__()
        self.comm = comm
        self.eps, self.momentum = source.eps, source.momentum
        self.weight, self.bias = source.weight, source.bias
        self.register_buffer("running_mean", source.running_mean)
        self.register_buffer("running_var", source.running_var)
        self.register_buffer("num_batches_tracked", source.num_batches_tracked)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        dims = [0, *range(2, x.ndim)]
        count = torch.tensor([x.numel() / max(x.shape[1], 1)], dtype=x.dtype, device=x.device)
        packed = torch.cat([x.sum(dims), (x * x).sum(dims), count])
        if self.comm.active:
            packed = _SumOverRanks.apply(packed)
        c = x.shape[1]
        total, total_sq, n = packed[:c], packed[c : 2 * c], packed[-1]
        mean = total / n
        var = (total_sq / n - mean * mean).clamp(min=0)
        with torch.no_grad():
            m = self.momentum if self.momentum is not None else 0.1
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * n / max(float(n) - 1, 1.0))
            self.num_batches_tracked.add_(1)
        shape = [1, c] + [1] * (x.ndim - 2)
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape)


def convert_batchnorm(module: nn.Module, comm: Comm) -> nn.Module:
    """Replace every ``nn.BatchNorm*d`` in ``module`` by a :class:`DistributedBatchNorm` sharing its
    parameters and buffers (state-dict keys unchanged); a no-op for one rank."""
    if not comm.active:
        return module
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, DistributedBatchNorm(child, comm))
        else:
            convert_batchnorm(child, comm)
    return module
