"""The slicer's compiled kernel: trilinear central slices and their backward pass in C.

``slice_kernel.c`` is built on first use with the system's C compiler
(``$CC``, else ``cc``) into the cache (``$CRYOSPIN_LAB_CACHE/kernels``, under a
name that hashes the source and the flags), which takes about a second, and
loaded with ``ctypes``: no torch headers, so building does not slow the first
epoch. Where no compiler works the slicer falls back to ``grid_sample`` and
says so once (a ``RuntimeWarning`` naming the reason); ``CRYOSPIN_LAB_SLICER=
grid_sample`` asks for that path on purpose (benchmarks compare the two).

Why C: one sample is 8 reads of a volume that fits in cache, and the slices
of one image share their rotation, so the kernel keeps each image's plane in
registers and accumulates its rotation gradient in place (no ``(N, M, 3)``
coordinate tensor and no matmul to go back). The volume gets a border of
zeros, so that the loops have no branches and the compiler vectorises them
with gather instructions (``-march=native``; the build is keyed on the CPU and
retried without it where that fails); docs/decisions.md#slicer-c-kernel.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from cryospin_lab._cache import default_cache_dir

__all__ = ["available", "plane_l2_losses", "scatter_planes", "serves", "slice_planes", "unavailable_reason"]

# Reassociation (no finite-math assumption: NaNs must still show) lets the compiler vectorise the
# rotation gradient's sums; -march=native gives it the gather instructions (AVX2/AVX-512), 2-3x
# faster on x86, so the build is keyed on this CPU and retried without it where it fails.
CFLAGS = ("-O3", "-fPIC", "-shared", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
          "-fno-trapping-math")  # fmt: skip
NATIVE = ("-march=native",)
_SOURCES = ("slice_kernel.c", "slice_kernel.h")
_TYPES = {torch.float32: ("f32", ctypes.c_float), torch.float64: ("f64", ctypes.c_double)}

_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded library, or "reason": why there is none
_pool: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _cpu_identity() -> str:
    """What a ``-march=native`` build depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    return "".join(sorted({line for line in lines if line.startswith(("model name", "flags", "Features"))}))


def _compile(compiler: str, flags: tuple[str, ...], sources: dict[str, bytes], target: Path) -> None:
    """Build ``target`` in a temporary folder beside it and move it into place (atomic)."""
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        for name, text in sources.items():
            (Path(tmp) / name).write_bytes(text)
        built = Path(tmp) / target.name
        command = [compiler, *flags, str(Path(tmp) / "slice_kernel.c"), "-o", str(built), "-lm"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()[:500]}")
        os.replace(built, target)  # concurrent processes build the same file


def _build() -> ctypes.CDLL:
    """Compile (once per source, flags and CPU, cached) and load the library."""
    folder = resources.files("cryospin_lab.physics")
    sources = {name: (folder / name).read_bytes() for name in _SOURCES}
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler ({compiler!r} is not on PATH)")
    errors = []
    for flags in (CFLAGS + NATIVE, CFLAGS):
        key = repr((sorted(sources.items()), compiler, flags, _cpu_identity() if NATIVE[0] in flags else ""))
        target = (
            default_cache_dir()
            / "kernels"
            / f"slice_kernel_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
        )
        try:
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                _compile(compiler, flags, sources, target)
            lib = ctypes.CDLL(str(target))
            break
        except (OSError, RuntimeError) as error:
            errors.append(str(error))
    else:
        raise RuntimeError("; ".join(errors))
    for suffix, real in _TYPES.values():
        p, i = ctypes.c_void_p, ctypes.c_long
        getattr(lib, f"slice_forward_{suffix}").argtypes = [p, i, p, p, i, real, p, i, i]
        getattr(lib, f"slice_backward_{suffix}").argtypes = [p, i, p, p, i, real, p, p, p, i, i]
    return lib


