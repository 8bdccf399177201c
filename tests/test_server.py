"""A real server process reached through real Unix sockets and shared memory."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import adag_leftovers
from lightning_adag import wire
from lightning_adag.flat import Layout
from lightning_adag.server.launch import ServerProcess
from lightning_adag.transports.shm import ShmClient

LAYOUT = Layout(numel=10, trainable=8, dtype=torch.float32, digest="test")
ADAG = {"name": "adag"}


def connect(server, rank=0, layout=LAYOUT):
    return ShmClient(server.address, rank, layout, ADAG, timeout=30)


@pytest.fixture(scope="module")
def server():
    before = adag_leftovers()
    server = ServerProcess.start(log_level="ERROR")
    server.wait_ready()
    first = connect(server)
    first.mailbox.copy_(torch.arange(10, dtype=torch.float32))
    first.initialize(0)
    yield server
    first.close()
    server.stop()
    assert server.process.returncode == 0
    assert adag_leftovers() == before


def center(server):
    client = connect(server, rank=99)
    try:
        receipt = client.pull()
        return client.mailbox.clone(), receipt.clock
    finally:
        client.close()


def test_commit_then_pull_through_shared_memory(server):
    start, clock = center(server)
    client = connect(server, rank=1)
    client.mailbox.fill_(0.5)
    receipt = client.commit(clock, steps=4)
    assert receipt.clock == clock + 1 and receipt.staleness == 0
    expected = start.clone()
    expected[:8] += 0.5
    expected[8:] = 0.5
    assert torch.equal(client.mailbox, expected)  # the mailbox now holds the new center
    stats = client.stats()
    assert stats["clock"] == clock + 1 and stats["workers"]["1"]["commits"] >= 1
    client.close()


def test_mailboxes_are_unlinked_once_both_sides_map_them(server):
    client = connect(server, rank=2)
    client.pull()
    assert not [p for p in adag_leftovers() if p.startswith("/dev/shm")]  # no segment name while connected
    client.close()


def test_a_worker_with_another_model_gets_a_clear_error(server):
    with pytest.raises(wire.ServerRefusedError, match="model layout mismatch"):
        connect(server, layout=Layout(numel=12, trainable=8, dtype=torch.float32, digest="other"))
    assert center(server)[1] >= 0  # still serving


frames = st.one_of(
    st.binary(max_size=200),  # garbage
    st.builds(  # well-formed headers in any order, with any integers and payload sizes
        lambda kind, a, b, payload, cut: wire.encode(kind, a, b, payload)[: cut or None],
        st.sampled_from(list(wire.Kind)),
        st.integers(-(2**63), 2**63 - 1),
        st.integers(-(2**63), 2**63 - 1),
        st.binary(max_size=64),
        st.integers(0, 40),
    ),
    st.just(wire.HEADER.pack(wire.MAGIC, wire.VERSION, int(wire.Kind.HELLO), 0, 0, 0, 2**40)),  # oversized
)


@given(st.lists(frames, min_size=1, max_size=4))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_hostile_frames_close_that_connection_and_leave_the_center_alone(server, sequence):
    before = center(server)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect(server.address)
        for data in sequence:
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(4096):  # the server answers (ERROR, WELCOME, ...) and closes; it never hangs
            pass
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        sock.close()
    after = center(server)
    assert after[1] == before[1] and torch.equal(after[0], before[0])


def test_a_stalled_client_does_not_block_other_commits(server):
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stalled.connect(server.address)
    stalled.sendall(wire.encode(wire.Kind.HELLO)[:10])  # half a header, then nothing
    try:
        client = connect(server, rank=3)
        _, clock = center(server)
        started = time.monotonic()
        for _ in range(20):
            clock = client.commit(clock, 1).clock
        assert time.monotonic() - started < 5
        client.close()
    finally:
        stalled.close()


def test_a_client_killed_mid_commit_changes_nothing(server, tmp_path):
    # A child process connects, writes a delta into its mailbox, sends half a COMMIT header and is killed.
    code = f"""
import os, signal, sys, torch
sys.path.insert(0, {str(os.path.dirname(__file__))!r})
from test_server import connect, LAYOUT
from lightning_adag import wire
class S: address = {server.address!r}
client = connect(S, rank=7)
client.mailbox.fill_(1000.0)
client._sock.sendall(wire.encode(wire.Kind.COMMIT, 0, 1)[:20])
os.kill(os.getpid(), signal.SIGKILL)
"""
    before = center(server)
    subprocess.run([sys.executable, "-c", code], timeout=60)
    time.sleep(0.2)
    after = center(server)
    assert after[1] == before[1] and torch.equal(after[0], before[0])


def test_the_server_stops_and_cleans_up_when_its_owner_is_killed(tmp_path):
    before = adag_leftovers()
    owner_code = """
import sys, time, torch
from lightning_adag.server.launch import ServerProcess
from lightning_adag.transports.shm import ShmClient
from lightning_adag.flat import Layout
server = ServerProcess.start()
server.wait_ready()
client = ShmClient(server.address, 0, Layout(10, 8, torch.float32, "x"), {"name": "adag"}, timeout=10)
print(server.pid, flush=True)
time.sleep(600)
"""
    owner = subprocess.Popen([sys.executable, "-c", owner_code], stdout=subprocess.PIPE, text=True)
    try:
        server_pid = int(owner.stdout.readline())
        assert psutil.pid_exists(server_pid)
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        deadline = time.monotonic() + 20
        while psutil.pid_exists(server_pid) and psutil.Process(server_pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the server outlived its owner"
            time.sleep(0.05)
        assert adag_leftovers() == before
    finally:
        owner.kill()
