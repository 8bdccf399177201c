"""Where servers listen: a server that cannot bind never removes another's socket or mailboxes, and the socket a
killed server left behind does not keep a new one from starting. Real server processes and Unix sockets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import running_server

from lightning_adag import auth
from lightning_adag.flat import Layout
from lightning_adag.server.launch import ServerProcess
from lightning_adag.transports import connect
from lightning_adag.transports.shm import SHM_DIR

LAYOUT = Layout(numel=10, trainable=8, dtype=torch.float32, digest="listeners")
KEY = "listeners-test-key"


def join(address: str, rank: int = 0):
    return connect("shm", address, rank, LAYOUT, {"name": "adag"}, KEY.encode(), timeout=30)


def test_a_second_server_on_a_live_servers_path_fails_and_leaves_it_whole():
    with running_server("shm", KEY) as first:
        worker = join(first.address)  # its mailbox's name lives until the worker's first request
        mailboxes = sorted(SHM_DIR.glob(f"{Path(first.address).stem}-*"))
        try:
            second = ServerProcess.start(KEY, "shm", first.address)
            with pytest.raises(RuntimeError, match="exited with code 1"):
                second.wait_ready()
            second.stop()
            assert Path(first.address).is_socket()
            assert mailboxes and sorted(SHM_DIR.glob(f"{Path(first.address).stem}-*")) == mailboxes
            worker.mailbox.fill_(2.0)
            assert worker.initialize(0).clock == 0
            late = join(first.address, 1)  # still reachable at its path
            late.close()
        finally:
            worker.close()


def test_a_second_standalone_server_says_the_address_is_taken_not_to_change_the_port():
    with running_server("shm", KEY) as first:
        result = subprocess.run(
            [sys.executable, "-m", "lightning_adag.server", "--unix", first.address],
            env={**os.environ, auth.KEY_ENV: KEY},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 1
        assert f"cannot listen on shm:{first.address}" in result.stderr
        assert "another server listens there" in result.stderr
        assert Path(first.address).is_socket()
        join(first.address).close()


def test_a_killed_servers_socket_is_replaced_by_the_next_server():
    killed = ServerProcess.start(KEY, "shm")
    try:
        address = killed.wait_ready()
        killed.process.send_signal(signal.SIGKILL)
        killed.process.wait(30)
        assert Path(address).is_socket()  # left behind
        successor = ServerProcess.start(KEY, "shm", address)
        try:
            assert successor.wait_ready() == address
            join(address).close()
        finally:
            successor.stop()
    finally:
        killed.stop()
    assert not Path(address).exists()
