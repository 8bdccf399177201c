"""A real server process reached through real sockets and shared memory, over both transports."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch
from conftest import adag_leftovers, raw_socket, running_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_adag import auth, wire
from lightning_adag.flat import Layout
from lightning_adag.payload import CommitPayload
from lightning_adag.server.launch import ServerProcess
from lightning_adag.transports import connect

LAYOUT = Layout(numel=10, trainable=8, dtype=torch.float32, digest="test")
ADAG = {"name": "adag"}
KEY = "test-key"


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


#: ``--shard-mib`` for 16-byte shards: LAYOUT's center is three shards, so every test here also crosses shards.
THREE_SHARDS = ("--shard-mib", repr(16 / 2**20))


class Server:
    """A running server process and what the tests do with it."""

    def __init__(self, transport: str, process: ServerProcess, algorithm: dict = ADAG) -> None:
        self.transport, self.process, self.address = transport, process, process.address
        self.algorithm = algorithm

    def connect(self, rank=0, layout=LAYOUT, key=KEY):
        return connect(self.transport, self.address, rank, layout, self.algorithm, key.encode(), timeout=30)

    def raw_socket(self) -> socket.socket:
        return raw_socket(self.transport, self.address)

    def center(self) -> tuple[torch.Tensor, int]:
        client = self.connect(rank=99)
        try:
            receipt = client.pull()
            return client.mailbox.clone(), receipt.clock
        finally:
            client.close()


def assert_unchanged(before: tuple[torch.Tensor, int], after: tuple[torch.Tensor, int]) -> None:
    """Same clock and the same bits (``torch.equal`` would call a center holding NaN changed)."""
    assert after[1] == before[1]
    assert torch.equal(after[0].view(torch.int32), before[0].view(torch.int32))


@contextlib.contextmanager
def initialized_server(transport: str, algorithm: dict = ADAG):
    """A server whose center starts as 0..9, checked on exit to have stopped cleanly and left nothing behind."""
    before = adag_leftovers()
    with running_server(transport, KEY, THREE_SHARDS) as process:
        server = Server(transport, process, algorithm)
        first = server.connect()
        first.mailbox.copy_(torch.arange(10, dtype=torch.float32))
        first.initialize(0)
        yield server
        first.close()
    assert server.process.process.returncode == 0
    assert not adag_leftovers() - before


@pytest.fixture(scope="module", params=["shm", "tcp"])
def server(request):
    with initialized_server(request.param) as server:
        yield server


def test_commit_then_pull(server):
    start, clock = server.center()
    client = server.connect(rank=1)
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


def test_a_compressed_commit_is_accumulated_in_the_center_dtype(server):
    start, clock = server.center()
    client = server.connect(rank=1)
    payload = CommitPayload(LAYOUT, torch.bfloat16)
    delta, values = payload.views(client.mailbox.view(torch.uint8))
    delta.copy_(torch.linspace(-1, 1, 8) / 3)
    values.fill_(0.25)
    sent = delta.clone()
    receipt = client.commit(clock, 1, payload)
    assert receipt.clock == clock + 1
    expected = start.clone()
    expected[:8] += sent.float()
    expected[8:] = 0.25
    assert torch.equal(client.mailbox, expected)
    client.close()


def _authenticated_peer(server, rank=7):
    """A raw socket that has authenticated and said hello with LAYOUT, to speak frames by hand."""
    sock = server.raw_socket()
    auth.answer(sock, KEY.encode())
    wire.send(
        sock, wire.Kind.HELLO, payload=wire.json_payload({"rank": rank, "layout": LAYOUT.to_json(), "algorithm": ADAG})
    )
    assert wire.recv(sock).kind is wire.Kind.WELCOME
    return sock


@pytest.mark.parametrize(
    ("code", "length", "error"),
    [(0, 0, "unknown dtype code 0"), (9, 0, "unknown dtype code 9"), (2, 0, "narrower"), (4, 3, "bytes")],
    ids=["no-tensor", "unknown", "wider-than-the-center", "wrong-length"],
)
def test_a_commit_that_announces_a_wrong_payload_is_refused(server, code, length, error):
    before = server.center()
    sock = _authenticated_peer(server)
    try:
        if server.transport == "shm" and length:
            pytest.skip("a shared-memory commit carries no bytes")
        sock.sendall(
            wire.HEADER.pack(wire.MAGIC, wire.VERSION, int(wire.Kind.COMMIT), code, 0, 0, 1, length) + bytes(length)
        )
        reply = wire.recv(sock)
        assert reply.kind is wire.Kind.ERROR and error in reply.payload.decode()
    finally:
        sock.close()
    after = server.center()
    assert_unchanged(before, after)


def test_a_late_worker_pulls_the_center_the_server_holds(server):
    start, _ = server.center()
    late = server.connect(rank=5)
    late.mailbox.fill_(-7.0)  # its own initial parameters
    late.initialize(0)  # ignored: the server already holds a center
    assert torch.equal(late.mailbox, start)
    late.close()


def test_mailbox_segments_are_unlinked_once_both_sides_map_them(server):
    client = server.connect(rank=2)
    client.pull()
    assert not [p for p in adag_leftovers() if p.startswith("/dev/shm")]  # no segment name while connected
    client.close()


def test_a_worker_with_another_model_gets_a_clear_error(server):
    with pytest.raises(wire.ServerRefusedError, match="model layout mismatch"):
        server.connect(layout=Layout(numel=12, trainable=8, dtype=torch.float32, digest="other"))
    assert server.center()[1] >= 0  # still serving


def test_a_wrong_key_is_refused_before_anything_else(server):
    with pytest.raises(auth.AuthenticationError, match="authentication failed"):
        server.connect(key="not-the-key")
    assert server.center()[1] >= 0


def test_a_server_without_the_key_is_detected_by_the_worker(server):
    # a fake server that answers the challenge with garbage: the worker must not trust it
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    address = f"127.0.0.1:{listener.getsockname()[1]}"

    def impostor():
        conn, _ = listener.accept()
        wire.send(conn, wire.Kind.CHALLENGE, payload=os.urandom(auth.NONCE_BYTES))
        wire.recv(conn)
        wire.send(conn, wire.Kind.AUTH_OK, payload=os.urandom(auth.DIGEST_BYTES))
        conn.close()

    import threading

    thread = threading.Thread(target=impostor)
    thread.start()
    with pytest.raises(auth.AuthenticationError, match="could not prove"):
        connect("tcp", address, 0, LAYOUT, ADAG, KEY.encode(), timeout=10)
    thread.join()
    listener.close()


def _send_and_drain(server, chunks, authenticate=False):
    sock = server.raw_socket()
    try:
        if authenticate:
            auth.answer(sock, KEY.encode())
        for data in chunks:
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):  # the server answers (ERROR, WELCOME, ...) and closes; it never hangs
            pass
    except OSError:  # the server may already have closed the connection (broken pipe, reset, not connected)
        pass
    finally:
        sock.close()


def _frame(kind, a, b, payload, dtype, cut):
    return wire.encode(kind, a, b, payload, dtype)[: cut or None]


frames = st.one_of(
    st.binary(max_size=200),  # garbage
    st.builds(  # well-formed headers in any order, with any integers, dtypes and payload sizes, maybe truncated
        _frame,
        st.sampled_from(list(wire.Kind)),
        st.integers(-(2**63), 2**63 - 1),
        st.integers(-(2**63), 2**63 - 1),
        st.binary(max_size=64),
        st.integers(0, 6),
        st.integers(0, 40),
    ),
    st.just(wire.HEADER.pack(wire.MAGIC, wire.VERSION, int(wire.Kind.COMMIT), 1, 0, 0, 0, 2**40)),  # oversized
    st.just(wire.encode(wire.Kind.HELLO, payload=wire.json_payload({"rank": 1, "layout": LAYOUT.to_json()}))),
)


@given(st.lists(frames, min_size=1, max_size=4))
@fuzz(1000)
def test_hostile_frames_before_authentication_never_reach_the_center(server, sequence):
    before = server.center()
    _send_and_drain(server, sequence)
    after = server.center()
    assert_unchanged(before, after)


@given(st.lists(frames, min_size=1, max_size=4))
@fuzz(300)
def test_hostile_frames_from_an_authenticated_peer_close_its_connection_only(server, sequence):
    before = server.center()
    _send_and_drain(server, sequence, authenticate=True)
    after = server.center()
    assert_unchanged(before, after)


def _handshake(sock: socket.socket, algorithm: dict) -> dict:
    """Authenticate and say a well-formed hello, as a worker does; returns the WELCOME."""
    auth.answer(sock, KEY.encode())
    hello = {"rank": 7, "layout": LAYOUT.to_json(), "algorithm": algorithm}
    wire.send(sock, wire.Kind.HELLO, payload=wire.json_payload(hello))
    welcome = wire.recv(sock)
    assert welcome.kind is wire.Kind.WELCOME, welcome
    return welcome.json()


def _replies(sock: socket.socket) -> list[wire.Header]:
    """Every frame the server sends until it closes the connection (tensor payloads read and dropped)."""
    headers = []
    try:
        while True:
            header = wire.read_header(sock, max_payload=LAYOUT.nbytes + wire.MAX_CONTROL_PAYLOAD)
            wire.recv_exact(sock, header.length)
            headers.append(header)
    except (EOFError, OSError):
        return headers


#: What a worker may send once it has said hello, each with the reply it gets when the request is valid.
ANSWERS = {
    wire.Kind.COMMIT: wire.Kind.CENTER,
    wire.Kind.INIT: wire.Kind.CENTER,
    wire.Kind.PULL: wire.Kind.CENTER,
    wire.Kind.GET_STATE: wire.Kind.STATE,
    wire.Kind.PUT_STATE: wire.Kind.STATE,
    wire.Kind.STATS: wire.Kind.REPORT,
    wire.Kind.TAKE: wire.Kind.GIVEN,
}
PLAN = {"start": 0, "stop": 100, "chunk": 8, "workers": 2, "batch": 4}


def _request(kind: wire.Kind, clock: int, transport: str, values: list[float] | None = None) -> bytes:
    """A valid request of ``kind`` (a COMMIT of ``values`` started at ``clock``; over shared memory its payload
    is whatever the mailbox holds: the center last handed out)."""
    vector = torch.tensor(values if values is not None else [0.5] * LAYOUT.numel, dtype=torch.float32)
    tensor = b"" if transport == "shm" else bytes(wire.byte_view(vector))
    if kind is wire.Kind.COMMIT:
        return wire.encode(kind, clock, 1, tensor, dtype=1)
    if kind is wire.Kind.INIT:
        return wire.encode(kind, clock, 0, tensor, dtype=1)
    if kind is wire.Kind.PUT_STATE:
        return wire.encode(kind, 0, 0, tensor[: 4 * LAYOUT.trainable], dtype=1)
    if kind is wire.Kind.TAKE:
        return wire.encode(kind, payload=wire.json_payload({"run": "fuzz", "epoch": 0, "worker": 1, "plan": PLAN}))
    return wire.encode(kind)


def test_every_request_kind_is_answered_after_a_real_handshake_and_the_rest_are_refused(fuzzed_server):
    server = fuzzed_server
    for kind in wire.Kind:
        _, clock = server.center()
        sock = server.raw_socket()
        try:
            _handshake(sock, server.algorithm)
            sock.sendall(_request(kind, clock, server.transport))
            sock.shutdown(socket.SHUT_WR)
            replies = _replies(sock)
        finally:
            sock.close()
        expected = ANSWERS.get(kind, wire.Kind.ERROR)
        assert [r.kind for r in replies] == [expected], kind
        if kind is wire.Kind.COMMIT:
            assert (replies[0].clock, replies[0].staleness) == (clock + 1, 0)
        if kind is wire.Kind.PUT_STATE:
            assert replies[0].taken == 0  # the center is initialized: a checkpoint's state comes too late


@pytest.fixture(scope="module", params=["shm", "tcp"])
def fuzzed_server(request):
    """A server of its own for requests whose valid commits move the center, running ADAG with an outer
    optimizer: it keeps a server-side state vector that GET_STATE and PUT_STATE reach."""
    with initialized_server(request.param, {"name": "adag", "outer_momentum": 0.5, "outer_lr": 1.0}) as server:
        yield server


int64s = st.integers(-(2**63), 2**63 - 1)
requests = st.one_of(
    st.builds(  # valid requests of every kind a worker may send, and the server-only kinds
        lambda kind, values: (kind, values),
        st.sampled_from(list(wire.Kind)),
        st.one_of(st.none(), st.lists(st.floats(width=32), min_size=10, max_size=10)),  # NaN and infinities too
    ),
    st.builds(  # any kind with any fields, dtype and payload, maybe truncated
        lambda *fields: (None, _frame(*fields)),
        st.sampled_from(list(wire.Kind)),
        st.one_of(st.integers(-2, 40), int64s),
        st.one_of(st.integers(-2, 5), int64s),
        st.one_of(st.binary(max_size=64), st.just(wire.json_payload({"run": "r", "epoch": 0, "worker": 1}))),
        st.integers(0, 6),
        st.integers(0, 40),
    ),
)


@given(st.lists(requests, min_size=1, max_size=5))
@fuzz(150)
def test_an_authenticated_worker_moves_the_clock_only_by_the_commits_it_is_answered(fuzzed_server, sequence):
    server = fuzzed_server
    before = server.center()
    frames = []
    for kind, rest in sequence:
        if kind is None:
            frames.append((None, rest))
        else:
            frames.append((kind, _request(kind, before[1], server.transport, rest)))
    sock = server.raw_socket()
    try:
        _handshake(sock, server.algorithm)
        try:
            for _, data in frames:
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the server closed the connection after an ERROR
            pass
        replies = _replies(sock)
    finally:
        sock.close()
    # one reply per request, in order, until an ERROR ends the connection
    assert all(r.kind is not wire.Kind.ERROR for r in replies[:-1])
    accepted = sum(
        1
        for (kind, data), reply in zip(frames, replies)
        if data[5:6] == bytes([wire.Kind.COMMIT]) and reply.kind is wire.Kind.CENTER
    )
    after = server.center()
    assert after[1] == before[1] + accepted
    if not accepted:
        assert_unchanged(before, after)
    assert torch.isfinite(after[0]).all()


def test_a_wrong_mac_gets_no_center_whatever_follows(server):
    sock = server.raw_socket()
    try:
        challenge = wire.recv(sock)
        assert challenge.kind is wire.Kind.CHALLENGE
        forged = bytes(auth.DIGEST_BYTES) + os.urandom(auth.NONCE_BYTES)
        sock.sendall(wire.encode(wire.Kind.AUTH, payload=forged))
        hello = {"rank": 7, "layout": LAYOUT.to_json(), "algorithm": ADAG}
        try:  # without waiting for a verdict, as a peer that ignores it would
            sock.sendall(wire.encode(wire.Kind.HELLO, payload=wire.json_payload(hello)) + wire.encode(wire.Kind.PULL))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        replies = _replies(sock)
    finally:
        sock.close()
    assert [r.kind for r in replies] == [wire.Kind.ERROR]


def test_a_stalled_client_does_not_block_other_commits(server):
    stalled = server.raw_socket()
    auth.answer(stalled, KEY.encode())
    if server.transport == "tcp":  # a commit whose payload never finishes arriving
        hello = {"rank": 8, "layout": LAYOUT.to_json(), "algorithm": ADAG}
        wire.send(stalled, wire.Kind.HELLO, payload=wire.json_payload(hello))
        wire.recv(stalled)
        header = wire.HEADER.pack(wire.MAGIC, wire.VERSION, int(wire.Kind.COMMIT), 1, 0, 0, 1, LAYOUT.nbytes)
        stalled.sendall(header + b"\0" * 7)
    try:
        client = server.connect(rank=3)
        client.mailbox.zero_()  # commits of nothing: only their pace matters here
        _, clock = server.center()
        started = time.monotonic()
        for _ in range(20):
            clock = client.commit(clock, 1).clock
        assert time.monotonic() - started < 5
        client.close()
    finally:
        stalled.close()


def test_a_diverged_worker_is_refused_and_the_center_stays_finite(server):
    before = server.center()
    client = server.connect(rank=4)
    client.mailbox.fill_(0.25)
    client.mailbox[3] = float("nan")
    with pytest.raises(wire.ServerRefusedError, match="worker 4's commit holds 1 NaN.*diverged"):
        client.commit(before[1], 1)
    client.close()
    assert_unchanged(before, server.center())


def test_a_client_killed_mid_commit_changes_nothing(server):
    # A child process connects, sends most of a COMMIT (header and, over TCP, half the vector), and is killed.
    code = f"""
