"""The worker half of ADAG against a real server process."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_adag.algorithms import ADAG
from lightning_adag.flat import FlatState
from lightning_adag.server.launch import ServerProcess
from lightning_adag.transports import connect
from lightning_adag.worker import Worker


@pytest.fixture(scope="module")
def server():
    server = ServerProcess.start("k", log_level="ERROR")
    server.wait_ready()
    yield server
    server.stop()


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))


def batches(n):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(n)]


def step(model, optimizer, batch):
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
    optimizer.step()


def join(server, model, window, rank=0):
    flat = FlatState(model)
    algorithm = ADAG(window)
    client = connect("shm", server.address, rank, flat.layout, algorithm.spec(), b"k", timeout=30)
    worker = Worker(flat, client, algorithm)
    worker.offer_initial_center(0)
    worker.reset_to_center()
    return worker


def test_window_one_with_one_worker_is_plain_local_training(server):
    remote = make_model()
    worker = join(server, remote, window=1)
    start_clock = worker.pulled_clock
    local = copy.deepcopy(remote)  # both start from the center
    local_opt = torch.optim.Adam(local.parameters(), lr=1e-2)
    remote_opt = torch.optim.Adam(remote.parameters(), lr=1e-2)
    for batch in batches(30):
        step(local, local_opt, batch)
        step(remote, remote_opt, batch)
        worker.commit(1)
    # C + (θ − C) rounds to θ up to one ulp per step; Adam's state is the same in both
    for a, b in zip(local.parameters(), remote.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert worker.pulled_clock == start_clock + 30
    worker.close()


def test_a_window_commits_its_mean_step_and_keeps_the_optimizer_state(server):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    worker = join(server, model, window=4)
    start = worker.flat.vector.clone()
    for batch in batches(4):
        step(model, optimizer, batch)
    moved = worker.flat.vector.clone()
    momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    worker.commit(4)
    # one worker: the center moved by (θ − θ⁰) / 4, and the worker restarted from it
    torch.testing.assert_close(worker.flat.vector, start + (moved - start) / 4)
    for p, m in zip(model.parameters(), momentum):
        assert torch.equal(optimizer.state[p]["momentum_buffer"], m)


def test_a_partial_window_is_normalized_by_its_own_steps(server):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    worker = join(server, model, window=8)
    start = worker.flat.vector.clone()
    for batch in batches(3):
        step(model, optimizer, batch)
    moved = worker.flat.vector.clone()
    worker.commit(3)
    torch.testing.assert_close(worker.flat.vector, start + (moved - start) / 3)


def test_showing_the_center_keeps_the_window(server):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    worker = join(server, model, window=8)
    center = worker.flat.vector.clone()
    step(model, optimizer, batches(1)[0])
    local = worker.flat.vector.clone()
    clock = worker.show_center()
    assert clock == worker.pulled_clock and torch.equal(worker.flat.vector, center)
    worker.resume_window()
    assert torch.equal(worker.flat.vector, local)


def test_two_workers_start_from_the_first_ones_center(server):
    first, second = make_model(), nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    join(server, first, window=2, rank=0)
    join(server, second, window=2, rank=1)  # its own offer is ignored: the server already holds a center
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)
