from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

from lightning_adag.server.launch import ServerProcess, start_parts
from lightning_adag.transports.tcp import split_address

SCRIPTS = Path(__file__).parent / "scripts"
SHM = Path("/dev/shm")
#: train.py options for a run long enough to kill its server in the middle of (rank 0 sleeps at every step).
SLOW_RANK_ZERO = ("--slow-rank", "0", "--slow-sleep", "0.03")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Every live process that inherited ``ADAG_TEST_TAG=tag`` (the launcher, its workers and the server)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("ADAG_TEST_TAG") == tag and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def adag_leftovers() -> set[str]:
    """Shared-memory segments and server sockets of this project whose owner (the pid in their name,
    ``adag-<pid>-...``) has exited: nobody is left to remove them. Those of live processes are still in use."""
    paths = [*SHM.glob("adag-*"), *Path(tempfile.gettempdir()).glob("adag-*.sock")]
    return {str(p) for p in paths if not _alive(int(p.name.split("-")[1].split(".")[0]))}


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def raw_socket(transport: str, address: str, timeout: float = 10) -> socket.socket:
    """A plain socket connected to a server at ``address``, to speak (or not speak) frames by hand."""
    if transport == "tcp":
        return socket.create_connection(split_address(address), timeout=timeout)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(address)  # blocking: waits while the listening socket's queue is full
    sock.settimeout(timeout)
    return sock


@contextlib.contextmanager
def running_server(
    transport: str = "shm", key: str = "k", options: tuple[str, ...] = (), log_level: str = "ERROR", stderr=None
):
    """A server process of the tests' own (a server runs the one algorithm and model its first worker names),
    ready, and stopped afterwards whatever happens; its log at ``log_level`` goes to ``stderr`` (a file)."""
    server = ServerProcess.start(key, transport, log_level=log_level, options=options, stderr=stderr)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def running_parts(count: int, key: str = "k"):
    """``count`` TCP server processes, server ``i`` holding part ``i`` of a center cut into ``count``, ready, and
    stopped afterwards whatever happens; yields their addresses in part order."""
    servers = start_parts(key, "tcp", [None] * count, log_level="ERROR")
    try:
        yield [server.wait_ready() for server in servers]
    finally:
        for server in servers:
            server.stop()


class ScriptRun:
    """Runs a test script as a user would, in its own process tree; kills whatever is left at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tag = uuid.uuid4().hex
        self.out = tmp_path / "out"
        self.out.mkdir()
        self.procs: list[subprocess.Popen] = []
        self.log = open(self.out / "log.txt", "w+")

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.procs[0] if self.procs else None

    def start(
        self, script: str, *args: str, launcher: tuple[str, ...] = (), env: dict | None = None, out: bool = True
    ) -> subprocess.Popen:
        """Start ``python [launcher...] script [--out OUT] args...`` in a process tree of its own; ``launcher`` is
        for example ``("-m", "torch.distributed.run", ...)``, ``env`` adds environment variables."""
        env = dict(os.environ, **(env or {}), ADAG_TEST_TAG=self.tag, PYTHONUNBUFFERED="1")
        target = [str(SCRIPTS / script), "--out", str(self.out)] if out else [script]
        command = [sys.executable, *launcher, *target, *args]
        proc = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def run(self, script: str, *args: str, timeout: float = 180, **kwargs) -> int:
        return self.wait(self.start(script, *args, **kwargs), timeout)

    def wait(self, proc: subprocess.Popen, timeout: float = 180) -> int:
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{proc.args} did not finish within {timeout} s:\n{self.output()}")

    def wait_for(self, name: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not (self.out / name).exists():
            if self.proc.poll() is not None:
                pytest.fail(f"the script exited ({self.proc.returncode}) before {name} appeared:\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{name} did not appear within {timeout} s:\n{self.output()}")
            time.sleep(0.05)

    def output(self) -> str:
        self.log.flush()
        return (self.out / "log.txt").read_text()

    def results(self) -> dict[int, dict]:
        """What each rank wrote, once every process of the run has exited (the launching process, rank 0, may
        exit before another rank has written its file)."""
        self.leftovers()
        return {int(p.stem[4:]): json.loads(p.read_text()) for p in self.out.glob("rank*.json")}

    def leftovers(self, settle: float = 15.0) -> list[str]:
        """Processes of this run still alive after ``settle`` seconds."""
        deadline = time.monotonic() + settle
        while (left := tagged_processes(self.tag)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return [f"{p.pid} {' '.join(p.cmdline())}" for p in left]

    def kill_all(self) -> None:
        for proc in tagged_processes(self.tag):
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        for proc in self.procs:
            if proc.poll() is None:
                proc.wait(10)


@pytest.fixture
def script(tmp_path):
    """A :class:`ScriptRun`; afterwards, nothing of the run may be alive and no new segment may remain."""
    before = adag_leftovers()
    run = ScriptRun(tmp_path)
    try:
        yield run
        if run.procs:
            left = run.leftovers()
            assert not left, "orphan processes after the run:\n" + "\n".join(left)
            leaked = adag_leftovers() - before
            assert not leaked, f"segments or sockets left behind: {sorted(leaked)}"
    finally:
        run.kill_all()
        for path in adag_leftovers() - before:
            Path(path).unlink(missing_ok=True)


def assert_recovered(results: dict[int, dict], kills: int) -> None:
    """Every worker reconnected once per kill; the server's clock counts every acknowledged commit and at most
    the lost ones besides; the final center is everywhere and as accurate as an undisturbed run's."""
    assert sorted(results) == [0, 1]
    assert all(result["reconnections"] == kills for result in results.values())
    attempted = sum(result["commits"] for result in results.values())
    lost = sum(result["lost_commits"] for result in results.values())
    assert lost <= kills * len(results)  # one commit in flight per worker at most
    clock = results[0]["final_clock"]
    assert clock == results[1]["final_clock"]
    assert attempted - lost <= clock - results[0]["start_clock"] <= attempted
    assert results[0]["digest"] == results[1]["digest"]
    assert results[0]["validate"]["val_acc"] >= 0.9  # as test_trains_to_accuracy_and_leaves_the_center_everywhere
