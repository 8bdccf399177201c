"""Starting and stopping the server process that a training run owns."""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from lightning_adag import auth
from lightning_adag.transports import shm


class ServerProcess:
    """A parameter server child process, owned by the process that started it.

    The server gets the read end of a pipe (the lifeline) and stops by itself when it reaches end-of-file or its
    parent changes, so it never outlives its owner, even one killed with SIGKILL. It runs in its own session so that a
    Ctrl+C in the terminal reaches the training processes, which then stop it in order, rather than the server first.
    """

    def __init__(self, process: subprocess.Popen, socket_path: Path, shm_prefix: str, lifeline: int, ready: int):
        self.process = process
        self.address = ""
        self._socket_path = socket_path
        self._shm_prefix = shm_prefix
        self._lifeline = lifeline
        self._ready = ready

    @classmethod
    def start(
        cls,
        key: str,
        host: str | None = None,
        port: int = 0,
        log_level: str = "WARNING",
        options: Sequence[str] = (),
    ) -> ServerProcess:
        """Start the process: on a Unix socket of this machine (shared memory) when ``host`` is None, else on TCP
        ``host:port`` (0 picks a free port). It imports and binds in the background until :meth:`wait_ready`.
        ``options`` are more ``adag-server`` command-line options (``"--shard-mib", "64"``)."""
        shm_prefix = f"adag-{os.getpid()}-{secrets.token_hex(4)}"
        socket_path = Path(tempfile.gettempdir(), f"{shm_prefix}.sock")
        lifeline_read, lifeline_write = os.pipe()
        ready_read, ready_write = os.pipe()
        listen = ["--unix", str(socket_path)] if host is None else ["--host", host, "--port", str(port)]
        command = [
            sys.executable, "-m", "lightning_adag.server", *listen,
            "--shm-prefix", shm_prefix,
            "--lifeline-fd", str(lifeline_read),
            "--ready-fd", str(ready_write),
            "--log-level", log_level,
            *options,
        ]  # fmt: skip
        env = {**os.environ, auth.KEY_ENV: key}
        try:
            process = subprocess.Popen(
                command,
                env=env,
                pass_fds=(lifeline_read, ready_write),
                start_new_session=True,
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            os.close(lifeline_write)
            os.close(ready_read)
            raise
        finally:
            os.close(lifeline_read)
            os.close(ready_write)
        return cls(process, socket_path, shm_prefix, lifeline_write, ready_read)

    def wait_ready(self, timeout: float = 60.0) -> str:
        """Block until the server listens; return its address."""
        if not self.address:
            try:
                self.address = _read_ready_line(self._ready, self.process, timeout)["addresses"][0]
            finally:
                os.close(self._ready)
                self._ready = -1
        return self.address

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, grace: float = 10.0) -> None:
        """Stop the server (SIGTERM: it finishes serving and cleans up; SIGKILL after ``grace`` seconds) and
        remove anything it could not."""
        for fd in (self._lifeline, self._ready):
            if fd >= 0:
                os.close(fd)
        self._lifeline = self._ready = -1
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shm.remove_segments(self._shm_prefix)
        shm.unlink_quietly(self._socket_path)


def _read_ready_line(fd: int, process: subprocess.Popen, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"the parameter server (pid {process.pid}) did not start within {timeout:.0f} s")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                code = process.wait()
                raise RuntimeError(f"the parameter server exited with code {code} before it was ready; see its log")
            data += chunk
    return json.loads(data)
