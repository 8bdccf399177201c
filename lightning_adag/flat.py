"""The part of a model that workers share, laid out as one contiguous vector."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Layout:
    """What a worker and the server must agree on before they exchange vectors.

    ``numel`` elements in all; the first ``trainable`` belong to trainable parameters (the region the algorithm
    updates), the rest to frozen parameters and floating-point buffers (the region carried by value).
    ``dtype`` is the center's: the model's, widened to at least float32 (:func:`center_dtype`).
    ``digest`` hashes the names and shapes, so two models with equal sizes but different shapes do not mix. The
    model's own dtype is not part of the layout, only the center's: workers that train in bfloat16 and in float32
    exchange the same float32 center, and a checkpoint saved under one precision resumes under the other.
    """

    numel: int
    trainable: int
    dtype: torch.dtype
    digest: str

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def to_json(self) -> dict:
        return {"numel": self.numel, "trainable": self.trainable, "dtype": str(self.dtype), "digest": self.digest}

    @classmethod
    def from_json(cls, data: dict) -> Layout:
        dtype = getattr(torch, str(data["dtype"]).removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"unsupported dtype {data['dtype']!r}")
        numel, trainable = int(data["numel"]), int(data["trainable"])
        if not 0 < trainable <= numel:
            raise ValueError(f"invalid layout sizes numel={numel} trainable={trainable}")
        return cls(numel=numel, trainable=trainable, dtype=dtype, digest=str(data["digest"]))


#: Elements per float64 re-sum in :func:`all_finite`: 8 MiB of temporary memory whatever the tensor's size.
_CHUNK = 2**20


def center_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the server keeps the center in. At least float32: with 16-bit weights (``precision="bf16-true"``)
    a commit of ``(θ − θ⁰) / λ`` is often below the resolution of the weight it moves, and a 16-bit center would
    drop it; a float32 center accumulates every commit, and workers train on its rounding."""
    return torch.promote_types(model_dtype, torch.float32)


def shared_tensors(module: nn.Module) -> list[tuple[str, Tensor]]:
    """The tensors that travel, in layout order: trainable parameters, then frozen floating-point parameters and
    persistent floating-point buffers (running statistics). Integer buffers (``num_batches_tracked``) and
    non-persistent ones (constants such as attention masks, kept out of the state dict) stay local to each worker.
    """
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    frozen = [(n, p) for n, p in module.named_parameters() if not p.requires_grad and p.is_floating_point()]
    buffers = [(n, b) for n, b in module.named_buffers() if b.is_floating_point() and _persistent(module, n)]
    return trainable + frozen + buffers


def all_finite(tensor: Tensor) -> bool:
    """Whether no element of ``tensor`` is NaN or infinite, at memory speed and without a tensor-sized allocation.

    A sum is finite only if every element is (NaN and the infinities survive any order of additions), and it reads
    the tensor once without allocating, faster than ``aminmax`` or ``isfinite`` (BENCHMARKS.md). A sum can also
    overflow its dtype (float16 past 65504: a model with a million LayerNorm weights of 1); then the tensor is summed
    again in float64 one chunk at a time, which finite 16- and 32-bit values cannot overflow (a float64 chunk that
    does is checked elementwise).
    """
    if math.isfinite(tensor.sum().item()):
        return True
    for chunk in tensor.reshape(-1).split(_CHUNK):
        if not math.isfinite(chunk.sum(dtype=torch.float64).item()) and not bool(torch.isfinite(chunk).all()):
            return False
    return True


def check_shareable(module: nn.Module) -> None:
    """Raise a ``ValueError`` that says what to change when ``module`` cannot be laid out as one flat vector."""
    tensors = shared_tensors(module)
    if not any(p.requires_grad for p in module.parameters()):
        raise ValueError(
            f"{type(module).__name__} has no trainable parameters: ADAG trains parameters with requires_grad=True."
            " Create the layers in __init__ (or configure_model) and do not freeze all of them."
        )
    dtypes = {t.dtype for _, t in tensors}
    if len(dtypes) > 1:
        by_dtype = {str(d): [n for n, t in tensors if t.dtype == d][:3] for d in dtypes}
        raise ValueError(
            f"ADAG keeps the shared model state in one flat buffer of a single dtype, but the parameters and"
            f" floating-point buffers have several dtypes: {by_dtype}. Cast the module to one dtype"
            " (for example with a `precision=` setting of the Trainer)."
        )
    (dtype,) = dtypes
    if not dtype.is_floating_point:
        raise ValueError(
            f"ADAG averages real floating-point parameters, but the model's are {dtype}: keep complex weights as"
            " real pairs (a real parameter of shape (..., 2) viewed with torch.view_as_complex in forward)."
        )
    devices = {t.device for _, t in tensors}
    if len(devices) > 1:
        raise ValueError(f"ADAG needs the whole model on one device, found {sorted(map(str, devices))}.")


class FlatState:
    """Every shared tensor of a module becomes a view into ``vector``.

    A commit or a pull then moves ``vector`` with a single copy, and the optimizer keeps working on the same
    ``Parameter`` objects (only their storage changes). Build it after the module reached its device: moving the
    module afterwards would give each parameter its own storage again.
    """

    def __init__(self, module: nn.Module) -> None:
        check_shareable(module)
        tensors = shared_tensors(module)
        self.names = [name for name, _ in tensors]
        self.trainable = sum(t.numel() for _, t in tensors if isinstance(t, nn.Parameter) and t.requires_grad)
        first = tensors[0][1]
        self.vector = torch.empty(sum(t.numel() for _, t in tensors), dtype=first.dtype, device=first.device)
        self._slices: list[tuple[int, int, torch.Size]] = []
        offset = 0
        for _, tensor in tensors:
            end = offset + tensor.numel()
            view = self.vector[offset:end].view_as(tensor)
            view.copy_(tensor.detach())
            tensor.data = view
            self._slices.append((offset, end, tensor.shape))
            offset = end
        self.layout = Layout(self.vector.numel(), self.trainable, center_dtype(first.dtype), _digest(tensors))
        self._check_finite()

    @property
    def trainable_region(self) -> Tensor:
        return self.vector[: self.trainable]

    def _check_finite(self) -> None:
        """Refuse what the server would refuse as diverged, here, where the tensors still have names. (Not in
        :func:`check_shareable`, which also runs in the launching process: a multithreaded reduction there would
        hang workers started with ``fork``, and a checkpoint has not been restored yet.)"""
        if all_finite(self.vector):
            return
        names = [name for name, (a, b, _) in zip(self.names, self._slices) if not all_finite(self.vector[a:b])]
        raise ValueError(
            f"ADAG shares {names[:3]} with the server, which refuses NaN and infinite values (a diverged worker must"
            " not poison the center), but they hold some. A constant such as a mask of -inf: register it with"
            " register_buffer(..., persistent=False), which keeps it local to each worker; otherwise initialize"
            " these tensors with finite values."
        )

    def state_dict_entries(self, vector: Tensor) -> dict[str, Tensor]:
        """Name -> tensor views of ``vector``, a vector with this layout (for example a pulled center)."""
        return {name: vector[a:b].view(shape) for name, (a, b, shape) in zip(self.names, self._slices)}


def _persistent(module: nn.Module, buffer_name: str) -> bool:
    owner, _, name = buffer_name.rpartition(".")
    return name not in module.get_submodule(owner)._non_persistent_buffers_set


def _digest(tensors: list[tuple[str, Tensor]]) -> str:
    text = ";".join(f"{name}:{tuple(t.shape)}" for name, t in tensors)
    return hashlib.sha256(text.encode()).hexdigest()[:32]
