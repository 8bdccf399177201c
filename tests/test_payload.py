"""The byte layout of a commit payload: a delta in the wire dtype, then the values in the center's dtype."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lightning_adag.flat import Layout
from lightning_adag.payload import CommitPayload


@st.composite
def payloads(draw):
    numel = draw(st.integers(1, 300))
    center = draw(st.sampled_from([torch.float32, torch.float64]))
    layout = Layout(numel, draw(st.integers(1, numel)), center, "test")
    wire = draw(st.sampled_from([center, torch.float32, torch.bfloat16, torch.float16]).filter(
        lambda d: d.itemsize <= center.itemsize))  # fmt: skip
    return CommitPayload(layout, wire)


@given(payloads(), st.integers(0, 99))
def test_a_payload_fits_the_mailbox_and_round_trips(payload, seed):
    layout = payload.layout
    mailbox = torch.full((layout.numel,), float("nan"), dtype=layout.dtype)
    assert payload.nbytes <= mailbox.nbytes
    generator = torch.Generator().manual_seed(seed)
    delta = torch.randn(layout.trainable, generator=generator).to(payload.dtype)
    values = torch.randn(layout.numel - layout.trainable, generator=generator).to(layout.dtype)
    written = payload.views(mailbox.view(torch.uint8))
    written[0].copy_(delta)
    written[1].copy_(values)
    read = payload.views(mailbox.clone().view(torch.uint8))  # what the other side sees in the same bytes
    assert torch.equal(read[0], delta) and torch.equal(read[1], values)
    assert payload.values_offset % layout.dtype.itemsize == 0
    assert payload.values_offset >= layout.trainable * payload.dtype.itemsize  # the two never overlap


@given(payloads())
def test_without_compression_the_payload_is_the_center_layout(payload):
    layout = payload.layout
    plain = CommitPayload(layout, layout.dtype)
    mailbox = torch.arange(layout.numel, dtype=layout.dtype)
    delta, values = plain.views(mailbox.view(torch.uint8))
    assert plain.nbytes == layout.nbytes
    assert torch.equal(delta, mailbox[: layout.trainable]) and torch.equal(values, mailbox[layout.trainable :])


def test_a_wider_wire_dtype_or_a_short_buffer_is_refused():
    layout = Layout(10, 8, torch.float32, "test")
    with pytest.raises(ValueError, match="narrower floating-point dtype"):
        CommitPayload(layout, torch.float64)
    with pytest.raises(ValueError, match="at least"):
        CommitPayload(layout, torch.bfloat16).views(torch.zeros(3, dtype=torch.uint8))
