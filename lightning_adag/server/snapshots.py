"""Periodic snapshots of a standalone server's center and clock, so that a restarted server resumes."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

from lightning_adag.server.core import ServerCore

log = logging.getLogger("lightning_adag.server")


class Snapshotter:
    """Writes ``core``'s snapshot to ``path`` every ``every`` seconds when the clock moved, atomically (a temporary
    file renamed over the old one), and restores it at start. Loading uses ``weights_only=True``: a snapshot file
    holds tensors, numbers and strings only."""

    def __init__(self, core: ServerCore, path: str | os.PathLike, every: float) -> None:
        self.core = core
        self.path = Path(path)
        self.every = every
        self._saved_clock: int | None = None
        self._writing = threading.Lock()  # the periodic thread and the final save at shutdown

    def restore(self) -> None:
        if not self.path.exists():
            log.info("no snapshot at %s yet: the first worker initializes the center", self.path)
            return
        snapshot = torch.load(self.path, weights_only=True)
        self.core.restore(snapshot)
        self._saved_clock = self.core.clock
        log.info("restored the center at clock %d from %s", self.core.clock, self.path)

    def save(self) -> None:
        with self._writing:
            snapshot = self.core.snapshot()
            if snapshot is None or snapshot["clock"] == self._saved_clock:
                return
            partial = self.path.with_name(self.path.name + ".partial")
            torch.save(snapshot, partial)
            os.replace(partial, self.path)
            self._saved_clock = snapshot["clock"]
        log.info("snapshot at clock %d written to %s", snapshot["clock"], self.path)

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.every):
            self.save()
