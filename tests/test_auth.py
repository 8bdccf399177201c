"""The handshake's two proofs, side by side on socket pairs: each side proves the key with its own label."""

from __future__ import annotations

import hashlib
import hmac
import socket
import threading

import pytest

from lightning_adag import auth, wire

KEY = b"shared-key"


def pair() -> tuple[socket.socket, socket.socket]:
    """A connected socket pair whose reads give up after a few seconds (a side that waits for what never comes
    fails instead of hanging)."""
    left, right = socket.socketpair()
    left.settimeout(5)
    right.settimeout(5)
    return left, right


def _in_thread(function, *args):
    """Run ``function(*args)`` on a thread; returns a callable giving its result or raising its exception."""
    outcome = {}

    def run():
        try:
            outcome["value"] = function(*args)
        except Exception as err:  # handed to the test
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def result():
        thread.join(10)
        assert not thread.is_alive()
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")

    return result


def test_a_worker_and_a_server_holding_the_key_prove_it_to_each_other():
    server, worker = pair()
    with server, worker:
        proven = _in_thread(auth.challenge, server, KEY)
        auth.answer(worker, KEY)
        proven()


def test_an_impostor_cannot_reflect_one_workers_answer_to_another():
    """Without the key, an impostor server gets a worker to compute HMAC(key, nonce) for a nonce it chose: it
    challenges a second worker with the first one's nonce. The worker's label keeps that answer from passing as
    the server's proof."""
    first, impostor_first = pair()
    second, impostor_second = pair()
    with first, impostor_first, second, impostor_second:
        first_done = _in_thread(auth.answer, first, KEY)
        wire.send(impostor_first, wire.Kind.CHALLENGE, payload=bytes(auth.NONCE_BYTES))
        first_nonce = wire.recv(impostor_first).payload[auth.DIGEST_BYTES :]
        second_done = _in_thread(auth.answer, second, KEY)
        wire.send(impostor_second, wire.Kind.CHALLENGE, payload=first_nonce)
        reflected = wire.recv(impostor_second).payload[: auth.DIGEST_BYTES]
        wire.send(impostor_first, wire.Kind.AUTH_OK, payload=reflected)
        with pytest.raises(auth.AuthenticationError):
            first_done()
        impostor_second.close()
        with pytest.raises((EOFError, OSError)):
            second_done()


def test_a_server_cannot_be_answered_with_its_own_proof():
    """A peer that echoes the server's kind of proof (HMAC under the server's label) of the server's own nonce is
    refused: only the worker's label answers a challenge."""
    server, peer = pair()
    with server, peer:
        refused = _in_thread(auth.challenge, server, KEY)
        nonce = wire.recv(peer).payload
        echoed = hmac.new(KEY, b"server" + nonce, hashlib.sha256).digest()
        wire.send(peer, wire.Kind.AUTH, payload=echoed + bytes(auth.NONCE_BYTES))
        with pytest.raises(auth.AuthenticationError):
            refused()
        assert wire.recv(peer).kind is wire.Kind.ERROR  # told, then nothing more


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (lambda mac, nonce: wire.encode(wire.Kind.AUTH, payload=mac[:-1] + nonce), auth.AuthenticationError),
        (lambda mac, nonce: wire.encode(wire.Kind.AUTH, payload=mac + nonce + b"x"), wire.ProtocolError),
        (lambda mac, nonce: wire.encode(wire.Kind.HELLO, payload=mac + nonce), auth.AuthenticationError),
    ],
    ids=["one-byte-short", "one-byte-long", "not-an-auth-frame"],
)
def test_a_malformed_answer_holding_the_right_mac_is_refused(answer, error):
    server, peer = pair()
    with server, peer:
        refused = _in_thread(auth.challenge, server, KEY)
        nonce = wire.recv(peer).payload
        peer.sendall(answer(hmac.new(KEY, b"worker" + nonce, hashlib.sha256).digest(), bytes(auth.NONCE_BYTES)))
        with pytest.raises(error):
            refused()