import os, signal, sys, torch
sys.path.insert(0, {os.path.dirname(__file__)!r})
from test_server import LAYOUT, ADAG, KEY
from lightning_adag import wire
from lightning_adag.transports import connect
client = connect({server.transport!r}, {server.address!r}, 7, LAYOUT, ADAG, KEY.encode(), timeout=10)
client.mailbox.fill_(1000.0)
frame = wire.HEADER.pack(wire.MAGIC, wire.VERSION, int(wire.Kind.COMMIT), 1, 0, 0, 1, LAYOUT.nbytes)
partial = frame[:20] if {server.transport!r} == "shm" else frame + bytes(wire.byte_view(client.mailbox))[:20]
client._sock.sendall(partial)
os.kill(os.getpid(), signal.SIGKILL)
"""
    before = server.center()
    subprocess.run([sys.executable, "-c", code], timeout=60)
    time.sleep(0.2)
    after = server.center()
    assert_unchanged(before, after)


def test_the_server_stops_and_cleans_up_when_its_owner_is_killed():
    before = adag_leftovers()
    owner_code = """
import time, torch
from lightning_adag.server.launch import ServerProcess
from lightning_adag.transports import connect
from lightning_adag.flat import Layout
from lightning_adag.payload import CommitPayload
server = ServerProcess.start("k")
address = server.wait_ready()
client = connect("shm", address, 0, Layout(10, 8, torch.float32, "x"), {"name": "adag"}, b"k", timeout=10)
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
        assert not adag_leftovers() - before
    finally:
        owner.kill()


