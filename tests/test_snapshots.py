"""A standalone server's snapshots: durable, private, checked on restore, and never the reason a server dies."""

from __future__ import annotations

import logging
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import SHM, adag_leftovers

from lightning_adag.flat import Layout
from lightning_adag.server.core import ServerCore
from lightning_adag.server.launch import ServerProcess
from lightning_adag.server.snapshots import SnapshotError, Snapshotter
from lightning_adag.transports import connect

LAYOUT = Layout(numel=10, trainable=8, dtype=torch.float32, digest="snap")
ADAG = {"name": "adag"}


def core_at(clock: int, value: float) -> ServerCore:
    core = ServerCore()
    core.configure(LAYOUT, ADAG)
    core.initialize(torch.full((10,), value), clock)
    return core


def restored(path: Path) -> ServerCore:
    core = ServerCore()
    Snapshotter(core, path, 60).restore()
    return core


def commit(core: ServerCore, value: float) -> None:
    core.commit(0, torch.full((10,), value), core.clock)


def test_a_snapshot_is_private_and_the_previous_one_is_kept(tmp_path):
    path = tmp_path / "center.pt"
    core = core_at(3, 1.0)
    snapshots = Snapshotter(core, path, 60)
    snapshots.save()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    commit(core, 0.5)
    snapshots.save()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert torch.load(path, weights_only=True)["clock"] == 4
    assert torch.load(snapshots.previous, weights_only=True)["clock"] == 3
    assert not path.with_name("center.pt.partial").exists()


def test_a_truncated_snapshot_falls_back_to_the_previous_one_and_says_which(tmp_path, caplog):
    path = tmp_path / "center.pt"
    core = core_at(3, 1.0)
    snapshots = Snapshotter(core, path, 60)
    snapshots.save()
    commit(core, 0.5)
    snapshots.save()
    path.write_bytes(path.read_bytes()[:100])  # what a crash in the middle of a copy leaves
    with caplog.at_level(logging.ERROR, "lightning_adag.server"):
        core = restored(path)
    assert core.clock == 3 and torch.equal(core.center, torch.full((10,), 1.0))
    assert f"the snapshot {path} is damaged" in caplog.text
    assert path.with_name("center.pt.damaged").exists()
    # the next save rotates the good snapshot into .prev, never the damaged one
    snapshots = Snapshotter(core, path, 60)
    commit(core, 0.25)
    snapshots.save()
    assert torch.load(snapshots.previous, weights_only=True)["clock"] == 3


def test_no_usable_snapshot_is_a_clear_error_naming_the_files(tmp_path):
    path = tmp_path / "center.pt"
    path.write_bytes(b"PK\x03\x04 not a whole zip")
    with pytest.raises(SnapshotError, match=f"no usable snapshot: {path} .*Move them away"):
        restored(path)


def test_a_center_that_does_not_fit_its_layout_is_refused_not_broadcast(tmp_path):
    path = tmp_path / "center.pt"
    snapshot = core_at(3, 1.0).snapshot()
    snapshot["center"] = torch.ones(1, dtype=torch.float64)
    torch.save(snapshot, path)
    with pytest.raises(SnapshotError, match=r"its center is \(1,\) torch.float64, its layout says \(10,\)"):
        restored(path)


def test_a_failed_save_is_logged_and_retried_at_the_next_period(tmp_path, caplog):
    directory = tmp_path / "snapshots"
    directory.mkdir()
    path = directory / "center.pt"
    core = core_at(3, 1.0)
    snapshots = Snapshotter(core, path, 0.05)
    stop = threading.Event()
    thread = threading.Thread(target=snapshots.run, args=(stop,))
    with caplog.at_level(logging.ERROR, "lightning_adag.server"):
        directory.rmdir()
        thread.start()
        try:
            time.sleep(0.3)  # several periods fail
            assert thread.is_alive()
            directory.mkdir()
            deadline = time.monotonic() + 10
            while not path.exists():
                assert time.monotonic() < deadline, "the snapshot thread stopped trying"
                time.sleep(0.05)
        finally:
            stop.set()
            thread.join()
    assert f"cannot write the snapshot {path}" in caplog.text
    assert restored(path).clock == 3


def test_a_checkpoint_path_in_a_missing_directory_is_refused_at_start(tmp_path):
    path = tmp_path / "missing" / "center.pt"
    server = subprocess.run(
        [sys.executable, "-m", "lightning_adag.server", "--port", "0", "--checkpoint", str(path)],
        env={"ADAG_AUTH_KEY": "k", "PATH": "/usr/bin:/bin", **_pythonpath()},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert server.returncode == 1
    assert f"the directory {path.parent} does not exist" in server.stderr


def test_a_failing_final_save_still_cleans_up(tmp_path, capfd):
    """The last snapshot cannot be written: the server says so and exits 1, but removes its socket and segments."""
    before = adag_leftovers()
    directory = tmp_path / "snapshots"
    directory.mkdir()
    path = directory / "center.pt"
    server = ServerProcess.start("k", options=("--checkpoint", str(path), "--log-level", "INFO"))
    try:
        address = server.wait_ready()
        client = connect("shm", address, 0, LAYOUT, ADAG, b"k", timeout=10)
        client.mailbox.fill_(1.0)
        client.initialize(0)
        client.commit(0, 1)
        directory.rmdir()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 1
        client.close()
        assert f"cannot write the snapshot {path}" in capfd.readouterr().err
        assert not Path(address).exists()
        assert not list(SHM.glob(f"{Path(address).stem}-*"))
        assert not adag_leftovers() - before
    finally:
        server.stop()


def _pythonpath() -> dict[str, str]:
    return {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
