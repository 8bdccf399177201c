"""Mutual HMAC challenge-response on every connection to the server, before anything else is read.

The server sends a random nonce; the peer answers with HMAC-SHA256(key, "worker" + nonce) and a nonce of its own;
the server checks it and answers with HMAC-SHA256(key, "server" + peer nonce), so the worker also knows it reached
a server holding the key. The two labels keep one side's answer from being replayed as the other's. A peer that
fails gets an ERROR frame and a closed socket: it never reaches the handshake, a buffer, or the center.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket

from lightning_adag import wire

NONCE_BYTES = 32
DIGEST_BYTES = hashlib.sha256().digest_size
KEY_ENV = "ADAG_AUTH_KEY"
#: Keys shorter than this can be guessed by anyone who reaches the server.
MIN_KEY_CHARS = 16


class AuthenticationError(Exception):
    """The other side does not hold the shared key."""


def new_key() -> str:
    return secrets.token_hex(32)


def key_from_env() -> bytes:
    key = os.environ.get(KEY_ENV, "")
    if not key:
        raise AuthenticationError(
            f"set {KEY_ENV} to a shared secret (the same on the server and every worker), for example"
            f" `export {KEY_ENV}=$(python -c 'import secrets; print(secrets.token_hex(32))')`"
        )
    return key.encode()


def weak_key_advice(key: bytes) -> str | None:
    """What to change about a shared key too short to keep anyone out, or None for a key long enough."""
    if len(key) >= MIN_KEY_CHARS:
        return None
    return (
        f"{KEY_ENV} is {len(key)} character(s) long, short enough to guess: use a random key of at least"
        f" {MIN_KEY_CHARS} characters, for example `export {KEY_ENV}=$(python -c 'import secrets;"
        " print(secrets.token_hex(32))')`"
    )


def _mac(key: bytes, label: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, label + nonce, hashlib.sha256).digest()


def challenge(sock: socket.socket, key: bytes) -> None:
    """Server side. Raises ``AuthenticationError`` (after telling the peer) if the peer does not hold ``key``."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    wire.send(sock, wire.Kind.CHALLENGE, payload=nonce)
    answer = wire.recv(sock, max_payload=DIGEST_BYTES + NONCE_BYTES)
    if (
        answer.kind is not wire.Kind.AUTH
        or len(answer.payload) != DIGEST_BYTES + NONCE_BYTES
        or not hmac.compare_digest(answer.payload[:DIGEST_BYTES], _mac(key, b"worker", nonce))
    ):
        wire.send(sock, wire.Kind.ERROR, payload=b"authentication failed: the worker's key is not the server's")
        raise AuthenticationError("a peer failed authentication")
    wire.send(sock, wire.Kind.AUTH_OK, payload=_mac(key, b"server", answer.payload[DIGEST_BYTES:]))


def answer(sock: socket.socket, key: bytes) -> None:
    """Worker side. Raises ``AuthenticationError`` if the server refuses the key or does not know it, and
    ``wire.ServerBusyError`` if it turns the connection away while too many peers are joining."""
    header = wire.read_header(sock, max_payload=wire.MAX_CONTROL_PAYLOAD)  # a BUSY message may be longer
    if header.kind is wire.Kind.CHALLENGE and header.length > NONCE_BYTES:
        raise wire.ProtocolError(f"CHALLENGE frame of {header.length} bytes exceeds the limit of {NONCE_BYTES}")
    frame = wire.read_payload(sock, header)
    wire.check_not_busy(frame)
    if frame.kind is not wire.Kind.CHALLENGE or len(frame.payload) != NONCE_BYTES:
        raise wire.ProtocolError(f"expected a CHALLENGE from the server, got {frame.kind.name}")
    nonce = secrets.token_bytes(NONCE_BYTES)
    wire.send(sock, wire.Kind.AUTH, payload=_mac(key, b"worker", frame.payload) + nonce)
    reply = wire.recv(sock, max_payload=wire.MAX_CONTROL_PAYLOAD)
    wire.check_not_busy(reply)
    if reply.kind is wire.Kind.ERROR:
        raise AuthenticationError(f"the server refused this worker: {reply.payload.decode(errors='replace')}")
    if reply.kind is not wire.Kind.AUTH_OK or not hmac.compare_digest(reply.payload, _mac(key, b"server", nonce)):
        raise AuthenticationError("the server could not prove that it holds the shared key")
