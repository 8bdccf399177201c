from __future__ import annotations

import socket
import threading
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lightning_adag import wire

kinds = st.sampled_from(list(wire.Kind))
int64 = st.integers(-(2**63), 2**63 - 1)


@given(kinds, int64, int64, st.binary(max_size=2048))
def test_frames_round_trip_through_a_socket(kind, a, b, payload):
    left, right = socket.socketpair()
    with left, right:
        left.sendall(wire.encode(kind, a, b, payload))
        assert wire.recv(right) == wire.Frame(kind, a, b, payload)


@given(st.binary(min_size=wire.HEADER.size, max_size=wire.HEADER.size))
def test_any_header_either_decodes_to_a_valid_frame_or_raises_protocol_error(header):
    try:
        decoded = wire.decode_header(header)
    except wire.ProtocolError:
        return
    kind, length = decoded.kind, decoded.length
    assert header[:4] == wire.MAGIC and isinstance(kind, wire.Kind) and length <= wire.MAX_CONTROL_PAYLOAD


def test_bad_magic_version_type_and_size_are_named():
    good = wire.encode(wire.Kind.PULL)
    with pytest.raises(wire.ProtocolError, match="bad magic"):
        wire.decode_header(b"XXXX" + good[4:])
    with pytest.raises(wire.ProtocolError, match="protocol version 9"):
        wire.decode_header(good[:4] + bytes([9]) + good[5:])
    with pytest.raises(wire.ProtocolError, match="unknown frame type 200"):
        wire.decode_header(good[:5] + bytes([200]) + good[6:])
    huge = wire.HEADER.pack(wire.MAGIC, wire.VERSION, int(wire.Kind.HELLO), 0, 0, 0, 0, 10**12)
    with pytest.raises(wire.ProtocolError, match="exceeds the limit"):
        wire.decode_header(huge)


@given(
    st.sampled_from(sorted(wire.DTYPE_CODES, key=str)),
    st.integers(1, 5000),
    st.integers(0, 2**40),
    st.integers(0, 2**20),
)
def test_tensor_frames_round_trip_into_a_preallocated_buffer(dtype, numel, clock, steps):
    tensor = torch.randn(numel).to(dtype)
    out = torch.empty(numel, dtype=dtype)
    left, right = socket.socketpair()
    with left, right:
        fields = {"pulled_clock": clock, "steps": steps}
        sender = threading.Thread(target=wire.send_tensor, args=(left, wire.Kind.COMMIT, tensor), kwargs=fields)
        sender.start()
        header = wire.read_header(right, max_payload=tensor.nbytes)
        wire.read_tensor_into(right, header, out)
        sender.join()
    assert (header.kind, header.pulled_clock, header.steps) == (wire.Kind.COMMIT, clock, steps)
    assert torch.equal(out, tensor)


@given(st.sampled_from(list(wire.FIELDS)), int64, int64)
def test_named_fields_round_trip_for_every_kind_that_has_them(kind, first, second):
    names = wire.FIELDS[kind]
    values = {name: value for name, value in zip(names, (first, second)) if name}
    left, right = socket.socketpair()
    with left, right:
        wire.send(left, kind, **values)
        header = wire.read_header(right)
    assert {name: getattr(header, name) for name in values} == values
    assert (header.a, header.b) == (first, second if names[1] else 0)


def test_a_field_another_kind_names_is_refused_both_ways():
    with pytest.raises(TypeError, match="COMMIT frame has no field"):
        wire.pack_fields(wire.Kind.COMMIT, staleness=1)
    header = wire.decode_header(wire.encode(wire.Kind.PULL))
    with pytest.raises(AttributeError, match="PULL header has no field 'clock'"):
        getattr(header, "clock")  # noqa: B009


def test_a_tensor_of_another_size_or_dtype_is_refused_before_reading_it():
    left, right = socket.socketpair()
    with left, right:
        wire.send_tensor(left, wire.Kind.COMMIT, torch.zeros(4))
        header = wire.read_header(right, max_payload=1024)
        with pytest.raises(wire.ProtocolError, match="expected 40 bytes"):
            wire.read_tensor_into(right, header, torch.empty(10))
        with pytest.raises(wire.ProtocolError, match="carries a tensor"):
            wire.read_payload(right, header)


