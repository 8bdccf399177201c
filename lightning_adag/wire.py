"""The frames that workers and the server exchange over a stream socket.

Every frame is a fixed 32-byte header followed by ``length`` payload bytes::

    magic "ADAG" | version u8 | type u8 | dtype u8 | reserved u8 | a i64 | b i64 | length u64   (network order)

``a`` and ``b`` carry the message's integers (clocks, step counts). Control payloads (handshake, statistics,
errors) are UTF-8 JSON or raw bytes and small. Tensor payloads (``dtype`` != 0) are the raw bytes of a flat
vector, received with ``recv_into`` straight into a preallocated buffer. Nothing is ever unpickled.
"""

from __future__ import annotations

import enum
import json
import socket
import struct
from dataclasses import dataclass

import torch
from torch import Tensor

MAGIC = b"ADAG"
VERSION = 2  # 2: commits announce their payload's dtype (compressed deltas), on shared memory too
HEADER = struct.Struct("!4sBBBBqqQ")
MAX_CONTROL_PAYLOAD = 64 * 1024

DTYPE_CODES = {torch.float32: 1, torch.float64: 2, torch.float16: 3, torch.bfloat16: 4}
NO_TENSOR = 0


class Kind(enum.IntEnum):
    CHALLENGE = 1  # server -> peer, a random nonce; the first frame on every connection
    AUTH = 2  # peer -> server, HMAC of the nonce and a nonce of its own
    AUTH_OK = 3  # server -> peer, HMAC of the peer's nonce (the server knows the key too)
    HELLO = 4  # worker -> server, JSON {rank, layout, algorithm}; answered by WELCOME
    WELCOME = 5  # server -> worker, JSON {mailbox (shared memory only), initialized, clock}
    INIT = 6  # worker -> server, a = clock, the vector; sets the center if the server holds none; answered by CENTER
    COMMIT = (
        7  # worker -> server, a = pulled clock, b = steps, dtype = the delta's, a commit payload; answered by CENTER
    )
    PULL = 8  # worker -> server; answered by CENTER
    CENTER = 9  # server -> worker, a = clock, b = staleness of the commit (0 otherwise), the center
    STATS = 10  # worker -> server; answered by REPORT
    REPORT = 11  # server -> worker, JSON statistics
    ERROR = 12  # either way, UTF-8 message; the sender closes the connection after it
    GET_STATE = 13  # worker -> server, a = index of an algorithm state vector; answered by STATE
    PUT_STATE = 14  # worker -> server, a = index, the vector (trainable region); taken only before INIT
    STATE = 15  # server -> worker, a = clock, b = 1 if taken (PUT_STATE); the vector (GET_STATE)


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame of this protocol."""


class ServerGoneError(ConnectionError):
    """The parameter server closed the connection or stopped answering."""


class ServerRefusedError(RuntimeError):
    """The server answered a request with an ERROR frame."""


@dataclass(frozen=True)
class Header:
    kind: Kind
    dtype: int
    a: int
    b: int
    length: int


@dataclass(frozen=True)
class Frame:
    kind: Kind
    a: int = 0
    b: int = 0
    payload: bytes = b""

    def json(self) -> dict:
        try:
            value = json.loads(self.payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ProtocolError(f"{self.kind.name} payload is not JSON: {err}") from None
        if not isinstance(value, dict):
            raise ProtocolError(f"{self.kind.name} payload must be a JSON object")
        return value


def encode(kind: Kind, a: int = 0, b: int = 0, payload: bytes = b"", dtype: int = NO_TENSOR) -> bytes:
    return HEADER.pack(MAGIC, VERSION, int(kind), dtype, 0, a, b, len(payload)) + payload


def json_payload(value: dict) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def byte_view(tensor: Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(tensor.view(torch.uint8).numpy())


def dtype_of(header: Header) -> torch.dtype:
    """The tensor dtype a header announces; ``ProtocolError`` for a code this side does not know."""
    for dtype, code in DTYPE_CODES.items():
        if code == header.dtype:
            return dtype
    raise ProtocolError(f"{header.kind.name} frame announces unknown dtype code {header.dtype}")


def send(
    sock: socket.socket, kind: Kind, a: int = 0, b: int = 0, payload: bytes = b"", dtype: torch.dtype | None = None
) -> None:
    """A frame with a control payload; ``dtype`` announces a tensor that travels outside the socket (shared
    memory)."""
    sock.sendall(encode(kind, a, b, payload, NO_TENSOR if dtype is None else DTYPE_CODES[dtype]))


def send_tensor(
    sock: socket.socket, kind: Kind, tensor: Tensor, a: int = 0, b: int = 0, dtype: torch.dtype | None = None
) -> None:
    """A frame whose payload is ``tensor``'s bytes, sent from the tensor's memory. ``dtype`` is the dtype the frame
    announces when it differs from the tensor's (the bytes of a mixed-dtype commit payload)."""
    code = DTYPE_CODES[dtype or tensor.dtype]
    sock.sendall(HEADER.pack(MAGIC, VERSION, int(kind), code, 0, a, b, tensor.nbytes))
    sock.sendall(byte_view(tensor))


def read_header(sock: socket.socket, max_payload: int = MAX_CONTROL_PAYLOAD) -> Header:
    """Read and validate a header; refuse a payload above ``max_payload`` before anything is allocated for it."""
    return decode_header(recv_exact(sock, HEADER.size), max_payload)


def decode_header(data: bytes, max_payload: int = MAX_CONTROL_PAYLOAD) -> Header:
    magic, version, kind, dtype, _reserved, a, b, length = HEADER.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}: the peer does not speak the lightning-adag protocol")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version}, this side speaks {VERSION}: use one lightning-adag version")
    try:
        kind = Kind(kind)
    except ValueError:
        raise ProtocolError(f"unknown frame type {kind}") from None
    if length > max_payload:
        raise ProtocolError(f"{kind.name} frame of {length} bytes exceeds the limit of {max_payload}")
    return Header(kind, dtype, a, b, length)


def read_payload(sock: socket.socket, header: Header) -> Frame:
    """The rest of a control frame (its payload, if any, as bytes)."""
    if header.dtype != NO_TENSOR:
        raise ProtocolError(f"{header.kind.name} frame carries a tensor where none is expected")
    return Frame(header.kind, header.a, header.b, recv_exact(sock, header.length) if header.length else b"")


def read_tensor_into(sock: socket.socket, header: Header, out: Tensor, dtype: torch.dtype | None = None) -> None:
    """Receive a tensor payload straight into ``out``, which must match its size exactly and its dtype (or
    ``dtype``, for the bytes of a mixed-dtype commit payload)."""
    expected = dtype or out.dtype
    if header.dtype != DTYPE_CODES[expected] or header.length != out.nbytes:
        raise ProtocolError(
            f"{header.kind.name} frame carries {header.length} bytes of dtype code {header.dtype}, expected"
            f" {out.nbytes} bytes of {expected}"
        )
    recv_into_exact(sock, byte_view(out))


def recv(sock: socket.socket, max_payload: int = MAX_CONTROL_PAYLOAD) -> Frame:
    """Read a whole control frame."""
    return read_payload(sock, read_header(sock, max_payload))


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    recv_into_exact(sock, memoryview(buf))
    return bytes(buf)


def recv_into_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock``; ``EOFError`` if the peer closes first."""
    received = 0
    while received < len(view):
        n = sock.recv_into(view[received:])
        if n == 0:
            raise EOFError(f"connection closed after {received} of {len(view)} bytes")
        received += n