def test_a_flood_of_silent_peers_does_not_stop_the_server(server):
    peers = []
    try:
        for _ in range(300):  # more than the 256 peers allowed to join at once: the rest are turned away at once
            peers.append(server.raw_socket())
    finally:
        for peer in peers:
            peer.close()
    time.sleep(0.5)
    assert server.center()[1] >= 0  # still serving


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_shared_memory_gives_a_clear_error_not_a_crash(tiny_tmpfs):
    from lightning_adag.transports.shm import SharedMemoryFullError, create_segment

    with pytest.raises(SharedMemoryFullError, match="--shm-size"):
        create_segment(tiny_tmpfs / "mailbox", 4 * 2**20, torch.float32)
    assert not list(tiny_tmpfs.iterdir())


def test_the_shared_memory_servers_unix_socket_admits_only_its_user(server):
    if server.transport != "shm":
        pytest.skip("a TCP server has no socket file")
    assert os.stat(server.address).st_mode & 0o077 == 0  # no permission for group or others


def test_a_peer_has_ten_seconds_in_all_to_authenticate_however_it_trickles(server):
    if server.transport == "shm":
        pytest.skip("the deadline is the service's, whatever the transport: once is enough")
    sock = server.raw_socket()
    try:
        assert wire.recv(sock).kind is wire.Kind.CHALLENGE
        started = time.monotonic()
        answer = wire.encode(wire.Kind.AUTH, payload=bytes(auth.DIGEST_BYTES + auth.NONCE_BYTES))
        with pytest.raises(OSError):  # each byte in time for any per-read timeout, the whole never
            for byte in answer:
                sock.sendall(bytes([byte]))
                time.sleep(0.5)
                assert time.monotonic() - started < 15, "the server still waits for the handshake"
        elapsed = time.monotonic() - started
    finally:
        sock.close()
    assert 9.5 < elapsed < 15, elapsed


