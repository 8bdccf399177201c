"""A node's aggregator: its workers' commits reach the server as exact sums, whatever their interleaving."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import running_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_adag import ADAG, AEASGD, DOWNPOUR, ADAGStrategy, DynSGD, ServerRefusedError
from lightning_adag.flat import Layout
from lightning_adag.payload import CommitPayload
from lightning_adag.server.aggregator import AggregatorCore, UpstreamError
from lightning_adag.server.launch import ServerProcess
from lightning_adag.transports import connect

KEY = "aggregator-test"
LAYOUT = Layout(numel=8, trainable=6, dtype=torch.float32, digest="aggregator-test")
SPEC = {"name": "adag"}


@pytest.mark.parametrize(
    ("algorithm", "says"),
    [
        (AEASGD(), "elastic term"),
        (DynSGD(), "its own staleness"),
        (ADAG(gamma=1e-4), "gamma=None"),
        (DOWNPOUR(outer_momentum=0.9), "outer_momentum=0"),
        (ADAG(outer_momentum=0.5, outer_lr=0.7), "outer_momentum=0"),
    ],
)
def test_rules_whose_commits_cannot_be_summed_are_refused_at_construction(algorithm, says):
    with pytest.raises(ValueError, match="aggregate='node' cannot run") as refused:
        ADAGStrategy(algorithm=algorithm, aggregate="node")
    assert says in str(refused.value)


def test_summable_rules_and_bad_arguments():
    for algorithm in ("adag", "downpour", ADAG(outer_lr=0.5)):  # a constant outer step scales a sum as its parts
        ADAGStrategy(algorithm=algorithm, aggregate="node")
    with pytest.raises(ValueError, match="aggregate must be None or 'node'"):
        ADAGStrategy(aggregate="rack")
    with pytest.raises(ValueError, match="use transport='auto'"):
        ADAGStrategy(aggregate="node", transport="shm")


@pytest.fixture(scope="module")
def upstream():
    """One real server for the in-process aggregators below; each test measures what it adds to the center."""
    with running_server("tcp", KEY) as server:
        link = connect("tcp", server.wait_ready(), 99, LAYOUT, SPEC, KEY.encode(), 30)
        link.initialize(0)  # a zero center: integer-valued deltas then sum exactly in float32
        yield server.address, link
        link.close()


def center(link) -> torch.Tensor:
    link.pull()
    return link.mailbox.clone()


# Per worker, its requests in order: an integer-valued delta to commit, or None to pull.
requests = st.lists(st.one_of(st.none(), st.lists(st.integers(-8, 8), min_size=6, max_size=6)), max_size=5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(requests, min_size=1, max_size=4), st.sampled_from([0.0, 0.002, 0.02]))
def test_the_server_receives_exactly_the_sum_of_every_workers_deltas(upstream, plans, gather):
    address, link = upstream
    before = center(link)
    core = AggregatorCore(address, KEY.encode(), rank=0, workers=len(plans), gather=gather, timeout=30)
    try:
        core.configure(LAYOUT, SPEC)
        receipts: dict[int, list] = {rank: [] for rank in range(len(plans))}
        start = threading.Barrier(len(plans))

        def work(rank: int) -> None:
            out, pulled = torch.empty(LAYOUT.numel), core.read(torch.empty(LAYOUT.numel)).clock
            start.wait()
            for request in plans[rank]:
                if request is None:
                    receipt = core.read(out)
                else:
                    payload = torch.tensor([*request, rank, rank], dtype=torch.float32)  # delta, then the values
                    receipt = core.commit(rank, payload, pulled, out=out)
                    assert receipt.staleness >= 0
                    receipts[rank].append(receipt)
                pulled = receipt.clock

        threads = [threading.Thread(target=work, args=(rank,)) for rank in range(len(plans))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in threads)
        committed = [request for plan in plans for request in plan if request is not None]
        after = center(link)
        expected = before[:6] + torch.tensor(committed, dtype=torch.float32).reshape(-1, 6).sum(0)
        assert torch.equal(after[:6], expected)
        committers = [[rank, rank] for rank, plan in enumerate(plans) if any(r is not None for r in plan)]
        assert after[6:].tolist() in committers + [before[6:].tolist()]  # the buffers of some worker's last commit
        stats = core.stats()["node"]
        assert stats["commits"] == len(committed) and stats["rounds"] <= len(committed)
        for got in receipts.values():  # each worker's commits land in the order it sent them
            assert [r.clock for r in got] == sorted({r.clock for r in got})
    finally:
        core.close()


def test_a_diverged_commit_is_refused_without_spoiling_the_round(upstream):
    address, link = upstream
    before = center(link)
    core = AggregatorCore(address, KEY.encode(), rank=0, workers=2, gather=0.05, timeout=30)
    try:
        core.configure(LAYOUT, SPEC)
        clock = core.read(torch.empty(LAYOUT.numel)).clock
        bad = torch.ones(LAYOUT.numel)
        bad[2] = float("nan")
        with pytest.raises(ValueError, match="1 NaN or infinite value"):
            core.commit(0, bad, clock)
        core.commit(1, torch.ones(LAYOUT.numel), clock)
        assert torch.equal(center(link)[:6], before[:6] + 1)
    finally:
        core.close()


def test_an_aggregator_process_between_shared_memory_workers_and_the_server():
    """Real processes: three workers on one node's aggregator, each round carrying all three commits, next to a
    worker that commits to the server directly; then the server goes away."""
    server = ServerProcess.start(KEY, "tcp", log_level="ERROR")
    aggregator = None
    try:
        address = server.wait_ready()
        direct = connect("tcp", address, 9, LAYOUT, SPEC, KEY.encode(), 30)
        direct.initialize(0)
        options = ("--upstream", address, "--node-rank", "7", "--node-workers", "3", "--gather-ms", "5000")
        aggregator = ServerProcess.start(KEY, "shm", log_level="ERROR", options=options)
        with pytest.raises(ServerRefusedError, match="node-local aggregation cannot run"):
            connect("shm", aggregator.wait_ready(), 3, LAYOUT, {"name": "dynsgd"}, KEY.encode(), 30)
        local = [connect("shm", aggregator.address, rank, LAYOUT, SPEC, KEY.encode(), 30) for rank in range(3)]
        rounds, payload = 4, CommitPayload(LAYOUT, torch.bfloat16)  # compressed deltas sum in float32

        def work(client, delta: float) -> None:
            pulled = client.pull().clock
            for _ in range(rounds):
                client.mailbox.zero_()
                delta_view, values = payload.views(client.mailbox.view(torch.uint8))
                delta_view.fill_(delta)
                values.fill_(delta)
                pulled = client.commit(pulled, 1, payload).clock

        threads = [threading.Thread(target=work, args=(client, 2.0**rank)) for rank, client in enumerate(local)]
        threads.append(threading.Thread(target=work, args=(direct, 8.0)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert torch.equal(center(direct)[:6], torch.full((6,), rounds * 15.0))
        stats = local[0].stats()
        assert stats["node"]["rounds"] == rounds and stats["node"]["commits"] == 3 * rounds  # one per round of 3
        assert set(stats["workers"]) == {"7", "9"}  # the server saw the node and the direct worker, never the rest
        assert set(stats["node"]["workers"]) == {"0", "1", "2"}

        direct.close()
        server.stop()
        failures = []

        def pull(client) -> None:
            try:
                client.pull()
            except ServerRefusedError as err:
                failures.append(str(err))

        threads = [threading.Thread(target=pull, args=(client,)) for client in local]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(failures) == 3 and all("lost its server" in failure for failure in failures)
        for client in local:
            client.close()
    finally:
        if aggregator is not None:
            aggregator.stop()
        server.stop()


def test_an_aggregator_refuses_requests_it_cannot_forward():
    core = AggregatorCore("127.0.0.1:1", KEY.encode(), rank=0, workers=1, timeout=0.5)
    with pytest.raises(RuntimeError, match="no worker has said hello"):
        core.read(torch.empty(LAYOUT.numel))
    with pytest.raises(UpstreamError, match="cannot join the server at 127.0.0.1:1"):
        core.configure(LAYOUT, SPEC)
