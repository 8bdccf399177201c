"""Joining a server under load: peers beyond what it admits at once are told it is busy and retry, silent
sockets cannot keep honest workers out, and refusals cannot flood the log. Real server processes and sockets."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import raw_socket, running_server
from hypothesis import given
from hypothesis import strategies as st

from lightning_adag import auth, wire
from lightning_adag.flat import Layout
from lightning_adag.server.refusals import RefusalLog
from lightning_adag.transports import connect

LAYOUT = Layout(numel=10, trainable=8, dtype=torch.float32, digest="admission")
ADAG = {"name": "adag"}
KEY = "admission-test-key"


def join(transport: str, address: str, rank: int, timeout: float = 60):
    return connect(transport, address, rank, LAYOUT, ADAG, KEY.encode(), timeout=timeout)


@pytest.mark.parametrize("transport", ["shm", "tcp"])
@pytest.mark.parametrize(("options", "silent"), [((), 300), (("--max-handshakes", "8"), 8)], ids=["default", "8"])
def test_an_honest_worker_joins_while_silent_sockets_hold_every_slot(transport, options, silent):
    with running_server(transport, KEY, options) as server:
        peers = [raw_socket(transport, server.address) for _ in range(silent)]
        try:
            time.sleep(1.5)  # they have been silent long enough to make room for someone else
            started = time.monotonic()
            client = join(transport, server.address, 0)
            assert time.monotonic() - started < 5  # not after the silent ones' 10 s handshake deadline
            client.close()
        finally:
            for peer in peers:
                peer.close()


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_workers_joining_at_once_beyond_the_limit_are_told_busy_and_all_get_in(transport):
    with running_server(transport, KEY, ("--max-handshakes", "2")) as server:
        with ThreadPoolExecutor(64) as pool:
            clients = list(pool.map(lambda rank: join(transport, server.address, rank), range(64)))
        try:
            assert len(clients) == 64
            clients[0].mailbox.fill_(1.0)
            clients[0].initialize(0)
            assert all(client.pull().clock == 0 for client in clients)
        finally:
            for client in clients:
                client.close()


def test_a_busy_server_is_told_apart_from_a_dead_one():
    with running_server("tcp", KEY, ("--max-handshakes", "1")) as server:
        holder = raw_socket("tcp", server.address)  # takes the only slot, and is not silent for long enough
        try:
            with pytest.raises(wire.ServerBusyError, match="stayed busy for 0 s.*--max-handshakes"):
                join("tcp", server.address, 1, timeout=0.2)
        finally:
            holder.close()


def test_a_flood_of_refused_peers_leaves_a_few_log_lines(tmp_path):
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log_file:
        with running_server("tcp", KEY, log_level="WARNING", stderr=log_file) as server:
            for _ in range(300):  # each fails authentication
                sock = raw_socket("tcp", server.address)
                try:
                    auth.answer(sock, b"not-the-key")
                except (auth.AuthenticationError, OSError):
                    pass
                sock.close()
            client = join("tcp", server.address, 0)  # still serving
            client.close()
    lines = log_path.read_text().splitlines()
    refusals = [line for line in lines if "failed authentication" in line]
    assert 1 <= len(refusals) <= 20, lines[:30]


@given(st.lists(st.floats(0, 30), max_size=200))
def test_refusals_log_at_most_a_burst_per_interval_and_count_the_rest(gaps):
    now = [0.0]
    records: list[logging.LogRecord] = []
    logger = logging.getLogger(f"refusals-{threading.get_ident()}")
    logger.propagate = False
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        refusals = RefusalLog(logger, burst=3, interval=10.0, clock=lambda: now[0])
        for gap in gaps:
            now[0] += gap
            refusals.warn("refused %s", "a peer")
        now[0] += 10.0
        refusals.flush()
    finally:
        logger.removeHandler(handler)
    one_by_one = [r for r in records if r.getMessage() == "refused a peer"]
    counted = sum(r.args[0] for r in records if "not logged one by one" in r.msg)
    assert len(one_by_one) + counted == len(gaps)  # nothing is lost from the count
    intervals = 1 + sum(gaps) / 10.0
    assert len(one_by_one) <= 3 * (intervals + 1)
