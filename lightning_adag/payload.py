"""How a commit's vector is laid out in bytes, so that its trainable part can travel in a narrower dtype.

A commit carries two things: the algorithm's delta for the trainable region, and the frozen parameters and
floating-point buffers, which travel by value. The delta may be compressed to a 16-bit wire dtype (the server still
accumulates in the center's dtype); values never are, since rounding them would drift running statistics. So the
payload is::

    delta (trainable elements, wire dtype) | padding to the center dtype's size | values (the rest, center dtype)

With the center's own dtype on the wire this is exactly the layout of the center vector. The payload is written
into the first ``nbytes`` of the worker's mailbox; it never needs more room than the mailbox has.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_adag.flat import Layout

#: What ``ADAGStrategy(compression=...)`` accepts, and the wire dtype each name stands for.
COMPRESSIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class CommitPayload:
    layout: Layout
    dtype: torch.dtype  # the delta's dtype on the wire

    def __post_init__(self) -> None:
        if not self.dtype.is_floating_point or self.dtype.itemsize > self.layout.dtype.itemsize:
            raise ValueError(
                f"a commit's delta travels in the center's dtype ({self.layout.dtype}) or a narrower floating-point"
                f" dtype, not {self.dtype}"
            )

    @property
    def values_offset(self) -> int:
        """Where the values start: after the delta, aligned for the center's dtype."""
        size = self.layout.dtype.itemsize
        return -(-self.layout.trainable * self.dtype.itemsize // size) * size

    @property
    def nbytes(self) -> int:
        return self.values_offset + (self.layout.numel - self.layout.trainable) * self.layout.dtype.itemsize

    def views(self, buffer: Tensor) -> tuple[Tensor, Tensor]:
        """The delta and the values inside ``buffer``, a 1-D ``uint8`` tensor of at least :attr:`nbytes` bytes."""
        if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() < self.nbytes:
            raise ValueError(f"a commit payload needs a 1-D uint8 buffer of at least {self.nbytes} bytes")
        delta = buffer[: self.layout.trainable * self.dtype.itemsize].view(self.dtype)
        values = buffer[self.values_offset : self.nbytes].view(self.layout.dtype)
        return delta, values
