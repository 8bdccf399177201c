"""Starting and stopping the server process that a training run owns."""

from __future__ import annotations

import functools
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from lightning_adag import auth
from lightning_adag.transports import TRANSPORTS

log = logging.getLogger(__name__)

#: Runs ``lightning_adag.server`` without the package's ``__init__``, which imports Lightning to register the
#: strategy: seconds of start-up and hundreds of MB that a server, which never touches Lightning, does not need.
_START_WITHOUT_LIGHTNING = (
    "import sys, types; package = types.ModuleType('lightning_adag'); package.__path__ = [sys.argv.pop(1)];"
    " sys.modules['lightning_adag'] = package; from lightning_adag.server.__main__ import main; main(sys.argv[1:])"
)


class ServerProcess:
    """A parameter server child process, owned by the process that started it.

    The server gets the read end of a pipe (the lifeline) and stops by itself when it reaches end-of-file or its
    parent changes, so it never outlives its owner, even one killed with SIGKILL. It runs in its own session so that a
    Ctrl+C in the terminal reaches the training processes, which then stop it in order, rather than the server first.
    With :meth:`keep_running`, a server that dies before :meth:`stop` is replaced by a new one at its address.
    """

    def __init__(self, process: subprocess.Popen, transport: str, where: str, lifeline: int, ready: int):
        self.process = process
        self.address = ""
        self._transport = transport
        self._where = where
        self._lifeline = lifeline
        self._ready = ready
        self._relaunch = None  # how to start another one like it (set by start)
        self._guard = threading.Lock()  # stop() against the keeper's swap of processes
        self._stopping = False

    @classmethod
    def start(
        cls,
        key: str,
        transport: str = "shm",
        where: str | None = None,
        log_level: str = "WARNING",
        options: Sequence[str] = (),
        stderr: int | IO | None = None,
    ) -> ServerProcess:
        """Start the process, listening for ``transport``'s workers at ``where`` (an address in that transport's
        terms: a socket path for shm, ``host:port`` for tcp, port 0 picking a free one; by default a new one of
        this machine). It imports and binds in the background until :meth:`wait_ready`. ``options`` are more
        ``adag-server`` command-line options (``"--shard-mib", "64"``); ``stderr``, where its log goes (by default,
        this process's stderr)."""
        where = where or TRANSPORTS[transport].listener.default_where()
        lifeline_read, lifeline_write = os.pipe()
        ready_read, ready_write = os.pipe()
        package = str(Path(__file__).resolve().parents[1])
        command = [
            sys.executable, "-c", _START_WITHOUT_LIGHTNING, package,
            "--listen", f"{transport}:{where}",
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
                stderr=stderr,
            )
        except BaseException:
            os.close(lifeline_write)
            os.close(ready_read)
            raise
        finally:
            os.close(lifeline_read)
            os.close(ready_write)
        server = cls(process, transport, where, lifeline_write, ready_read)
        server._relaunch = functools.partial(cls.start, key, transport, log_level=log_level, options=options)
        return server

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

    def keep_running(self) -> None:
        """Once ready: whenever the server dies before :meth:`stop`, log a warning and start a new one at the same
        address, with the same key and options (its workers reconnect and recover the center)."""
        threading.Thread(target=self._restart_when_it_dies, name="adag-server-keeper", daemon=True).start()

    def _restart_when_it_dies(self) -> None:
        while True:
            code = self.process.wait()
            with self._guard:
                if self._stopping:
                    return
                log.warning(
                    "the parameter server (pid %d) died (exit code %d); starting a new one at %s: the workers"
                    " reconnect, and it recovers the newest center they pulled",
                    self.pid,
                    code,
                    self.address,
                )
                TRANSPORTS[self._transport].listener.clean_up(self._where, self.pid)
                replacement = self._relaunch(where=self.address)  # the address bound, should port 0 have been asked
            try:
                replacement.wait_ready()
            except Exception as err:
                log.error("the new parameter server did not start (%s); the workers will fail", err)
                replacement.stop()
                return
            with self._guard:
                if self._stopping:
                    replacement.stop()
                    return
                os.close(self._lifeline)
                self.process, self._lifeline, replacement._lifeline = replacement.process, replacement._lifeline, -1
            log.warning("the new parameter server (pid %d) listens at %s", self.pid, self.address)

    def stop(self, grace: float = 10.0) -> None:
        """Stop the server (SIGTERM: it finishes serving and cleans up; SIGKILL after ``grace`` seconds) and
        remove anything it could not."""
        with self._guard:
            self._stopping = True
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
        TRANSPORTS[self._transport].listener.clean_up(self._where, self.process.pid)


def start_parts(
    key: str, transport: str, wheres: Sequence[str | None], log_level: str = "WARNING", options: Sequence[str] = ()
) -> list[ServerProcess]:
    """Start one server per address of ``wheres``: with several, server ``i`` holds part ``i`` of a center cut
    into ``len(wheres)`` (``--part i/k``, see :mod:`lightning_adag.transports.sharded`). If one cannot start, those
    already started are stopped."""
    servers: list[ServerProcess] = []
    try:
        for index, where in enumerate(wheres):
            part = ("--part", f"{index}/{len(wheres)}") if len(wheres) > 1 else ()
            servers.append(ServerProcess.start(key, transport, where, log_level, (*options, *part)))
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


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
