"""The frames that workers and the server exchange over a stream socket.

Every frame is a fixed 32-byte header followed by ``length`` payload bytes::

    magic "ADAG" | version u8 | type u8 | reserved u16 | a i64 | b i64 | length u64      (network byte order)

``a`` and ``b`` carry the message's integers (clocks, step counts). Control payloads (handshake, statistics,
errors) are UTF-8 JSON and small; tensor payloads are raw bytes. Nothing is ever unpickled.
"""

from __future__ import annotations

import enum
import json
import socket
import struct
from dataclasses import dataclass

MAGIC = b"ADAG"
VERSION = 1
HEADER = struct.Struct("!4sBBHqqQ")
MAX_CONTROL_PAYLOAD = 64 * 1024


class Kind(enum.IntEnum):
    HELLO = 1  # worker -> server, JSON {rank, layout, algorithm}; answered by WELCOME
    WELCOME = 2  # server -> worker, JSON {mailbox, initialized, clock}
    INIT = 3  # worker -> server, a = clock; initialize the center from the mailbox if the server holds none
    COMMIT = 4  # worker -> server, a = pulled clock, b = steps in the window; answered by CENTER
    PULL = 5  # worker -> server; answered by CENTER
    CENTER = 6  # server -> worker, a = clock, b = staleness of the commit (0 for a pull); center in the mailbox
    STATS = 7  # worker -> server; answered by REPORT
    REPORT = 8  # server -> worker, JSON statistics
    ERROR = 9  # server -> worker, UTF-8 message; the server closes the connection after it
    GET_STATE = 10  # worker -> server, a = index of an algorithm state vector; answered by STATE
    PUT_STATE = 11  # worker -> server, a = index; restore that vector from the mailbox before INIT; answered by STATE
    STATE = 12  # server -> worker, a = clock, b = 1 if taken (PUT_STATE); the vector in the mailbox (GET_STATE)


class ProtocolError(ConnectionError):
    """The peer sent something that is not a valid frame of this protocol."""


class ServerGoneError(ConnectionError):
    """The parameter server closed the connection or stopped answering."""


class ServerRefusedError(RuntimeError):
    """The server answered a request with an ERROR frame."""


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


def encode(kind: Kind, a: int = 0, b: int = 0, payload: bytes = b"") -> bytes:
    return HEADER.pack(MAGIC, VERSION, int(kind), 0, a, b, len(payload)) + payload


def json_payload(value: dict) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def send(sock: socket.socket, kind: Kind, a: int = 0, b: int = 0, payload: bytes = b"") -> None:
    sock.sendall(encode(kind, a, b, payload))


def decode_header(header: bytes, max_payload: int = MAX_CONTROL_PAYLOAD) -> tuple[Kind, int, int, int]:
    """Validate a header; refuse a payload above ``max_payload`` before anything is allocated for it."""
    magic, version, kind, _reserved, a, b, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}: the peer does not speak the lightning-adag protocol")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version}, this side speaks {VERSION}: upgrade lightning-adag")
    try:
        kind = Kind(kind)
    except ValueError:
        raise ProtocolError(f"unknown frame type {kind}") from None
    if length > max_payload:
        raise ProtocolError(f"{kind.name} frame of {length} bytes exceeds the limit of {max_payload}")
    return kind, a, b, length


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


def recv(sock: socket.socket, max_payload: int = MAX_CONTROL_PAYLOAD) -> Frame:
    kind, a, b, length = decode_header(recv_exact(sock, HEADER.size), max_payload)
    return Frame(kind, a, b, recv_exact(sock, length) if length else b"")
