"""Periodic snapshots of a standalone server's center and clock, so that a restarted server resumes."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

from lightning_adag.flat import Layout
from lightning_adag.server.core import ServerCore

log = logging.getLogger("lightning_adag.server")


class SnapshotError(Exception):
    """No usable snapshot: the path cannot hold one, or every snapshot there is damaged."""


class Snapshotter:
    """Writes ``core``'s snapshot to ``path`` every ``every`` seconds when the clock moved, and restores it at start.

    A save is durable: the new file is written beside the old one (mode 0600), flushed to disk, the old one is
    kept as ``<path>.prev`` and the new one renamed into place, and the directory is flushed too. So a crash or a
    power cut at any moment leaves a whole snapshot at ``path`` or ``<path>.prev``, and :meth:`restore` falls back
    to the previous one when the newest is damaged (which it renames ``<path>.damaged``). A failed save is logged
    and retried at the next period. Loading uses ``weights_only=True``: a snapshot file holds tensors, numbers
    and strings only."""

    def __init__(self, core: ServerCore, path: str | os.PathLike, every: float) -> None:
        self.core = core
        self.path = Path(path)
        self.previous = self.path.with_name(self.path.name + ".prev")
        self.every = every
        self._saved_clock: int | None = None
        self._writing = threading.Lock()  # the periodic thread and the final save at shutdown

    def check_path(self) -> None:
        """Fail at start, not at the first save, when ``path`` cannot hold a snapshot."""
        directory = self.path.parent
        if self.path.is_dir():
            raise SnapshotError(
                f"--checkpoint {self.path} is a directory: name a file in it, e.g. {self.path}/center.pt"
            )
        if not directory.is_dir():
            raise SnapshotError(f"--checkpoint {self.path}: the directory {directory} does not exist; create it first")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise SnapshotError(f"--checkpoint {self.path}: the directory {directory} is not writable by this user")

    def restore(self) -> None:
        """Load the newest whole snapshot (``path``, else ``<path>.prev``) into the core; nothing when there is
        none yet. ``SnapshotError`` when snapshots exist but none is usable."""
        damaged = []
        for candidate in (self.path, self.previous):
            if not candidate.exists():
                continue
            try:
                snapshot = torch.load(candidate, weights_only=True)
                check_snapshot(snapshot)
                self.core.restore(snapshot)
            except Exception as err:  # a truncated zip, a wrong layout, a NaN: any of them makes the file unusable
                log.error("the snapshot %s is damaged (%s: %s)", candidate, type(err).__name__, err)
                damaged.append(f"{candidate} ({type(err).__name__}: {err})")
                continue
            self._saved_clock = self.core.clock
            log.info("restored the center at clock %d from %s", self.core.clock, candidate)
            if damaged:  # keep it for a look, out of the way of the next save's rotation
                os.replace(self.path, self.path.with_name(self.path.name + ".damaged"))
            return
        if damaged:
            raise SnapshotError(
                f"no usable snapshot: {'; '.join(damaged)}. Move them away to start from an empty center (the first"
                " worker then initializes it), or restore a backup"
            )
        log.info("no snapshot at %s yet: the first worker initializes the center", self.path)

    def save(self) -> None:
        """Write a snapshot if the clock moved since the last one (``OSError`` if it cannot be written)."""
        with self._writing:
            snapshot = self.core.snapshot()
            if snapshot is None or snapshot["clock"] == self._saved_clock:
                return
            partial = self.path.with_name(self.path.name + ".partial")
            partial.unlink(missing_ok=True)  # a crash's leftover: the new file must be created with our mode
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as file:
                torch.save(snapshot, file)
                file.flush()
                os.fsync(file.fileno())
            if self.path.exists():
                os.replace(self.path, self.previous)
            os.replace(partial, self.path)
            _sync_directory(self.path.parent)
            self._saved_clock = snapshot["clock"]
        log.info("snapshot at clock %d written to %s", snapshot["clock"], self.path)

    def save_or_log(self) -> bool:
        """:meth:`save`, logging a failure instead of raising it; whether the snapshot is up to date."""
        try:
            self.save()
        except Exception as err:  # a full disk, a removed directory: the next period tries again
            log.error(
                "cannot write the snapshot %s (%s: %s); retrying in %g s",
                self.path,
                type(err).__name__,
                err,
                self.every,
            )
            return False
        return True

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.every):
            self.save_or_log()


def check_snapshot(snapshot: object) -> None:
    """Raise a ``ValueError`` unless ``snapshot`` is a dict whose center and server state fit its own layout."""
    if not isinstance(snapshot, dict) or not {"center", "clock", "layout", "algorithm"} <= snapshot.keys():
        raise ValueError("not a snapshot of this server (it lacks the center, clock, layout or algorithm)")
    layout = Layout.from_json(snapshot["layout"])
    center = snapshot["center"]
    if not isinstance(center, torch.Tensor) or center.shape != (layout.numel,) or center.dtype != layout.dtype:
        found = f"{tuple(center.shape)} {center.dtype}" if isinstance(center, torch.Tensor) else type(center).__name__
        raise ValueError(f"its center is {found}, its layout says ({layout.numel},) {layout.dtype}")
    if isinstance(snapshot["clock"], bool) or not isinstance(snapshot["clock"], int):
        raise ValueError(f"its clock is {snapshot['clock']!r}, not an integer")
    for name, values in snapshot.get("server_state", {}).items():
        if not isinstance(values, torch.Tensor) or values.shape != (layout.trainable,):
            raise ValueError(f"its server state {name!r} does not have the {layout.trainable} trainable elements")


def _sync_directory(directory: Path) -> None:
    """Flush a directory's entries (the rename) to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