@pytest.mark.parametrize(
    "first",
    [
        wire.encode(wire.Kind.CHALLENGE, payload=bytes(auth.NONCE_BYTES - 1)),
        wire.encode(wire.Kind.AUTH_OK, payload=bytes(auth.NONCE_BYTES)),
    ],
    ids=["short-nonce", "not-a-challenge"],
)
def test_a_worker_refuses_a_challenge_that_is_not_one(first):
    server, worker = pair()
    with server, worker:
        server.sendall(first)
        with pytest.raises(wire.ProtocolError, match="expected a CHALLENGE from the server"):
            auth.answer(worker, KEY)


def test_a_worker_refuses_an_oversized_challenge_before_reading_it():
    server, worker = pair()
    with server, worker:  # the header announces one byte more than a nonce, which never comes
        server.sendall(wire.encode(wire.Kind.CHALLENGE, payload=bytes(auth.NONCE_BYTES + 1))[: wire.HEADER.size])
        with pytest.raises(wire.ProtocolError, match="exceeds the limit"):
            auth.answer(worker, KEY)


def test_a_worker_with_another_key_is_told_why_and_the_server_refuses_it():
    server, worker = pair()
    with server, worker:
        refused = _in_thread(auth.challenge, server, KEY)
        with pytest.raises(auth.AuthenticationError, match="refused this worker: authentication failed: the worker's"):
            auth.answer(worker, b"another-key")
        with pytest.raises(auth.AuthenticationError, match="^a peer failed authentication$"):
            refused()


def _worker_given_a_proof_made_with(server_key: bytes):
    """A server that lets the worker in and proves ``server_key``: the worker's outcome."""
    server, worker = pair()
    with server, worker:
        wire.send(server, wire.Kind.CHALLENGE, payload=bytes(auth.NONCE_BYTES))
        worker_done = _in_thread(auth.answer, worker, KEY)
        worker_nonce = wire.recv(server).payload[auth.DIGEST_BYTES :]
        proof = hmac.new(server_key, b"server" + worker_nonce, hashlib.sha256).digest()
        wire.send(server, wire.Kind.AUTH_OK, payload=proof)
        return worker_done()


def test_a_server_with_another_key_cannot_prove_it():
    _worker_given_a_proof_made_with(KEY)  # the shared key's proof passes
    with pytest.raises(auth.AuthenticationError, match="^the server could not prove that it holds the shared key$"):
        _worker_given_a_proof_made_with(b"another-key")


def test_a_new_key_is_32_random_bytes_in_hex():
    keys = {auth.new_key() for _ in range(8)}
    assert len(keys) == 8 and all(len(bytes.fromhex(key)) == 32 for key in keys)


def test_the_key_comes_from_the_environment_and_its_absence_says_how_to_set_it(monkeypatch):
    monkeypatch.setenv(auth.KEY_ENV, "s3cret")
    assert auth.key_from_env() == b"s3cret"
    for unset in (lambda: monkeypatch.setenv(auth.KEY_ENV, ""), lambda: monkeypatch.delenv(auth.KEY_ENV)):
        unset()
        advice = r"set ADAG_AUTH_KEY to a shared secret .* `export ADAG_AUTH_KEY="
        with pytest.raises(auth.AuthenticationError, match=advice):
            auth.key_from_env()


def test_a_refusal_in_broken_utf8_still_reaches_the_worker_as_a_refusal():
    server, worker = pair()
    with server, worker:
        wire.send(server, wire.Kind.CHALLENGE, payload=bytes(auth.NONCE_BYTES))
        worker_done = _in_thread(auth.answer, worker, KEY)
        wire.recv(server)
        wire.send(server, wire.Kind.ERROR, payload=b"no \xff")
        with pytest.raises(auth.AuthenticationError, match="refused this worker: no \ufffd"):
            worker_done()