def _library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (with one warning per process) where it cannot be built."""
    with _lock:
        if not _state:
            if os.environ.get("CRYOSPIN_LAB_SLICER", "c") == "grid_sample":
                _state["reason"] = "CRYOSPIN_LAB_SLICER=grid_sample"
            else:
                try:
                    _state["lib"] = _build()
                except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                    _state["reason"] = str(error)
                    warnings.warn(
                        f"the slicer's C kernel is unavailable ({error}); using torch's grid_sample, "
                        "about 3x slower on CPU",
                        RuntimeWarning,
                        stacklevel=3,
                    )
        return _state.get("lib")


def serves(volume: Tensor) -> bool:
    """Whether the kernel slices ``volume``: a CPU float32/float64 tensor, and the kernel built."""
    return volume.device.type == "cpu" and volume.dtype in (torch.float32, torch.float64) and available()


def available() -> bool:
    """Whether :func:`slice_planes` can run here (builds the kernel on the first call)."""
    return _library() is not None


def unavailable_reason() -> str | None:
    """Why the kernel is not used (None when it is)."""
    _library()
    return _state.get("reason")


def _ptr(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _n_parts(n: int) -> int:
    """One contiguous part of the slices per torch thread, at least 16 slices each."""
    return max(1, min(torch.get_num_threads(), n // 16))


def _run_split(n: int, job) -> None:
    """``job(part, n0, n1)`` for each of :func:`_n_parts` parts of ``range(n)``, on threads.

    ctypes releases the GIL during each call, so the parts run in parallel.
    """
    n_parts = _n_parts(n)
    bounds = [n * t // n_parts for t in range(n_parts + 1)]
    if n_parts == 1:
        job(0, 0, n)
        return
    with _lock:  # one pool per size and process (a forked child must not use its parent's threads)
        key = (os.getpid(), n_parts)
        pool = _pool.get(key) or _pool.setdefault(key, ThreadPoolExecutor(n_parts, "cryospin-slicer"))
    for future in [pool.submit(job, t, bounds[t], bounds[t + 1]) for t in range(n_parts)]:
        future.result()


def _padded(volume: Tensor) -> Tensor:
    """``volume`` with the kernel's border of zeros."""
    return torch.nn.functional.pad(volume, (1, 1, 1, 1, 1, 1))


def _forward(padded: Tensor, planes: Tensor, freqs: Tensor, center: float) -> Tensor:
    """``(N, M)`` samples of a padded ``(D + 2)^3`` volume (see :func:`slice_planes`), no autograd."""
    suffix, real = _TYPES[padded.dtype]
    lib, d, m, n = _library(), padded.shape[0] - 2, freqs.shape[0], planes.shape[0]
    out = padded.new_empty(n, m)
    forward = getattr(lib, f"slice_forward_{suffix}")

    def job(part: int, n0: int, n1: int) -> None:
        forward(_ptr(padded), d, _ptr(planes), _ptr(freqs), m, real(center), _ptr(out), n0, n1)

    _run_split(n, job)
    return out


def _backward(
    padded: Tensor, planes: Tensor, freqs: Tensor, center: float, grad_out: Tensor, need_volume: bool,
    need_planes: bool,
) -> tuple[Tensor | None, Tensor | None]:  # fmt: skip
    """The gradients of ``sum(grad_out * samples)`` w.r.t. the unpadded volume and the planes."""
    suffix, real = _TYPES[padded.dtype]
    lib, d, m, n = _library(), padded.shape[0] - 2, freqs.shape[0], planes.shape[0]
    grad_out = grad_out.contiguous()
    grad_volumes = padded.new_zeros(_n_parts(n), d + 2, d + 2, d + 2) if need_volume else None
    grad_planes = torch.empty_like(planes) if need_planes else None
    backward = getattr(lib, f"slice_backward_{suffix}")

    def job(part: int, n0: int, n1: int) -> None:
        own = None if grad_volumes is None else grad_volumes[part]  # summed below
        args = (_ptr(grad_out), _ptr(own), _ptr(grad_planes), n0, n1)
        backward(_ptr(padded), d, _ptr(planes), _ptr(freqs), m, real(center), *args)

    _run_split(n, job)
    grad_volume = None if grad_volumes is None else grad_volumes.sum(0)[1:-1, 1:-1, 1:-1]
    return grad_volume, grad_planes