def test_a_standalone_server_snapshots_its_center_every_few_seconds_while_it_runs(tmp_path):
    snapshot = tmp_path / "center.pt"
    options = ("--checkpoint", str(snapshot), "--checkpoint-every", "0.5")
    with running_server("tcp", KEY, options) as process:
        server = Server("tcp", process)
        client = server.connect()
        try:
            client.mailbox.copy_(torch.arange(10, dtype=torch.float32))
            client.initialize(0)
            for clock in (1, 2):
                client.mailbox.fill_(0.5)
                client.commit(clock - 1, 1)
                expected = client.mailbox.clone()
                saved = _wait_for_snapshot(snapshot, clock)
                assert torch.equal(saved["center"], expected)
            written = snapshot.stat().st_mtime_ns
            time.sleep(1.5)  # three periods without a commit: nothing new to write
            assert snapshot.stat().st_mtime_ns == written
        finally:
            client.close()


def _wait_for_snapshot(path, clock: int, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            saved = torch.load(path, weights_only=True)
            if saved["clock"] == clock:
                return saved
        time.sleep(0.1)
    pytest.fail(f"no snapshot at clock {clock} within {timeout} s")


@pytest.mark.parametrize(
    ("kind", "length"),
    [
        *[(kind, LAYOUT.nbytes) for kind in (wire.Kind.PULL, wire.Kind.STATS, wire.Kind.GET_STATE)],
        (wire.Kind.TAKE, wire.MAX_CONTROL_PAYLOAD + 1),
    ],
    ids=["PULL", "STATS", "GET_STATE", "TAKE"],
)
def test_a_control_frame_announcing_a_payload_is_refused_before_it_arrives(server, kind, length):
    # the payload never comes: a server that waited for (and allocated) it would not answer
    sock = _authenticated_peer(server)
    try:
        sock.sendall(wire.HEADER.pack(wire.MAGIC, wire.VERSION, int(kind), 0, 0, 0, 0, length))
        reply = wire.recv(sock)
        assert reply.kind is wire.Kind.ERROR and re.search("payload|exceeds", reply.payload.decode())
    finally:
        sock.close()
    assert server.center()[1] >= 0


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_a_commit_that_overflows_the_center_is_refused_and_the_center_stays_finite(transport):
    with running_server(transport, KEY) as process:
        server = Server(transport, process)
        first = server.connect()
        first.mailbox.fill_(1e38)
        first.initialize(0)
        before = server.center()
        first.mailbox.fill_(3e38)  # finite, but 1e38 + 3e38 is not
        with pytest.raises(wire.ServerRefusedError, match="worker 0's commit would make the center overflow float32"):
            first.commit(before[1], 1)
        first.close()
        assert_unchanged(before, server.center())


GAMMA = {"name": "adag", "gamma": 1e-4}


def test_two_runs_sharing_a_server_keep_their_pulled_centers_apart():
    with running_server("tcp", KEY) as process:

        def worker_zero():  # each run has a worker 0
            return connect("tcp", process.address, 0, LAYOUT, GAMMA, KEY.encode(), timeout=30)

        first, second = worker_zero(), worker_zero()
        try:
            first.initialize(0)
            start = first.pull().clock
            second.mailbox.zero_()
            clock = second.commit(second.pull().clock, 1).clock
            second.commit(clock, 1)  # consumes the centers this connection pulled, never the other's
            first.mailbox.zero_()
            assert first.commit(start, 1).staleness == 2
        finally:
            first.close()
            second.close()


def test_the_centers_a_worker_pulled_are_freed_when_it_leaves(monkeypatch):
    big = Layout(numel=2**21, trainable=2**21, dtype=torch.float32, digest="big")  # 8 MiB
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(2**17))  # the server's freed buffers go back to the system
    with running_server("tcp", KEY) as process:
        server = psutil.Process(process.pid)

        def visit(rank):
            client = connect("tcp", process.address, rank, big, GAMMA, KEY.encode(), timeout=30)
            client.initialize(0)  # the center it pulled back stays on the server while it is connected
            client.close()

        visit(0)
        time.sleep(0.2)
        before = server.memory_info().rss
        for rank in range(1, 17):
            visit(rank)
        time.sleep(0.2)
        grown = server.memory_info().rss - before
        assert grown < 32 * 2**20  # 16 kept centers would be 128 MiB


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_a_worker_that_never_initializes_does_not_pin_an_empty_servers_model(transport):
    other = Layout(numel=12, trainable=12, dtype=torch.float32, digest="other")
    with running_server(transport, KEY) as process:
        server = Server(transport, process)
        idle = server.connect(rank=0, layout=other)  # says hello with its model, then never initializes
        try:
            first = server.connect(rank=0)
            first.mailbox.fill_(1.0)
            assert first.initialize(0).clock == 0  # the first to initialize fixes the model: LAYOUT
            first.mailbox.fill_(0.5)
            assert first.commit(0, 1).clock == 1
            first.close()
            with pytest.raises(wire.ServerRefusedError, match="model layout mismatch"):
                idle.initialize(0)
            with pytest.raises(wire.ServerRefusedError, match="model layout mismatch"):
                server.connect(rank=1, layout=other)
        finally:
            idle.close()
