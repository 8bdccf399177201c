"""Fused one-pass kernels for the worker's vector work: the outgoing tensor of a window, and installing a center.

A worker's trainable parameters are one flat vector (:mod:`lightning_adag.flat`), so each exchange is an elementwise
pass over a few vectors. Written as plain torch ops that pass is several kernels, each reading and writing the whole
vector; on a GPU worker that costs several times the memory traffic the math needs. The Triton kernels here read
every input once and write every output once.

Each public function dispatches: the Triton kernel when ``triton`` imports and the tensors are on CUDA (or when
``TRITON_INTERPRET=1`` is set, so tests run the Triton code on the CPU), the torch reference otherwise. Both paths do
the same math: inputs are widened to float32, combined, and rounded once to each output's dtype, so on the CPU they
agree bit for bit. (Compiled CUDA code may contract a multiply and an add into one FMA: the last bit may differ.)
Float64 tensors always take the torch path, computed in float64.

All tensors must be 1-D, contiguous, of equal length and on one device; the Triton path launches on the current CUDA
device, which Lightning sets to the worker's. How to measure them on a GPU: ``python benchmarks/kernel.py``.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path serves every call
    triton = tl = None

#: Elements per Triton program. Tests use it to aim at the edges of the last, partial block.
BLOCK = 4096
_WARPS = 8
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def window_delta(theta: Tensor, theta0: Tensor, scale: float, out: Tensor, residual: Tensor | None = None) -> None:
    """``out = (theta - theta0) * scale`` in ``out``'s dtype (the wire dtype), in one pass.

    ``scale`` is ``1 / steps`` for ADAG and ``1.0`` for DOWNPOUR. With ``residual`` (float32), error feedback for a
    narrow wire: ``exact = (theta - theta0) * scale + residual`` is computed in float32, ``out = exact`` rounded to
    ``out``'s dtype, and ``residual = exact - out``, so what rounding drops now is sent with a later commit.
    A finite value beyond ``out``'s range is sent as its largest finite value (the residual keeps the excess), never
    as an infinity that would poison the center. A non-finite one (a diverged worker) is sent as it is, on every
    wire, so that the server refuses the commit instead of adding the largest value to the center.
    """
    tensors = {"theta": theta, "theta0": theta0, "out": out}
    if residual is not None:
        tensors["residual"] = residual
        if residual.dtype != torch.float32:
            raise ValueError(f"residual must be float32 (it keeps what the wire dtype drops), got {residual.dtype}")
    largest = torch.finfo(out.dtype).max
    if _use_triton(tensors):
        _launch(_window_delta_kernel, theta, theta0, out, residual, float(scale), largest)
        return
    compute = _compute_dtype(tensors)
    exact = _scaled_difference(theta, theta0, scale, out, compute)
    if residual is not None:
        exact.add_(residual)
    if exact is not out and out.dtype.itemsize < exact.dtype.itemsize:  # narrowing: clamp what is finite only
        clamped = exact.clamp(-largest, largest)
        out.copy_(torch.where(exact.isinf(), exact, clamped, out=clamped))
    elif exact is not out:
        out.copy_(exact)
    if residual is not None:
        torch.sub(exact, out.to(compute), out=residual)


def elastic_exchange(theta: Tensor, center: Tensor, alpha: float, out: Tensor) -> None:
    """AEASGD's worker side in one pass: ``E = alpha * (theta - center)``, ``theta -= E``, ``out = E``.

    ``E`` is rounded to ``out``'s dtype before it is subtracted, so the worker moves by exactly what the server will
    add: the elastic force stays symmetric (``theta + center`` is kept) whatever the wire dtype.
    """
    tensors = {"theta": theta, "center": center, "out": out}
    if _use_triton(tensors):
        _launch(_elastic_exchange_kernel, theta, center, out, float(alpha))
        return
    compute = _compute_dtype(tensors)
    elastic = _scaled_difference(theta, center, alpha, out, compute)
    if elastic is not out:
        out.copy_(elastic)
    if theta.dtype == compute:
        theta.sub_(out)
    else:  # widen explicitly: how an in-place op mixes a 16-bit tensor with a float32 one varies across torch releases
        theta.copy_(theta.to(compute).sub_(out.to(compute)))


def install_center(center: Tensor, theta: Tensor, theta0: Tensor) -> None:
    """Start a window from a pulled center: ``theta = center``, ``theta0 = center``, reading ``center`` once and
    casting it to each destination's dtype (a float32 center into bfloat16 parameters, for example)."""
    if _use_triton({"center": center, "theta": theta, "theta0": theta0}):
        _launch(_install_center_kernel, center, theta, theta0)
        return
    theta.copy_(center)
    theta0.copy_(center)


