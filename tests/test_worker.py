"""The worker half of ADAG against a real server process."""

from __future__ import annotations

import copy
import functools
import threading
import time

import pytest
import torch
from conftest import raw_socket, running_server
from torch import nn

from lightning_adag.algorithms import ADAG, AEASGD, DOWNPOUR
from lightning_adag.checkpoint import CenterRecord
from lightning_adag.flat import FlatState
from lightning_adag.server.launch import ServerProcess
from lightning_adag.strategy import _restored_center
from lightning_adag.transports import connect
from lightning_adag.transports.shm import ShmListener
from lightning_adag.wire import ServerGoneError, ServerRefusedError
from lightning_adag.worker import Worker


@pytest.fixture(scope="module")
def server():
    with running_server() as server:
        yield server


def make_model(batchnorm=False):
    torch.manual_seed(0)
    if batchnorm:  # no bias before it: its gradient is rounding noise, which Adam would amplify into steps
        return nn.Sequential(nn.Linear(5, 16, bias=False), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))


def batches(n):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(n)]


def step(model, optimizer, batch):
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
    optimizer.step()


def connect_to(server, flat, algorithm, rank=0):
    return connect("shm", server.address, rank, flat.layout, algorithm.spec(), b"k", timeout=30)


def join(server, model, window, rank=0, algorithm=None, wrap=lambda client: client, **options):
    flat = FlatState(model)
    algorithm = algorithm or ADAG(window)
    worker = Worker(flat, wrap(connect_to(server, flat, algorithm, rank)), algorithm, **options)
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


@pytest.mark.parametrize("overlap", [False, True], ids=["blocking", "overlapped"])
def test_downpour_with_one_worker_is_plain_local_training_step_for_step(overlap):
    """Overlapped, the worker folds each center in one window late (θ += C − θ⁰, and the same for running
    statistics): with one worker C is exactly where the worker stood at its commit, so it still trains exactly as
    if alone, buffers included."""
    with running_server() as server:
        _check_downpour_is_local_training(server, overlap, batchnorm=True)


