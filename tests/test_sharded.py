"""A center cut into parts, each held by a real server process, reached through one ShardedClient per worker."""

from __future__ import annotations

import contextlib
import json
import threading

import pytest
import torch
from conftest import SLOW_RANK_ZERO, running_parts, tagged_processes
from hypothesis import given, settings
from hypothesis import strategies as st
from test_multinode import launch_two_nodes
from torch import nn

from lightning_adag import auth, wire
from lightning_adag.algorithms import ADAG
from lightning_adag.flat import FlatState, Layout
from lightning_adag.payload import CommitPayload
from lightning_adag.server.launch import ServerProcess
from lightning_adag.transports.sharded import ALIGNMENT, ShardedClient, split
from lightning_adag.transports.tcp import TcpClient
from lightning_adag.wire import PartClocks
from lightning_adag.worker import Worker

LAYOUT = Layout(numel=1000, trainable=930, dtype=torch.float32, digest="sharded")
PARTS = 3
SPEC = ADAG(1).spec()
WIRE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@given(
    st.integers(1, 400).flatmap(lambda t: st.tuples(st.just(t), st.integers(t, t + 40))),
    st.integers(1, 6),
    st.sampled_from([torch.float32, torch.float64]),
    st.sampled_from(WIRE_DTYPES + [torch.float64]),
)
@settings(max_examples=300, deadline=None)
def test_parts_tile_the_center_and_their_payloads_tile_the_payload(sizes, count, dtype, wire_dtype):
    trainable, numel = sizes
    layout = Layout(numel, trainable, dtype, "d")
    if trainable < ALIGNMENT * count:
        with pytest.raises(ValueError, match="too few to cut into"):
            split(layout, count)
        return
    parts = split(layout, count)
    assert [p.start for p in parts] == [0] + [p.stop for p in parts[:-1]] and parts[-1].stop == numel
    assert all(p.start % ALIGNMENT == 0 and p.layout.trainable > 0 for p in parts)
    assert (
        sum(p.layout.trainable for p in parts) == trainable
        and parts[-1].layout.numel - parts[-1].layout.trainable == numel - trainable
    )
    if wire_dtype.itemsize > dtype.itemsize:
        return
    # each part's payload is its slice of the whole payload, delta and values in their places
    payload = CommitPayload(layout, wire_dtype)
    whole = torch.randint(0, 256, (payload.nbytes,), dtype=torch.uint8)
    delta, values = payload.views(whole)
    spans = [p.payload_bytes(payload) for p in parts]
    assert spans[0].start == 0 and spans[-1].stop == payload.nbytes
    assert all(a.stop == b.start for a, b in zip(spans, spans[1:]))
    for part, span in zip(parts, spans):
        part_delta, part_values = CommitPayload(part.layout, wire_dtype).views(whole[span])
        assert torch.equal(
            part_delta.view(torch.uint8), delta[part.start : part.start + part.layout.trainable].view(torch.uint8)
        )
        if part is parts[-1]:
            assert torch.equal(part_values.view(torch.uint8), values.view(torch.uint8))


def test_part_clocks_are_their_lowest_clock_and_keep_every_part():
    clock = PartClocks([7, 5, 6])
    assert int(clock) == 5 and clock.parts == (7, 5, 6) and json.dumps(clock) == "5"
    assert clock != PartClocks([5, 5, 6]) and clock == PartClocks([7, 5, 6])
    assert clock == 5 == PartClocks([5, 9])  # another cut, or a plain clock: compared as numbers


@pytest.fixture(scope="module")
def parts():
    with running_parts(PARTS) as addresses:
        first = ShardedClient(addresses, 0, LAYOUT, SPEC, b"k", 30)
        first.mailbox.copy_(torch.arange(LAYOUT.numel, dtype=torch.float32) % 13)
        first.initialize(0)
        first.close()
        yield addresses


def pull(addresses) -> tuple[torch.Tensor, PartClocks]:
    client = ShardedClient(addresses, 99, LAYOUT, SPEC, b"k", 30)
    try:
        clock = client.pull().clock
        return client.mailbox.clone(), clock
    finally:
        client.close()


