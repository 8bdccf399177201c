"""The handshake's two proofs, side by side on socket pairs: each side proves the key with its own label."""

from __future__ import annotations

import hashlib
import hmac
import socket
import threading

import pytest

from lightning_adag import auth, wire

KEY = b"shared-key"


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
    server, worker = socket.socketpair()
    with server, worker:
        proven = _in_thread(auth.challenge, server, KEY)
        auth.answer(worker, KEY)
        proven()


def test_an_impostor_cannot_reflect_one_workers_answer_to_another():
    """Without the key, an impostor server gets a worker to compute HMAC(key, nonce) for a nonce it chose: it
    challenges a second worker with the first one's nonce. The worker's label keeps that answer from passing as
    the server's proof."""
    first, impostor_first = socket.socketpair()
    second, impostor_second = socket.socketpair()
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
    server, peer = socket.socketpair()
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
    server, peer = socket.socketpair()
    with server, peer:
        refused = _in_thread(auth.challenge, server, KEY)
        nonce = wire.recv(peer).payload
        peer.sendall(answer(hmac.new(KEY, b"worker" + nonce, hashlib.sha256).digest(), bytes(auth.NONCE_BYTES)))
        with pytest.raises(error):
            refused()


def test_a_worker_refuses_a_challenge_that_is_not_one():
    server, worker = socket.socketpair()
    with server, worker:
        wire.send(server, wire.Kind.CHALLENGE, payload=bytes(auth.NONCE_BYTES - 1))
        with pytest.raises(wire.ProtocolError):
            auth.answer(worker, KEY)