def fold_center(center: Tensor, theta: Tensor, theta0: Tensor) -> None:
    """Fold a center that arrived while the worker kept training (overlapped communication), in one pass:
    ``theta += center - theta0``, ``theta0 = center``.

    ``theta0`` is where the running window started, so ``theta - theta0`` is the local progress since then; after
    the fold the worker stands on the center plus exactly that progress, and its next delta ``theta - theta0`` still
    measures only its own steps.
    """
    tensors = {"center": center, "theta": theta, "theta0": theta0}
    if _use_triton(tensors):
        _launch(_fold_center_kernel, center, theta, theta0)
        return
    compute = _compute_dtype(tensors)
    theta.copy_(torch.sub(center.to(compute), theta0.to(compute)).add_(theta.to(compute)))
    theta0.copy_(center)


def _use_triton(tensors: dict[str, Tensor]) -> bool:
    """Raise a ``ValueError`` unless the tensors can be treated as flat vectors; whether Triton should run."""
    for name, tensor in tensors.items():
        if tensor.dim() != 1 or not tensor.is_contiguous():
            raise ValueError(
                f"{name} must be a 1-D contiguous tensor (a region of the flat parameter vector), got shape"
                f" {tuple(tensor.shape)} with strides {tensor.stride()}"
            )
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    sizes = {name: t.numel() for name, t in tensors.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"the tensors must have equal lengths, got {sizes}")
    devices = {name: str(t.device) for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"the tensors must be on one device, got {devices}")
    if triton is None or any(t.dtype not in _TRITON_DTYPES for t in tensors.values()):
        return False
    return _interpreting() or next(iter(tensors.values())).is_cuda


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _compute_dtype(tensors: dict[str, Tensor]) -> torch.dtype:
    """float32, or float64 when a tensor is float64: the precision every input is widened to."""
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors.values()), torch.float32)


def _scaled_difference(a: Tensor, b: Tensor, scale: float, out: Tensor, compute: torch.dtype) -> Tensor:
    """``(a - b) * scale`` in ``compute`` precision, written straight into ``out`` when it has that dtype."""
    return torch.sub(a.to(compute), b.to(compute), out=out if out.dtype == compute else None).mul_(scale)


def _launch(kernel, *args) -> None:
    """Run ``kernel`` over the first tensor's elements, one program per ``BLOCK``."""
    numel = args[0].numel()
    if numel:
        grid = (triton.cdiv(numel, BLOCK),)
        _jitted(kernel, _interpreting())[grid](*args, numel, BLOCK=BLOCK, num_warps=_WARPS)


@functools.cache
def _jitted(kernel, interpret: bool):
    """``triton.jit(kernel)``, made on first use once per mode: ``triton.jit`` decides between compiling and
    interpreting when it wraps a function (it reads ``TRITON_INTERPRET`` then), so wrapping lazily lets a test switch
    to the interpreter after import without a CUDA run ever paying for it. ``interpret`` is the cache key."""
    return triton.jit(kernel)


# Triton kernel bodies, wrapped by _jitted. Offsets are int64 so vectors over 2**31 elements stay addressable.
def _window_delta_kernel(theta, theta0, out, residual, scale, largest, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    exact = tl.load(theta + offsets, mask=mask).to(tl.float32) - tl.load(theta0 + offsets, mask=mask).to(tl.float32)
    exact = exact * scale
    if residual is not None:
        exact = exact + tl.load(residual + offsets, mask=mask)
    clamped = tl.clamp(exact, -largest, largest, propagate_nan=tl.PropagateNan.ALL)
    sent = tl.where(tl.abs(exact) == float("inf"), exact, clamped).to(out.dtype.element_ty)
    tl.store(out + offsets, sent, mask=mask)
    if residual is not None:
        tl.store(residual + offsets, exact - sent.to(tl.float32), mask=mask)


def _elastic_exchange_kernel(theta, center, out, alpha, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    local = tl.load(theta + offsets, mask=mask).to(tl.float32)
    elastic = (alpha * (local - tl.load(center + offsets, mask=mask).to(tl.float32))).to(out.dtype.element_ty)
    tl.store(out + offsets, elastic, mask=mask)
    tl.store(theta + offsets, (local - elastic.to(tl.float32)).to(theta.dtype.element_ty), mask=mask)


def _install_center_kernel(center, theta, theta0, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    value = tl.load(center + offsets, mask=mask)
    tl.store(theta + offsets, value.to(theta.dtype.element_ty), mask=mask)
    tl.store(theta0 + offsets, value.to(theta0.dtype.element_ty), mask=mask)


def _fold_center_kernel(center, theta, theta0, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    value = tl.load(center + offsets, mask=mask)
    moved = value.to(tl.float32) - tl.load(theta0 + offsets, mask=mask).to(tl.float32)
    local = tl.load(theta + offsets, mask=mask).to(tl.float32)
    tl.store(theta + offsets, (moved + local).to(theta.dtype.element_ty), mask=mask)
    tl.store(theta0 + offsets, value.to(theta0.dtype.element_ty), mask=mask)