def write(client: ShardedClient, payload: CommitPayload, delta: torch.Tensor, values: float) -> None:
    sent_delta, sent_values = payload.views(client.mailbox.view(torch.uint8)[: payload.nbytes])
    sent_delta.copy_(delta)
    sent_values.fill_(values)


PATTERN = (torch.arange(LAYOUT.trainable) % 7 + 1).float()  # every element its own multiple: misplaced bytes show


@given(
    st.lists(st.lists(st.integers(-8, 8), min_size=1, max_size=6), min_size=1, max_size=4),
    st.sampled_from(WIRE_DTYPES),
    st.booleans(),
)
@settings(max_examples=25, deadline=None)
def test_concurrent_commits_leave_the_exact_sum_in_every_part(parts, schedule, wire_dtype, parallel):
    """Integer deltas (exact in every dtype here) from concurrent workers, each to all parts at once."""
    before, clock = pull(parts)
    payload = CommitPayload(LAYOUT, wire_dtype)
    clients = [ShardedClient(parts, rank, LAYOUT, SPEC, b"k", 30, parallel=parallel) for rank in range(len(schedule))]
    errors = []

    def work(client, values):
        try:
            pulled = client.pull().clock
            for value in values:
                write(client, payload, value * PATTERN, value)
                receipt = client.commit(pulled, 1, payload)
                assert all(after > before for after, before in zip(receipt.clock.parts, pulled.parts))
                pulled = receipt.clock
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=args) for args in zip(clients, schedule)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for client in clients:
        client.close()
    assert not errors, errors
    after, clock_after = pull(parts)
    commits = sum(len(values) for values in schedule)
    assert clock_after.parts == tuple(c + commits for c in clock.parts)
    assert torch.equal(after[: LAYOUT.trainable], before[: LAYOUT.trainable] + sum(map(sum, schedule)) * PATTERN)
    assert after[LAYOUT.trainable :].unique().item() in {v for values in schedule for v in values}


def test_each_part_of_a_pull_holds_a_whole_number_of_commits(parts):
    """Commits of ones hammer the parts while another worker pulls: in every pull, every element of a part has
    moved by exactly that part's clock (never half a commit), though the parts' clocks may differ."""
    base, base_clock = pull(parts)
    stop = threading.Event()
    payload = CommitPayload(LAYOUT, torch.float32)

    def hammer(rank):
        client = ShardedClient(parts, rank, LAYOUT, SPEC, b"k", 30)
        pulled = client.pull().clock
        while not stop.is_set():
            write(client, payload, torch.ones(LAYOUT.trainable), 0.0)
            pulled = client.commit(pulled, 1, payload).clock
        client.close()

    threads = [threading.Thread(target=hammer, args=(rank,)) for rank in range(3)]
    for thread in threads:
        thread.start()
    reader = ShardedClient(parts, 9, LAYOUT, SPEC, b"k", 30)
    try:
        seen = set()
        for _ in range(60):
            clock = reader.pull().clock
            for part, part_clock, base_part_clock in zip(split(LAYOUT, PARTS), clock.parts, base_clock.parts):
                trainable = slice(part.start, part.start + part.layout.trainable)
                moved = reader.mailbox[trainable] - base[trainable]
                assert torch.equal(moved, torch.full_like(moved, part_clock - base_part_clock)), (part, clock)
            seen.add(clock.parts)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        reader.close()
    assert len(seen) > 1, "the pulls never overlapped a commit"


def test_a_commit_that_reached_one_part_leaves_the_parts_at_different_clocks(parts):
    """What a worker that dies between sending its parts leaves: that part moved, the others did not. Each part
    counts its own clock, and a later commit's staleness is computed part by part (the receipt shows the highest)."""
    _, clock = pull(parts)
    first = split(LAYOUT, PARTS)[0]
    lone = TcpClient(parts[0], 7, first.layout, SPEC, b"k", 30, part=(0, PARTS))
    lone.mailbox.zero_()
    lone.commit(clock.parts[0], 1)
    lone.close()
    _, mixed = pull(parts)
    assert mixed.parts == (clock.parts[0] + 1, *clock.parts[1:])
    assert int(mixed) == min(mixed.parts)
    client = ShardedClient(parts, 8, LAYOUT, SPEC, b"k", 30)
    client.mailbox.zero_()
    receipt = client.commit(clock, 1)  # started from the center before the lone commit: part 0 is one stale
    client.close()
    assert receipt.staleness == 1
    assert receipt.clock.parts == (clock.parts[0] + 2, *(c + 1 for c in clock.parts[1:]))


