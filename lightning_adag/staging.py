"""Moving a worker's vectors between its device and its mailbox, without a copy more than the math needs.

The mailbox (host memory the transport reads and writes, see :mod:`lightning_adag.transports`) holds an outgoing
commit payload and, after a reply, the center. On a CPU worker the mailbox *is* the staging area: the kernels write
the payload straight into it and read the center from it. On a GPU worker both have a device-side copy, and each
crosses the bus in one copy on a side stream, to or from a mailbox page-locked in place (``cudaHostRegister``), so
the copies are DMA transfers that do not queue behind the compute stream. Nothing is allocated per commit.
(A TCP mailbox is allocated page-locked by its client; a shared-memory one is registered here.)
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from lightning_adag.payload import CommitPayload


class Staging:
    """Device-side buffers for one worker's mailbox.

    ``delta`` and ``values`` are where the algorithm writes a commit (the trainable delta in the wire dtype, the
    values carried by value), ``center`` is where a pulled center can be read, all on ``device``.
    """

    def __init__(self, mailbox: Tensor, payload: CommitPayload, device: torch.device) -> None:
        self._mailbox = mailbox
        self._host_payload = mailbox.view(torch.uint8)[: payload.nbytes]
        on_cpu = device.type == "cpu"
        # On the CPU the payload is written into the mailbox directly, unless the wire dtype differs from the
        # center's: then the payload's delta would overlap the center still in the mailbox at other offsets.
        self._direct = on_cpu and payload.dtype == mailbox.dtype
        self._outgoing = self._host_payload if self._direct else torch.empty_like(self._host_payload, device=device)
        self.delta, self.values = payload.views(self._outgoing)
        self.center = mailbox if on_cpu else torch.empty_like(mailbox, device=device)
        self._cuda = device.type == "cuda"
        self._pinned = False
        if self._cuda:
            self._device = device
            self._stream = torch.cuda.Stream(device)
            self._written = torch.cuda.Event()
            self._arrived = torch.cuda.Event()
            self._consumed = torch.cuda.Event()
            self._pinned = _pin(mailbox)

    def payload_written(self) -> None:
        """The payload is complete on the current stream (call this on the thread that wrote it)."""
        if self._cuda:
            self._written.record(torch.cuda.current_stream(self._device))

    def upload(self) -> None:
        """Copy the payload into the mailbox; returns once the mailbox holds it. Any thread may call it."""
        if self._direct:
            return
        if not self._cuda:
            self._host_payload.copy_(self._outgoing)
            return
        with torch.cuda.device(self._device), torch.cuda.stream(self._stream):
            self._stream.wait_event(self._written)
            self._host_payload.copy_(self._outgoing, non_blocking=True)
        self._stream.synchronize()

    def download(self) -> None:
        """Start copying the center from the mailbox to :attr:`center`; :meth:`center_ready` waits for it on the
        compute stream. Any thread may call it."""
        if self.center is self._mailbox:
            return
        if not self._cuda:
            self.center.copy_(self._mailbox)
            return
        with torch.cuda.device(self._device), torch.cuda.stream(self._stream):
            self._stream.wait_event(self._consumed)  # the compute stream is done reading the previous center
            self.center.copy_(self._mailbox, non_blocking=True)
            self._arrived.record(self._stream)

    def center_ready(self) -> Tensor:
        """:attr:`center`, once the compute stream has waited for the last :meth:`download`. Call
        :meth:`center_consumed` after the reads are queued."""
        if self._cuda:
            torch.cuda.current_stream(self._device).wait_event(self._arrived)
        return self.center

    def center_consumed(self) -> None:
        """The reads of :attr:`center` are queued on the current stream: the next download waits for them."""
        if self._cuda:
            self._consumed.record(torch.cuda.current_stream(self._device))

    def release_mailbox(self) -> None:
        """Block until no copy still reads the mailbox: call before a request lets anything overwrite it."""
        if self._cuda:
            self._arrived.synchronize()

    def close(self) -> None:
        if self._cuda:
            self._stream.synchronize()  # no copy may still use a buffer once it is freed
        if self._pinned:
            torch.cuda.cudart().cudaHostUnregister(self._mailbox.data_ptr())
            self._pinned = False


def _pin(mailbox: Tensor) -> bool:
    """Page-lock the mailbox where it is (a shared-memory mapping), so copies to and from the GPU are asynchronous.
    Returns whether this registered it (and must undo it)."""
    if mailbox.is_pinned():
        return False  # allocated page-locked by its client: nothing to undo later
    error = int(torch.cuda.cudart().cudaHostRegister(mailbox.data_ptr(), mailbox.nbytes, 0))
    if error:
        # CUDA keeps the error pending for this thread; torch's next launch check may report it. Rare (platforms
        # without host registration, such as WSL): say what happened before that.
        warnings.warn(
            f"could not page-lock the ADAG mailbox (cudaHostRegister error {error}): copies between the GPU and the"
            " mailbox will be synchronous, and CUDA may report this error again at the next kernel launch;"
            " transport='tcp' avoids registration",
            stacklevel=3,
        )
    return error == 0