def _check_downpour_is_local_training(server, overlap=False, batchnorm=False):
    remote = make_model(batchnorm)
    worker = join(server, remote, window=None, algorithm=DOWNPOUR(window=3), overlap=overlap)
    start_clock = worker.pulled_clock
    local = copy.deepcopy(remote)
    local_opt = torch.optim.Adam(local.parameters(), lr=1e-2)
    remote_opt = torch.optim.Adam(remote.parameters(), lr=1e-2)
    for index, batch in enumerate(batches(30), start=1):
        step(local, local_opt, batch)
        step(remote, remote_opt, batch)
        if index % 3 == 0:
            worker.commit(3)  # the center becomes θ⁰ + (θ − θ⁰) = θ, and the worker restarts from it
        for a, b in zip(local.state_dict().values(), remote.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    worker.settle()
    assert worker.pulled_clock == start_clock + 10  # one commit per window
    worker.show_center()
    torch.testing.assert_close(worker.flat.vector, FlatState(local).vector, rtol=1e-5, atol=1e-6)
    worker.close()


def test_staleness_scaling_is_a_no_op_for_a_lone_worker_even_when_it_peeks_at_the_center():
    # one worker: the center it commits onto is the center it pulled, so every factor is 1 and ADAG(gamma) is ADAG
    with running_server() as server:
        model = make_model()
        worker = join(server, model, window=None, algorithm=ADAG(window=2, gamma=1e-4))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for index, batch in enumerate(batches(8), start=1):
            step(model, optimizer, batch)
            if index % 2 == 0:
                theta0, theta = worker.theta0.clone(), worker.theta.clone()
                worker.show_center()  # a pull that does not start a window: the server must keep the window's
                worker.commit(2)
                torch.testing.assert_close(worker.theta, theta0 + (theta - theta0) / 2)
        worker.close()


def test_server_state_travels_to_a_new_server_with_the_initial_center():
    """What a checkpoint does: read the outer momentum from one server, restore it into a fresh one."""
    algorithm = ADAG(window=2, outer_momentum=0.9)
    states = []
    for _ in range(2):
        with running_server() as server:
            model = make_model()
            flat = FlatState(model)
            worker = Worker(flat, connect_to(server, flat, algorithm), algorithm)
            worker.offer_initial_center(5, states[0][1] if states else None)
            worker.reset_to_center()
            if not states:
                optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
                for batch in batches(4):
                    step(model, optimizer, batch)
                    worker.commit(1)
            states.append(worker.server_state())
            worker.close()
    (clock, saved), (restored_clock, restored) = states
    assert clock == 9 and restored_clock == 5
    assert saved["outer_momentum"].abs().sum() > 0
    assert torch.equal(restored["outer_momentum"], saved["outer_momentum"])


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


def test_compressed_commits_lose_nothing_with_error_feedback(server):
    """bf16 on the wire, float32 in the center: the center plus the worker's residual is always the start plus the
    exact sum of the deltas (up to float32 rounding), and a commit takes half the bytes."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    worker = join(server, model, window=2, compression=torch.bfloat16)
    plain = join(server, make_model(), window=2, rank=1)
    assert plain.payload.nbytes == worker.flat.layout.nbytes
    assert worker.payload.nbytes - plain.payload.nbytes / 2 in (0, 2)  # half, and alignment padding
    plain.close()
    start, exact = worker.theta.double(), torch.zeros_like(worker.theta, dtype=torch.float64)
    for index, batch in enumerate(batches(16), start=1):
        step(model, optimizer, batch)
        if index % 2 == 0:
            exact += (worker.theta.double() - worker.theta0.double()) / 2
            owed = (worker.theta - worker.theta0) * 0.5 + worker.residual  # float32, as the kernel computes it
            worker.commit(2)
            # the residual is exactly what rounding this commit to bf16 dropped, and it did drop something
            assert torch.equal(worker.residual, owed - owed.bfloat16().float()) and worker.residual.any()
    # θ⁰ is the center after the last commit
    torch.testing.assert_close(worker.theta0.double() + worker.residual.double(), start + exact, rtol=0, atol=1e-6)
    worker.close()


@pytest.mark.parametrize("wire", [torch.bfloat16, torch.float16])
def test_a_diverged_worker_is_refused_on_a_16_bit_wire_too(server, wire):
    """A 16-bit wire clamps what exceeds its range; an infinity must still arrive as one, or the server would add
    the wire's largest value to the center instead of refusing the commit."""
    observer = join(server, make_model(), window=2, rank=1)
    center = observer.theta.clone()
    worker = join(server, make_model(), window=2, compression=wire)
    worker.theta[0] = float("inf")
    with pytest.raises(ServerRefusedError, match="1 NaN or infinite value"):
        worker.commit(2)
    worker.close()
    observer.reset_to_center()
    assert torch.equal(observer.theta, center)
    observer.close()


def test_only_an_algorithm_that_commits_a_window_delta_keeps_a_residual():
    """AEASGD rounds its elastic term before applying it: nothing to feed back, so no model-sized residual."""
    with running_server() as server:
        worker = join(server, make_model(), window=2, algorithm=AEASGD(2), compression=torch.bfloat16)
        assert worker.residual is None
        worker.close()


def test_an_overlapped_commit_trains_on_while_the_server_answers(server):
    class Held:
        """The real client, whose commits wait until the test releases them."""

        def __init__(self, client):
            self.client, self.release = client, threading.Event()

        def __getattr__(self, name):
            return getattr(self.client, name)

        def commit(self, *args):
            assert self.release.wait(30)
            return self.client.commit(*args)

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    worker = join(server, model, window=2, wrap=Held, overlap=True)
    for batch in batches(2):
        step(model, optimizer, batch)
    start, at_commit = worker.theta0.clone(), worker.theta.clone()
    assert worker.commit(2) is None  # returned although the server has not seen the commit
    assert torch.equal(worker.theta0, at_commit)  # the next window starts where this one ended
    step(model, optimizer, batches(3)[2])
    progress = worker.theta - worker.theta0
    assert worker.poll() is None
    worker.client.release.set()
    deadline = time.monotonic() + 30
    while (receipt := worker.poll()) is None:
        assert time.monotonic() < deadline, "the overlapped commit never came back"
        time.sleep(0.01)
    assert receipt.clock == worker.pulled_clock
    center = start + (at_commit - start) / 2  # one worker: the center moved by the window's mean step
    torch.testing.assert_close(worker.theta0, center)
    torch.testing.assert_close(worker.theta - worker.theta0, progress, rtol=0, atol=1e-6)
    worker.close()


def test_a_bfloat16_model_accumulates_into_a_float32_center():
    """precision="bf16-true": commits far below a bf16 weight's resolution still add up in the center."""
    with running_server() as server:
        model = make_model().to(torch.bfloat16)
        worker = join(server, model, window=8)
        assert worker.flat.layout.dtype == torch.float32 and worker.theta.dtype == torch.bfloat16
        start = worker.theta.clone()
        up = torch.nextafter(start, torch.full_like(start, float("inf")))  # one bf16 unit above every weight
        for _ in range(7):  # each window moves every weight by one unit; a commit adds 1/16 of a unit
            worker.theta.copy_(up)
            worker.commit(16)
            assert torch.equal(worker.theta, start)  # what the bf16 worker holds: the center, rounded
        worker.show_center()
        center = worker.client.mailbox[: worker.flat.trainable]
        assert torch.equal(center, start.float() + 7 * (up.float() - start.float()) / 16)  # a bf16 center: start
        exact = worker.exact_center  # what a checkpoint keeps next to the model's rounded weights
        assert torch.equal(exact[: worker.flat.trainable], center)
        saved = CenterRecord(exact_center=exact, exact_layout=worker.flat.layout)
        worker.close()
    for dtype in (torch.bfloat16, torch.float32):  # resuming, as bf16-true or as 32-true: the exact center returns
        with running_server() as server:
            flat = FlatState(make_model().to(dtype))
            worker = Worker(flat, connect_to(server, flat, ADAG(8)), ADAG(8))
            worker.offer_initial_center(7, center=_restored_center(saved, flat.layout))
            assert worker.fetch().clock == 7 and torch.equal(worker.center, center)
            worker.close()


def test_workers_rejoin_a_restarted_server_which_recovers_the_newest_center_they_pulled():
    """kill -9 the server between two workers' commits and start a new one at its address: each worker's next
    commit is lost (counted, not resent), and the new server, which holds nothing, recovers exactly the newest
    center either worker had pulled; then training goes on."""
    where = ShmListener.default_where()
    server = ServerProcess.start("k", where=where)
    model_a, model_b = make_model(), make_model()
    flats = [FlatState(model) for model in (model_a, model_b)]
    algorithm = ADAG(1)
    workers = []
    try:
        server.wait_ready()
        for rank, flat in enumerate(flats):
            reconnect = functools.partial(connect, "shm", where, rank, flat.layout, algorithm.spec(), b"k", 30)
            workers.append(Worker(flat, reconnect(), algorithm, reconnect=reconnect, patience=30))
        workers[0].offer_initial_center(0)
        for worker in workers:
            worker.reset_to_center()
        for worker, model, batch in zip(workers, (model_a, model_b), batches(2)):
            step(model, torch.optim.SGD(model.parameters(), lr=0.1), batch)
            worker.commit(1)
        newest = workers[1].theta0.clone()  # the center at clock 2, which only worker 1 pulled
        assert [worker.pulled_clock for worker in workers] == [1, 2]
        server.process.kill()
        server.stop()
        server = ServerProcess.start("k", where=where)
        server.wait_ready()
        for worker in workers:
            worker.commit(1)  # lost: the server it was sent to is gone
        assert [worker.lost_commits for worker in workers] == [1, 1]
        assert [worker.reconnections for worker in workers] == [1, 1]
        assert workers[1].pulled_clock == 2 and torch.equal(workers[1].theta0, newest)
        assert workers[0].commit(1).clock == 3  # and training goes on
    finally:
        for worker in workers:
            worker.close()
        server.stop()


def test_a_worker_rejoins_a_restarted_server_that_turns_it_away_as_busy_at_first():
    """Every worker rejoins a restarted server at once, so some are told it is busy; that is not a dead server.
    The client here gives up on a busy server after 0.2 s, so it is the worker that keeps trying."""
    where = ShmListener.default_where()
    server = ServerProcess.start("k", where=where)
    flat, algorithm = FlatState(make_model()), ADAG(1)
    reconnect = functools.partial(connect, "shm", where, 0, flat.layout, algorithm.spec(), b"k", 0.2)
    worker = holder = None
    try:
        server.wait_ready()
        worker = Worker(flat, reconnect(), algorithm, reconnect=reconnect, patience=30)
        worker.offer_initial_center(0)
        worker.reset_to_center()
        server.process.kill()
        server.stop()
        server = ServerProcess.start("k", where=where, options=("--max-handshakes", "1"))
        server.wait_ready()
        holder = raw_socket("shm", where)  # joining, and silent: the only place is taken for a second
        worker.commit(1)  # lost, then rejoined once the silent peer gives its place up
        assert worker.lost_commits == 1 and worker.reconnections == 1
        assert worker.commit(1).clock == 1
    finally:
        if holder is not None:
            holder.close()
        if worker is not None:
            worker.close()
        server.stop()


def test_a_worker_whose_server_does_not_come_back_fails_with_a_clear_error():
    with running_server() as server:
        flat = FlatState(make_model())
        reconnect = functools.partial(connect, "shm", server.address, 0, flat.layout, ADAG(1).spec(), b"k", 30)
        worker = Worker(flat, reconnect(), ADAG(1), reconnect=reconnect, patience=1)
        worker.offer_initial_center(0)
        worker.reset_to_center()
        server.process.kill()
        server.process.wait()
        with pytest.raises(ServerGoneError, match="did not come back within server_timeout=1 s"):
            worker.commit(1)
        worker.close()


def test_an_overlapped_worker_loses_only_the_commit_in_flight_and_keeps_the_steps_since():
    where = ShmListener.default_where()
    server = ServerProcess.start("k", where=where)
    model = make_model()
    flat, algorithm = FlatState(model), ADAG(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reconnect = functools.partial(connect, "shm", where, 0, flat.layout, algorithm.spec(), b"k", 30)
    worker = None
    try:
        server.wait_ready()
        worker = Worker(flat, reconnect(), algorithm, overlap=True, reconnect=reconnect, patience=30)
        worker.offer_initial_center(0)
        worker.reset_to_center()
        data = batches(3)
        step(model, optimizer, data[0])
        worker.commit(1)
        assert worker.settle().clock == 1
        server.process.kill()
        server.stop()
        server = ServerProcess.start("k", where=where)
        server.wait_ready()
        step(model, optimizer, data[1])
        worker.commit(1)  # in flight to a dead server
        step(model, optimizer, data[2])
        theta = worker.theta.clone()
        worker.commit(1)  # finds the exchange in flight lost and recovers before it commits this window
        assert worker.lost_commits == 1 and worker.reconnections == 1
        assert torch.equal(worker.theta, theta)  # the step since the lost commit is kept
        assert worker.settle().clock == 2  # the new server started from θ as committed, at clock 1
        # the new center: θ as committed, plus that window's delta (θ − θ as committed, λ = 1)
        assert torch.allclose(worker.theta0, theta, atol=1e-6)
    finally:
        if worker is not None:
            worker.close()
        server.stop()