class _SlicePlanes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, volume: Tensor, planes: Tensor, freqs: Tensor, center: float) -> Tensor:
        padded = _padded(volume)
        ctx.save_for_backward(padded, planes, freqs)
        ctx.center = center
        return _forward(padded, planes, freqs, center)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        padded, planes, freqs = ctx.saved_tensors
        need_volume, need_planes = ctx.needs_input_grad[:2]
        grad_volume, grad_planes = _backward(
            padded, planes, freqs, ctx.center, grad_out, need_volume, need_planes
        )
        return grad_volume, grad_planes, None, None


class _PlaneL2Losses(torch.autograd.Function):
    """Per-slice ``mean_k (w[n, k] * sample[n, k] - y[n, k])^2``, differentiable w.r.t. the planes only."""

    @staticmethod
    def forward(ctx, volume: Tensor, planes: Tensor, freqs: Tensor, center: float, weights, observed):
        padded = _padded(volume)
        residual = _forward(padded, planes, freqs, center).mul_(weights).sub_(observed)
        losses = (residual * residual).mean(-1)
        ctx.save_for_backward(padded, planes, freqs, residual, weights)
        ctx.center = center
        return losses

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_losses: Tensor):
        padded, planes, freqs, residual, weights = ctx.saved_tensors
        # d loss_n / d sample[n, k] = 2 w[n, k] r[n, k] / M
        grad_samples = residual.mul(weights).mul_(grad_losses[:, None] * (2.0 / residual.shape[-1]))
        _, grad_planes = _backward(padded, planes, freqs, ctx.center, grad_samples, False, True)
        return None, grad_planes, None, None, None, None


def slice_planes(volume: Tensor, planes: Tensor, freqs: Tensor, center: float) -> Tensor:
    """``(N, M)`` trilinear samples of ``volume[z, y, x]`` at ``kx P[n, 0:3] + ky P[n, 3:6] + center``.

    ``volume`` is ``(D, D, D)``, ``planes`` ``(N, 6)`` (the first two rows of
    each rotation, in index units), ``freqs`` ``(M, 2)``; float32 or float64 on
    the CPU, differentiable once w.r.t. the volume and the planes. Corners
    outside the grid read zero. Call :func:`available` first.
    """
    dtype = volume.dtype
    return _SlicePlanes.apply(
        volume.contiguous(), planes.to(dtype).contiguous(), freqs.to(dtype).contiguous(), float(center)
    )


def plane_l2_losses(
    volume: Tensor, planes: Tensor, freqs: Tensor, center: float, weights: Tensor, observed: Tensor
) -> Tensor:
    """``(N,)`` losses ``mean_k (weights * slice_planes(...) - observed)^2``, with a hand-written backward
    to the planes (not the volume, which must not need a gradient).

    ``weights`` and ``observed`` are ``(N, M)``. The same values and plane gradients as autograd
    through :func:`slice_planes` and the element-wise loss, in two kernel calls and three passes
    over the samples: the direct stage's pose steps, where the volume is fixed
    (docs/decisions.md#fused-pose-loss).
    """
    if volume.requires_grad:
        raise ValueError("plane_l2_losses gives no volume gradient: pass a detached volume")
    dtype = volume.dtype
    return _PlaneL2Losses.apply(
        volume.contiguous(), planes.to(dtype).contiguous(), freqs.to(dtype).contiguous(), float(center),
        weights.to(dtype).contiguous(), observed.to(dtype).contiguous(),
    )  # fmt: skip


def scatter_planes(values: Tensor, planes: Tensor, freqs: Tensor, center: float, size: int) -> Tensor:
    """The adjoint of :func:`slice_planes`: ``(size, size, size)`` volume of the ``(N, M)`` ``values``
    spread on the trilinear corners of their samples, with no forward pass and no autograd graph.

    The same sums as the volume gradient of ``(slice_planes(v, ...) * values).sum()``, in one
    kernel call instead of a forward slice of an empty volume and a backward: the back-projection
    of the half maps and the rebuilt map (docs/decisions.md#backprojection-adjoint).
    """
    dtype = values.dtype
    padded = values.new_zeros(size + 2, size + 2, size + 2)  # read only for its size and dtype
    planes, freqs = planes.to(dtype).contiguous(), freqs.to(dtype).contiguous()
    grad_volume, _ = _backward(padded, planes, freqs, float(center), values, True, False)
    return grad_volume