def test_a_diverged_commit_is_refused_whole_before_any_part_takes_it(parts):
    before, clock = pull(parts)
    client = ShardedClient(parts, 5, LAYOUT, SPEC, b"k", 30)
    client.mailbox.zero_()
    client.mailbox[LAYOUT.numel - 1] = float("nan")  # in the last part only
    with pytest.raises(wire.ServerRefusedError, match="not sent to the part servers.*1 NaN"):
        client.commit(clock, 1)
    client.close()
    after, clock_after = pull(parts)
    assert clock_after == clock and torch.equal(after, before)


def test_a_worker_must_reach_every_part_in_order(parts):
    with pytest.raises(wire.ServerRefusedError, match="holds part 2 of 3.*asks for part 0 of 3.*in the order"):
        ShardedClient(parts[::-1], 1, LAYOUT, SPEC, b"k", 30)
    with pytest.raises(wire.ServerRefusedError, match="holds part 0 of a center cut into 3"):
        TcpClient(parts[0], 1, LAYOUT, SPEC, b"k", 30)
    with pytest.raises(wire.ServerRefusedError, match="holds part 0 of 3.*asks for part 0 of 2"):
        ShardedClient(parts[:2], 1, LAYOUT, SPEC, b"k", 30)
    with pytest.raises(auth.AuthenticationError, match="key is not the server's"):
        ShardedClient(parts, 1, LAYOUT, SPEC, b"wrong", 30)


def test_server_state_is_cut_and_reassembled_with_the_center():
    """An outer optimizer's momentum (one vector over the trainable region) is offered whole and read back whole;
    each part's server keeps its own piece, and its clocks, given per part, start where they were told."""
    spec = ADAG(1, outer_momentum=0.5).spec()
    with running_parts(2) as addresses:
        client = ShardedClient(addresses, 0, LAYOUT, spec, b"k", 30)
        momentum = torch.arange(LAYOUT.trainable, dtype=torch.float32)
        client.mailbox[: LAYOUT.trainable].copy_(momentum)
        assert client.put_state(0)
        client.mailbox.fill_(1.0)
        assert client.initialize(PartClocks([5, 7])).clock.parts == (5, 7)
        assert not client.put_state(0)  # the servers hold a center: state from a checkpoint no longer applies
        client.mailbox.zero_()
        assert client.get_state(0).clock.parts == (5, 7)
        assert torch.equal(client.mailbox[: LAYOUT.trainable], momentum)
        client.close()


def test_workers_window_keeps_the_part_clocks_it_started_from_across_a_shown_center():
    """A worker that shows the center mid-window (validation) still commits against the clocks its window
    started from, part by part: the other worker's commit in between counts as staleness. Over bf16 deltas with
    overlapped exchanges, as a GPU run would use them."""
    with running_parts(2) as addresses:
        workers = []
        for rank in range(2):
            torch.manual_seed(rank)
            model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
            flat = FlatState(model)
            algorithm = ADAG(2)
            client = ShardedClient(addresses, rank, flat.layout, algorithm.spec(), b"k", 30)
            worker = Worker(flat, client, algorithm, compression=torch.bfloat16, overlap=True)
            worker.offer_initial_center(0)
            worker.reset_to_center()
            workers.append((model, worker))
        (model, first), (other_model, second) = workers
        assert torch.equal(first.flat.vector, second.flat.vector)  # both start from the first worker's center
        start = first.pulled_clock
        for parameter in model.parameters():
            parameter.data.add_(0.5)
        second.commit(1)
        second.settle()
        assert second.pulled_clock.parts == tuple(c + 1 for c in start.parts)
        assert first.show_center() == second.pulled_clock
        first.commit(1)
        receipt = first.settle()
        assert receipt.staleness == 1  # against the window's start, not the center shown meanwhile
        assert receipt.clock.parts == tuple(c + 2 for c in start.parts)
        for _, worker in workers:
            worker.close()


