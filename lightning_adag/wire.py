"""The frames that workers and the server exchange over a stream socket.

Every frame is a fixed 32-byte header followed by ``length`` payload bytes::

    magic "ADAG" | version u8 | type u8 | dtype u8 | reserved u8 | a i64 | b i64 | length u64   (network order)

``a`` and ``b`` carry the message's integers, named per frame kind in :data:`FIELDS` (a COMMIT's
``pulled_clock`` and ``steps``, a CENTER's ``clock`` and ``staleness``); code reads and writes them by those names.
Control payloads (handshake, statistics, errors) are UTF-8 JSON or raw bytes and small. Tensor payloads
(``dtype`` != 0) are the raw bytes of a flat vector, received with ``recv_into`` straight into a preallocated
buffer. Nothing is ever unpickled.
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
    WELCOME = 5  # server -> worker, JSON {mailbox (shared memory only), initialized, clock, incarnation}
    INIT = 6  # worker -> server, the vector; sets the center if the server holds none; answered by CENTER
    COMMIT = 7  # worker -> server, dtype = the delta's, a commit payload; answered by CENTER
    PULL = 8  # worker -> server; answered by CENTER
    CENTER = 9  # server -> worker, the center
    STATS = 10  # worker -> server; answered by REPORT
    REPORT = 11  # server -> worker, JSON statistics
    ERROR = 12  # either way, UTF-8 message; the sender closes the connection after it
    GET_STATE = 13  # worker -> server, which algorithm state vector; answered by STATE
    PUT_STATE = 14  # worker -> server, the vector (trainable region); taken only before INIT
    STATE = 15  # server -> worker, the vector (GET_STATE), or whether it was taken (PUT_STATE)
    TAKE = 16  # worker -> server, JSON {run, epoch, worker, plan}: the next chunk of an epoch's samples
    GIVEN = 17  # server -> worker, JSON {start, stop}: positions [start, stop) of the epoch's order (empty: none left)
    RECOVER = 18  # worker -> server, the center it pulled from the server's previous incarnation; answered by CENTER
    BUSY = 19  # server -> peer, UTF-8 message, instead of an answer: too many peers are joining at once, retry


#: The names of a header's two integers (``a``, ``b``), by frame kind; kinds not listed carry none.
FIELDS: dict[Kind, tuple[str, str]] = {
    Kind.INIT: ("clock", ""),  # the clock the offered center stands at
    Kind.RECOVER: ("clock", ""),
    Kind.COMMIT: ("pulled_clock", "steps"),  # the center the window started from, the local steps it holds
    Kind.CENTER: ("clock", "staleness"),  # the center's clock; for a commit's reply, its staleness (else 0)
    Kind.GET_STATE: ("index", ""),  # which of the algorithm's state vectors
    Kind.PUT_STATE: ("index", ""),
    Kind.STATE: ("clock", "taken"),  # the clock the vector belongs to; 1 if a PUT_STATE was taken
}


def pack_fields(kind: Kind, **values: int) -> tuple[int, int]:
    """``a`` and ``b`` of a ``kind`` header from its named fields (missing ones are 0)."""
    names = FIELDS.get(kind, ("", ""))
    unknown = set(values) - set(names) - {""}
    if unknown:
        raise TypeError(f"a {kind.name} frame has no field {sorted(unknown)} (it has {[n for n in names if n]})")
    return tuple(int(values.get(name, 0)) if name else 0 for name in names)  # type: ignore[return-value]


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame of this protocol."""


class ServerGoneError(ConnectionError):
    """The parameter server closed the connection or stopped answering."""


class ServerBusyError(ConnectionError):
    """The server turned a joining worker away because too many peers were joining at once: retry later."""


class ServerRefusedError(RuntimeError):
    """The server answered a request with an ERROR frame."""


@dataclass(frozen=True)
class Header:
    kind: Kind
    dtype: int
    a: int
    b: int
    length: int

    def __getattr__(self, name: str) -> int:
        """A field by the name its frame kind gives it (``header.pulled_clock`` of a COMMIT), see :data:`FIELDS`."""
        kind = self.__dict__.get("kind")
        names = FIELDS.get(kind, ("", ""))
        if name and name in names:
            return self.a if names[0] == name else self.b
        raise AttributeError(f"a {getattr(kind, 'name', kind)} header has no field {name!r}")


@dataclass(frozen=True)
class Receipt:
    """The server's answer to a commit or a pull: the clock of the center it handed back, and the commit's
    staleness (commits applied between the worker's last pull and this commit; 0 for a pull)."""

    clock: int
    staleness: int = 0


class PartClocks(int):
    """The clock of a center cut into parts, each with a clock of its own (see
    :mod:`lightning_adag.transports.sharded`): as a number, the lowest of them (every part has applied at least that
    many commits); :attr:`parts` keeps each one, so that a commit can name the clock of every part it started from.
    Two of them of the same number of parts are equal when every part's clock is; otherwise (a center cut another
    way, a plain clock) they compare as numbers."""

    parts: tuple[int, ...]

    def __new__(cls, parts: tuple[int, ...] | list[int]) -> PartClocks:
        clock = super().__new__(cls, min(parts))
        clock.parts = tuple(int(part) for part in parts)
        return clock

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PartClocks) and len(other.parts) == len(self.parts):
            return self.parts == other.parts
        return int(self) == other

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = int.__hash__

    def __repr__(self) -> str:
        return f"PartClocks({list(self.parts)})"


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
    sock: socket.socket, kind: Kind, payload: bytes = b"", dtype: torch.dtype | None = None, **fields: int
) -> None:
    """A frame with a control payload and the named ``fields`` of its kind; ``dtype`` announces a tensor that
    travels outside the socket (shared memory)."""
    sock.sendall(
        encode(kind, *pack_fields(kind, **fields), payload, NO_TENSOR if dtype is None else DTYPE_CODES[dtype])
    )


def send_tensor(
    sock: socket.socket, kind: Kind, tensor: Tensor, dtype: torch.dtype | None = None, **fields: int
) -> None:
    """A frame whose payload is ``tensor``'s bytes, sent from the tensor's memory. ``dtype`` is the dtype the frame
    announces when it differs from the tensor's (the bytes of a mixed-dtype commit payload)."""
    code = DTYPE_CODES[dtype or tensor.dtype]
    sock.sendall(HEADER.pack(MAGIC, VERSION, int(kind), code, 0, *pack_fields(kind, **fields), tensor.nbytes))
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


def check_not_busy(frame: Frame) -> None:
    """Raise :class:`ServerBusyError` if ``frame`` is the server turning this connection away as busy."""
    if frame.kind is Kind.BUSY:
        raise ServerBusyError(frame.payload.decode(errors="replace"))


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