def test_a_truncated_frame_is_end_of_file():
    left, right = socket.socketpair()
    with right:
        left.sendall(wire.encode(wire.Kind.HELLO, payload=b"0123456789")[:-3])
        left.close()
        with pytest.raises(EOFError):
            wire.recv(right)


def test_json_payloads_must_be_objects():
    assert wire.Frame(wire.Kind.REPORT, payload=b'{"a": 1}').json() == {"a": 1}
    with pytest.raises(wire.ProtocolError):
        wire.Frame(wire.Kind.REPORT, payload=b"[1]").json()
    with pytest.raises(wire.ProtocolError):
        wire.Frame(wire.Kind.REPORT, payload=b"\xff").json()


def test_a_frame_without_fields_or_payload_carries_zeros_and_nothing():
    for frame in (wire.encode(wire.Kind.PULL), _sent(lambda sock: wire.send(sock, wire.Kind.PULL))):
        assert frame == wire.HEADER.pack(wire.MAGIC, wire.VERSION, int(wire.Kind.PULL), wire.NO_TENSOR, 0, 0, 0, 0)


def test_send_announces_a_tensor_that_travels_outside_the_socket_as_send_tensor_does():
    for dtype, code in wire.DTYPE_CODES.items():
        announced = _sent(lambda sock, d=dtype: wire.send(sock, wire.Kind.COMMIT, dtype=d, pulled_clock=3, steps=2))
        header = wire.decode_header(announced)
        assert (header.dtype, header.pulled_clock, header.steps, header.length) == (code, 3, 2, 0)
        assert wire.dtype_of(header) == dtype
        tensor = torch.zeros(4, dtype=dtype)
        sent = _sent(lambda sock, t=tensor: wire.send_tensor(sock, wire.Kind.COMMIT, t, pulled_clock=3, steps=2))
        # the same header but for the length, and the reserved byte is zero
        assert sent[: wire.HEADER.size] == wire.encode(wire.Kind.COMMIT, 3, 2, bytes(tensor.nbytes), code)[:32]


def test_an_unknown_dtype_code_is_named():
    header = wire.decode_header(wire.encode(wire.Kind.COMMIT, dtype=9))
    with pytest.raises(wire.ProtocolError, match="COMMIT frame announces unknown dtype code 9"):
        wire.dtype_of(header)


def test_json_payloads_are_compact_utf8_objects_and_bad_ones_are_named():
    value = {"rank": 1, "name": "ünï", "layout": [1, 2]}
    payload = wire.json_payload(value)
    assert payload == b'{"rank":1,"name":"\\u00fcn\\u00ef","layout":[1,2]}'
    assert wire.Frame(wire.Kind.HELLO, payload=payload).json() == value
    assert wire.Frame(wire.Kind.HELLO, payload='{"name": "ünï"}'.encode()).json() == {"name": "ünï"}
    with pytest.raises(wire.ProtocolError, match="REPORT payload is not JSON"):
        wire.Frame(wire.Kind.REPORT, payload=b"{").json()
    with pytest.raises(wire.ProtocolError, match="REPORT payload must be a JSON object"):
        wire.Frame(wire.Kind.REPORT, payload=b"[1]").json()


def _sent(send) -> bytes:
    """The bytes ``send(sock)`` writes."""
    left, right = socket.socketpair()
    with left, right:
        send(left)
        left.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := right.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_a_field_left_out_is_zero():
    assert wire.pack_fields(wire.Kind.COMMIT, pulled_clock=3) == (3, 0)
    assert wire.pack_fields(wire.Kind.COMMIT, steps=2) == (0, 2)
    assert wire.pack_fields(wire.Kind.PULL) == (0, 0)


def test_bytes_arriving_in_pieces_are_gathered_and_an_early_close_says_how_far_it_got():
    left, right = socket.socketpair()
    with left, right:

        def trickle():
            for piece in (b"abc", b"defg", b"hij"):
                left.sendall(piece)
                time.sleep(0.02)

        sender = threading.Thread(target=trickle)
        sender.start()
        assert wire.recv_exact(right, 10) == b"abcdefghij"
        sender.join()
        left.sendall(b"1234567")
        left.shutdown(socket.SHUT_WR)
        with pytest.raises(EOFError, match="connection closed after 7 of 10 bytes"):
            wire.recv_exact(right, 10)