@contextlib.contextmanager
def snapshotting_parts(directory, count: int):
    """``count`` part servers that snapshot their part into ``directory`` and restore it at start."""
    servers = []
    try:
        for index in range(count):
            options = ("--part", f"{index}/{count}", "--checkpoint", str(directory / f"part{index}.pt"))
            servers.append(ServerProcess.start("k", "tcp", log_level="ERROR", options=options))
        yield [server.wait_ready() for server in servers]
    finally:
        for server in servers:
            server.stop()


def test_part_servers_snapshot_their_part_and_resume_it(tmp_path):
    with snapshotting_parts(tmp_path, 2) as addresses:
        client = ShardedClient(addresses, 0, LAYOUT, SPEC, b"k", 30)
        client.mailbox.fill_(3.0)
        client.initialize(PartClocks([4, 6]))
        client.mailbox.fill_(1.0)
        saved = client.commit(client.pull().clock, 1)
        center = client.mailbox.clone()
        client.close()
    with snapshotting_parts(tmp_path, 2) as addresses:  # stopped with SIGTERM: each saved its part
        client = ShardedClient(addresses, 1, LAYOUT, SPEC, b"k", 30)
        assert client.pull().clock == saved.clock == PartClocks([5, 7])
        assert torch.equal(client.mailbox, center)
        client.close()
        with pytest.raises(wire.ServerRefusedError, match="holds part 0 of 2.*asks for part 0 of 3"):
            ShardedClient([*addresses, addresses[0]], 1, LAYOUT, SPEC, b"k", 30)


@pytest.mark.slow
def test_a_run_over_two_servers_trains_like_one_and_resumes_over_three(script):
    # the same run and bar as the one-server test_trains_to_accuracy_and_leaves_the_center_everywhere
    run = ("--epochs", "4", "--window", "2", "--batchnorm", "--checkpoint")
    code = script.run("train.py", *run, "--servers", "2")
    assert code == 0, script.output()
    first = script.results()
    assert first[0]["digest"] == first[1]["digest"]
    assert first[0]["validate"]["val_acc"] >= 0.9
    record = torch.load(script.out / "ckpt" / "last.ckpt", weights_only=True)["adag"]
    assert len(record["part_clocks"]) == 2 and record["clock"] == min(record["part_clocks"]) > 20

    for result in script.out.glob("rank*.json"):
        result.unlink()
    resume = ("--resume", str(script.out / "ckpt" / "last.ckpt"))
    code = script.run("train.py", *run[2:], "--epochs", "5", "--servers", "3", *resume)
    assert code == 0, script.output()
    resumed = script.results()
    # the whole center was cut again into three parts, each starting at the checkpoint's lowest part clock
    assert resumed[0]["start_clock"] == resumed[1]["start_clock"] == record["clock"]
    assert "already holds a center" not in script.output()
    assert resumed[0]["digest"] == resumed[1]["digest"]
    assert resumed[0]["validate"]["val_acc"] >= first[0]["validate"]["val_acc"] - 0.05


@pytest.mark.slow
def test_two_nodes_each_serve_one_part_of_the_center(script):
    assert launch_two_nodes(script, "--servers", "2") == [0, 0], script.output()
    results = script.results()
    assert results[0]["parts_served"] == ["0/2"] and results[1]["parts_served"] == ["1/2"]
    assert results[0]["digest"] == results[1]["digest"]
    assert results[0]["validate"]["val_acc"] >= 0.85  # what two single-server nodes reach with these settings


@pytest.mark.slow
def test_a_killed_part_server_stops_every_worker_with_an_error_naming_its_part(script):
    """Unlike one server, a center cut into parts does not survive a part server yet: nobody reconnects or starts
    the part again, and every worker stops at its next exchange (not after server_timeout), naming the part."""
    script.start("train.py", "--epochs", "50", "--no-val", "--servers", "2", *SLOW_RANK_ZERO)
    script.wait_for("committing0")
    script.wait_for("committing1")
    (part,) = [p for p in tagged_processes(script.tag) if "1/2" in p.cmdline()]
    part.kill()
    assert script.wait(script.proc, timeout=60) != 0  # server_timeout is 120 s: nobody waited for a new part
    output = script.output()
    assert "It held part 1 of a center cut into 2; a run over several servers does not survive" in output, output
    assert "starting a new one" not in output and "connecting again" not in output, output
    assert not script.leftovers(), output
