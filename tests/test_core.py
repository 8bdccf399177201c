"""ServerCore: the algebra of commits, the clock and staleness accounting, atomicity under concurrency."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_adag.algorithms import Commit, server_rule
from lightning_adag.flat import Layout
from lightning_adag.payload import CommitPayload
from lightning_adag.server.core import SHARD_BYTES, LayoutMismatchError, ServerCore

ADAG = {"name": "adag"}


def make_core(numel=6, trainable=4, initial=None, clock=0, shard_bytes=SHARD_BYTES):
    core = ServerCore(shard_bytes=shard_bytes)
    layout = Layout(numel=numel, trainable=trainable, dtype=torch.float64, digest="d")
    core.configure(layout, ADAG)
    core.initialize(torch.zeros(numel, dtype=torch.float64) if initial is None else initial, clock)
    return core


# A schedule: for each commit, which worker sends it, and whether that worker pulls (resets its clock) first.
schedules = st.lists(st.tuples(st.integers(0, 3), st.booleans()), min_size=1, max_size=40)


@given(schedules, st.integers(0, 1000), st.sampled_from([8, 16, 24, SHARD_BYTES]))
@settings(max_examples=200, deadline=None)
def test_any_interleaving_of_commits_leaves_c0_plus_the_sum_of_deltas(schedule, seed, shard_bytes):
    """Whatever the shards (one float64 element each, two, three straddling the trainable boundary, or one)."""
    gen = torch.Generator().manual_seed(seed)
    c0 = torch.randint(-50, 50, (6,), generator=gen).double()
    core = make_core(initial=c0.clone(), shard_bytes=shard_bytes)
    pulled = {}
    total = torch.zeros(4, dtype=torch.float64)
    for worker, pull_first in schedule:
        if pull_first or worker not in pulled:
            pulled[worker] = core.read(torch.empty(6, dtype=torch.float64)).clock
        # integer-valued deltas: float64 sums are exact, so any order gives the same center
        delta = torch.randint(-20, 20, (6,), generator=gen).double()
        before = core.clock
        receipt = core.commit(worker, delta, pulled[worker])
        assert receipt.clock == before + 1
        assert receipt.staleness == before - pulled[worker]
        total += delta[:4]
    assert core.clock == len(schedule)
    assert torch.equal(core.center[:4], c0[:4] + total)


@given(
    st.integers(1, 40).flatmap(lambda numel: st.tuples(st.just(numel), st.integers(1, numel))),
    st.sampled_from([4, 8, 12, 20, SHARD_BYTES]),
    st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    st.integers(0, 1000),
)
@settings(max_examples=300, deadline=None)
def test_a_commit_answered_in_the_buffer_it_arrived_in_is_applied_whole(sizes, shard_bytes, wire, seed):
    """The server replies with the new center in the very buffer that holds the commit (a worker's mailbox, a TCP
    channel's receive buffer); a 16-bit delta packs into that buffer's front, so handing a shard out must not
    overwrite the part of the payload that later shards still read."""
    numel, trainable = sizes
    gen = torch.Generator().manual_seed(seed)
    core = ServerCore(shard_bytes=shard_bytes)
    layout = Layout(numel=numel, trainable=trainable, dtype=torch.float32, digest="d")
    core.configure(layout, ADAG)
    c0 = torch.randn(numel, generator=gen)
    core.initialize(c0, 0)
    buffer = torch.full((numel,), float("nan"))  # the mailbox: the payload fills its front, a center all of it
    delta, values = CommitPayload(layout, wire).views(buffer.view(torch.uint8))
    delta.copy_(torch.randn(trainable, generator=gen))
    values.copy_(torch.randn(numel - trainable, generator=gen))
    expected = torch.cat([c0[:trainable] + delta.float(), values])

    core.commit(0, delta, 0, out=buffer, values=values)
    assert torch.equal(core.center, expected)
    assert torch.equal(buffer, expected)


@given(st.lists(st.integers(0, 3), min_size=1, max_size=30))
def test_the_state_region_carries_the_last_committed_values(workers):
    core = make_core()
    last = None
    for i, worker in enumerate(workers):
        delta = torch.full((6,), float(i), dtype=torch.float64)
        core.commit(worker, delta, core.clock)
        last = delta
    assert torch.equal(core.center[4:], last[4:])


def test_per_worker_statistics_count_commits_and_staleness():
    core = make_core()
    core.commit(0, torch.zeros(6, dtype=torch.float64), 0)  # staleness 0
    core.commit(1, torch.zeros(6, dtype=torch.float64), 0)  # staleness 1
    core.commit(1, torch.zeros(6, dtype=torch.float64), 0)  # staleness 2
    stats = core.stats()
    assert stats["clock"] == 3
    assert stats["workers"]["0"]["commits"] == 1
    assert stats["workers"]["1"]["commits"] == 2
    assert stats["workers"]["1"]["mean_staleness"] == 1.5
    assert stats["workers"]["1"]["max_staleness"] == 2


@given(st.integers(1, 6), st.integers(1, 5))
def test_workers_taking_turns_see_a_staleness_of_the_others_commits(workers, rounds):
    """n workers committing in turn, each window starting from the center its last commit brought back: every
    commit after the first round is exactly n - 1 commits stale, and the server records what it answered."""
    core = make_core()
    pulled = dict.fromkeys(range(workers), 0)
    answered = {worker: [] for worker in range(workers)}
    for _ in range(rounds):
        for worker in range(workers):
            receipt = core.commit(worker, torch.zeros(6, dtype=torch.float64), pulled[worker])
            pulled[worker] = receipt.clock
            answered[worker].append(receipt.staleness)
    for worker, staleness in answered.items():
        assert staleness == [worker] + [workers - 1] * (rounds - 1)
        record = core.stats()["workers"][str(worker)]
        assert record["commits"] == rounds and record["max_staleness"] == max(staleness)
        assert record["mean_staleness"] == pytest.approx(sum(staleness) / rounds)
    assert core.clock == workers * rounds


def test_initialize_keeps_an_existing_center_and_its_clock():
    core = make_core(initial=torch.ones(6, dtype=torch.float64), clock=7)
    receipt = core.initialize(torch.full((6,), 5.0, dtype=torch.float64), 0)
    assert receipt.clock == 7
    assert torch.equal(core.center, torch.ones(6, dtype=torch.float64))


def test_commit_returns_the_new_center_in_out():
    core = make_core()
    out = torch.empty(6, dtype=torch.float64)
    core.commit(0, torch.arange(6, dtype=torch.float64), 0, out=out)
    assert torch.equal(out, core.center)


def test_a_commit_from_the_future_is_refused_and_changes_nothing():
    core = make_core()
    with pytest.raises(ValueError, match="outside"):
        core.commit(0, torch.ones(6, dtype=torch.float64), 5)
    assert core.clock == 0 and torch.equal(core.center, torch.zeros(6, dtype=torch.float64))


@pytest.mark.parametrize("clock", [-1, 2**62, 2**63 - 1])
def test_an_initial_clock_that_could_not_travel_is_refused(clock):
    """Clocks travel as signed 64 bits: a damaged checkpoint's huge clock would break every later reply."""
    core = ServerCore()
    core.configure(Layout(6, 4, torch.float64, "d"), ADAG)
    with pytest.raises(ValueError, match="clock must be in"):
        core.initialize(torch.zeros(6, dtype=torch.float64), clock)
    assert not core.initialized


def test_commits_before_initialization_are_refused():
    core = ServerCore()
    core.configure(Layout(6, 4, torch.float64, "d"), ADAG)
    with pytest.raises(RuntimeError, match="not initialized"):
        core.commit(0, torch.ones(6, dtype=torch.float64), 0)


@pytest.mark.parametrize(
    "layout, algorithm, match",
    [
        (Layout(7, 4, torch.float64, "d"), ADAG, "layout mismatch"),
        (Layout(6, 4, torch.float64, "other"), ADAG, "layout mismatch"),
        (Layout(6, 4, torch.float32, "d"), ADAG, "layout mismatch"),
        (Layout(6, 4, torch.float64, "d"), {"name": "downpour"}, "algorithm mismatch"),
    ],
)
def test_a_worker_with_another_layout_or_algorithm_is_refused(layout, algorithm, match):
    core = make_core()
    with pytest.raises(LayoutMismatchError, match=match):
        core.configure(layout, algorithm)


@pytest.mark.parametrize("shard_bytes", [SHARD_BYTES, 64 * 1024], ids=["4MiB-shards", "64KiB-shards"])
def test_concurrent_commits_are_atomic_and_pulls_never_see_half_a_commit(shard_bytes):
    """Commits pipeline through the shards, yet every pull and every snapshot sees a whole number of them; a
    snapshot, which takes every shard lock, never deadlocks with commits in flight."""
    numel = 1_000_000
    core = ServerCore(shard_bytes=shard_bytes)
    core.configure(Layout(numel, numel, torch.float32, "d"), ADAG)
    core.initialize(torch.zeros(numel), 0)
    ones = torch.ones(numel)
    torn = []

    def committer(worker):
        for _ in range(25):
            core.commit(worker, ones, core.clock)

    def reader():
        out = torch.empty(numel)
        for _ in range(50):
            receipt = core.read(out)
            if not (out.min() == out.max() == receipt.clock):
                torn.append((float(out.min()), float(out.max()), receipt.clock))

    def snapshotter():
        for _ in range(20):
            snapshot = core.snapshot()
            center, clock = snapshot["center"], snapshot["clock"]
            if not (center.min() == center.max() == clock):
                torn.append((float(center.min()), float(center.max()), clock))

    threads = [threading.Thread(target=committer, args=(w,)) for w in range(4)]
    threads += [threading.Thread(target=reader), threading.Thread(target=snapshotter)]
    for t in threads:
        t.daemon = True  # a deadlock fails the test instead of hanging the session
        t.start()
    deadline = time.monotonic() + 120
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "deadlock: a thread never finished"
    assert not torn
    assert core.clock == 100
    assert torch.equal(core.center, torch.full((numel,), 100.0))


def test_a_commit_the_rule_cannot_apply_is_not_counted():
    """ADAG with gamma needs the center the worker pulled: a commit from a clock it never pulled is refused before
    the clock moves (sharded or not, nothing of it is applied)."""
    core = ServerCore(shard_bytes=8)
    core.configure(Layout(6, 4, torch.float64, "d"), {"name": "adag", "gamma": 1e-4})
    core.initialize(torch.zeros(6, dtype=torch.float64), 3)
    with pytest.raises(ValueError, match="never handed it that center"):
        core.commit(0, torch.ones(6, dtype=torch.float64), 3)
    assert core.clock == 3 and core.stats()["workers"] == {}
    assert torch.equal(core.center, torch.zeros(6, dtype=torch.float64))


@pytest.mark.parametrize(
    ("spec", "elementwise"),
    [
        ({"name": "adag"}, True),
        ({"name": "dynsgd"}, True),
        ({"name": "aeasgd"}, True),
        ({"name": "adag", "gamma": 1e-4}, False),
        ({"name": "downpour", "outer_momentum": 0.9, "outer_lr": 0.7}, False),
    ],
)
def test_only_elementwise_stateless_rules_are_sharded(spec, elementwise):
    core = ServerCore(shard_bytes=8)
    core.configure(Layout(6, 4, torch.float64, "d"), spec)
    assert len(core._spans) == (6 if elementwise else 1)


@pytest.mark.parametrize("name", ["adag", "downpour"])
def test_an_outer_learning_rate_without_momentum_scales_every_shard(name):
    """No momentum, no server state: the rule is sharded, and each shard adds η Δ (nothing sized to one shard)."""
    core = ServerCore(shard_bytes=32)  # shards of 4 and 2 elements, both with trainable ones
    core.configure(Layout(6, 5, torch.float64, "d"), {"name": name, "outer_lr": 0.5})
    core.initialize(torch.zeros(6, dtype=torch.float64), 0)
    assert len(core._spans) == 2
    for _ in range(2):
        core.commit(0, torch.tensor([2.0, 4.0, 6.0, 8.0, 10.0, 1.0], dtype=torch.float64), core.clock)
    assert core.center.tolist() == [2.0, 4.0, 6.0, 8.0, 10.0, 1.0]


@given(
    st.integers(0, 5),
    st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
    st.booleans(),
)
def test_a_commit_holding_nan_or_infinity_is_refused_whole(position, poison, dtype, separate_values):
    """Anywhere in the delta or in the values that travel with it, in any wire dtype: nothing is applied, no clock
    is taken, and the next finite commit goes through."""
    core = make_core(initial=torch.arange(6, dtype=torch.float64), clock=2)
    delta = torch.full((6,), 0.5, dtype=dtype)
    delta[position] = poison
    delta, values = (delta[:4], delta[4:]) if separate_values else (delta, None)
    with pytest.raises(ValueError, match=r"holds 1 NaN or infinite value\(s\).*center is unchanged.*diverged"):
        core.commit(1, delta, 2, values=values)
    assert core.clock == 2 and core.stats()["workers"] == {}
    assert torch.equal(core.center, torch.arange(6, dtype=torch.float64))
    assert core.commit(1, torch.zeros(6, dtype=torch.float64), 2).clock == 3


def test_a_non_finite_initial_center_is_refused_but_a_late_offer_is_ignored():
    core = ServerCore()
    core.configure(Layout(6, 4, torch.float64, "d"), ADAG)
    poisoned = torch.zeros(6, dtype=torch.float64)
    poisoned[5] = float("nan")
    with pytest.raises(ValueError, match="initial center holds 1 NaN.*initialization"):
        core.initialize(poisoned, 0)
    assert not core.initialized
    core.initialize(torch.ones(6, dtype=torch.float64), 0)
    assert core.initialize(poisoned, 0).clock == 0  # a late worker's parameters are not used, whatever they hold
    assert torch.equal(core.center, torch.ones(6, dtype=torch.float64))


def test_a_non_finite_server_state_from_a_checkpoint_is_refused():
    core = ServerCore()
    core.configure(Layout(6, 4, torch.float64, "d"), {"name": "adag", "outer_momentum": 0.9})
    with pytest.raises(ValueError, match="server state 'outer_momentum' holds 1 NaN.*checkpoint"):
        core.load_state(0, torch.tensor([0.0, float("inf"), 0.0, 0.0], dtype=torch.float64))


def test_finite_values_whose_sum_overflows_are_accepted():
    """The check's fast path sums the delta; a float16 delta can sum past 65504 with every value in range."""
    core = make_core()
    delta = torch.full((6,), 60000.0, dtype=torch.float16)
    assert not torch.isfinite(delta.sum())
    assert core.commit(0, delta, 0).clock == 1
    assert torch.equal(core.center, torch.full((6,), 60000.0, dtype=torch.float64))


@settings(max_examples=200, deadline=None)
@given(
    old=st.lists(st.tuples(st.integers(0, 2), st.integers(-8, 8)), max_size=12),
    snapshot_at=st.floats(0, 1),
    events=st.lists(st.one_of(st.tuples(st.just("offer"), st.integers(0, 2)), st.integers(-8, 8)), max_size=10),
)
def test_a_restarted_server_recovers_every_commit_of_the_newest_offered_center_and_keeps_new_ones(
    old, snapshot_at, events
):
    """The law of recovery: after a restart the center holds the first R commits of the old history, R being the
    newest clock among the snapshot and the offers, plus every commit since, whatever order offers and new commits
    arrive in (deltas are small integers in float64, so sums are exact)."""
    trainable = 4
    before = make_core()
    pulled = {worker: (torch.zeros(6, dtype=torch.float64), 0) for worker in range(3)}
    snapshot, snapshot_clock = before.snapshot(), 0
    for index, (worker, value) in enumerate(old):
        out = torch.empty(6, dtype=torch.float64)
        receipt = before.commit(worker, torch.full((6,), float(value), dtype=torch.float64), pulled[worker][1], out=out)
        pulled[worker] = (out, receipt.clock)
        if index < snapshot_at * len(old):
            snapshot, snapshot_clock = before.snapshot(), receipt.clock
    after = ServerCore()
    after.restore(snapshot)
    newest, new_sum = snapshot_clock, 0
    for event in events:
        if isinstance(event, tuple):
            center, clock = pulled[event[1]]
            after.recover(center.clone(), clock)
            newest = max(newest, clock)
        else:
            after.commit(9, torch.full((6,), float(event), dtype=torch.float64), after.clock)
            new_sum += event
    assert after.clock == newest + sum(1 for event in events if not isinstance(event, tuple))
    expected = sum(value for _, value in old[:newest]) + new_sum
    assert torch.equal(after.center[:trainable], torch.full((trainable,), float(expected), dtype=torch.float64))


def test_an_offer_to_a_server_that_never_restarted_changes_nothing():
    core = make_core(initial=torch.ones(6, dtype=torch.float64), clock=5)
    assert core.recover(torch.full((6,), 7.0, dtype=torch.float64), 9).clock == 5
    assert torch.equal(core.center, torch.ones(6, dtype=torch.float64))


# ------------------------------------------------------------------------------------------- overflow
#: Rules whose step the server can bound (plain, an outer learning rate) and one whose momentum it cannot.
OVERFLOW_RULES = [ADAG, {"name": "downpour", "outer_lr": 2.0}, {"name": "adag", "outer_momentum": 0.9}]
huge = st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=4, max_size=4)


def _state(rule) -> dict:
    return {name: vector.clone() for name, vector in rule.server_state().items()}


@given(st.sampled_from(OVERFLOW_RULES), huge, st.lists(huge, min_size=1, max_size=6))
@settings(max_examples=300, deadline=None)
def test_finite_commits_never_make_the_center_infinite_and_a_refused_one_changes_nothing(spec, initial, deltas):
    """Law: a finite commit is applied exactly as the rule says unless that would make the center (or the rule's
    state) infinite; then it is refused as an overflow, and the center, the rule's state and the clock are as
    before, bit for bit."""
    core = ServerCore(shard_bytes=8)  # two float32 elements per shard
    core.configure(Layout(6, 4, torch.float32, "d"), spec)
    core.initialize(torch.tensor([*initial, 0.0, 0.0]), 0)
    for delta in map(torch.tensor, deltas):
        before, state, clock = core.center.clone(), _state(core.algorithm), core.clock
        rule = server_rule(spec)  # the same rule applied to a copy, unchecked
        for name, vector in state.items():
            rule.load_server_state(name, vector)
        expected = before[:4].clone()
        rule.server_apply(expected, delta, Commit(0, clock, clock))
        overflows = not all(bool(torch.isfinite(v).all()) for v in (expected, *rule.server_state().values()))
        try:
            core.commit(0, torch.cat([delta, torch.tensor([1.0, 2.0])]), clock)
        except ValueError as err:
            assert overflows and "overflow float32" in str(err) and "diverged" not in str(err)
            assert torch.equal(core.center, before) and core.clock == clock
            assert _state(core.algorithm).keys() <= state.keys() | {"outer_momentum"}
            assert all(torch.equal(v, state.get(n, torch.zeros_like(v))) for n, v in _state(core.algorithm).items())
            continue
        assert not overflows and core.clock == clock + 1
        assert torch.equal(core.center[:4], expected) and bool(torch.isfinite(core.center).all())


@pytest.mark.parametrize(
    ("spec", "initial", "delta"),
    [
        (ADAG, 1e38, 3e38),
        ({"name": "adag", "outer_lr": 4.0}, 1e38, 1e38),
        ({"name": "adag", "outer_momentum": 0.9}, 1e38, 1e38),
    ],
    ids=["overflowing-delta", "outer-lr", "outer-momentum"],
)
def test_a_commit_that_overflows_the_center_is_refused_as_such(spec, initial, delta):
    core = ServerCore()
    core.configure(Layout(2, 2, torch.float32, "d"), spec)
    core.initialize(torch.full((2,), initial), 0)
    with pytest.raises(ValueError, match="worker 3's commit would make the center overflow float32.*unchanged"):
        for _ in range(3):  # momentum overflows on the second commit
            core.commit(3, torch.full((2,), delta), core.clock)
    assert bool(torch.isfinite(core.center).all())


def test_the_first_worker_to_initialize_fixes_the_layout_not_the_first_to_say_hello():
    idle, active = Layout(3, 3, torch.float64, "idle"), Layout(6, 4, torch.float64, "active")
    spec = {"name": "adag", "outer_momentum": 0.5}
    core = ServerCore()
    assert not core.configure(idle, spec)  # proposes its layout, never initializes
    assert not core.configure(active, spec)  # may still join
    assert core.load_state(0, torch.full((4,), 2.0, dtype=torch.float64), active, spec)  # from its checkpoint
    core.initialize(torch.ones(6, dtype=torch.float64), 0, active, spec)
    assert core.layout == active and torch.equal(core.center, torch.ones(6, dtype=torch.float64))
    momentum = torch.empty(4, dtype=torch.float64)
    core.read_state(0, momentum)
    assert momentum.tolist() == [2.0] * 4
    assert core.configure(active, spec)
    with pytest.raises(LayoutMismatchError, match="model layout mismatch"):
        core.configure(idle, spec)
    with pytest.raises(LayoutMismatchError, match="model layout mismatch"):
        core.initialize(torch.ones(3, dtype=torch.float64), 0, idle, spec)


# ------------------------------------------------------------------------------------------- recovery, hardened
PAIR = Layout(2, 2, torch.float32, "d")


def restarted(spec=ADAG, layout=PAIR) -> ServerCore:
    """A server restarted from the snapshot of one whose center was zero at clock 0."""
    before = ServerCore()
    before.configure(layout, spec)
    before.initialize(torch.zeros(layout.numel, dtype=layout.dtype), 0)
    after = ServerCore()
    after.restore(before.snapshot())
    return after


def test_an_offer_whose_commits_would_overflow_the_center_is_refused_and_changes_nothing():
    core = restarted()
    core.commit(0, torch.full((2,), 2e38), 0)  # a commit since the restart
    with pytest.raises(ValueError, match="a recovered center would make the center overflow float32.*unchanged"):
        core.recover(torch.full((2,), 2e38), 1)  # the old server's commit since the snapshot: 2e38 + 2e38
    assert core.clock == 1 and torch.equal(core.center, torch.full((2,), 2e38))
    assert core.recover(torch.full((2,), -1e38), 1).clock == 2  # the base is unchanged: a later offer counts
    assert torch.equal(core.center, torch.full((2,), 1e38))


def test_a_commit_after_a_recovery_is_checked_against_the_recovered_center():
    """The overflow bound follows the center a recovery made: a commit that would take it past the float32 range
    is refused, not applied unchecked."""
    core = restarted()
    core.commit(0, torch.full((2,), 1.0), 0)
    core.recover(torch.full((2,), 3e38), 1)  # C = 1 + 3e38
    with pytest.raises(ValueError, match="worker 0's commit would make the center overflow"):
        core.commit(0, torch.full((2,), 1e38), core.clock)
    assert bool(torch.isfinite(core.center).all())


def test_the_first_offer_fixes_the_layout_as_an_initialization_does():
    idle, active = Layout(3, 3, torch.float64, "idle"), Layout(6, 4, torch.float64, "active")
    core = ServerCore()
    assert not core.configure(idle, ADAG)  # proposes its layout, never offers a center
    assert core.recover(torch.ones(6, dtype=torch.float64), 7, 0, active, ADAG).clock == 7
    assert core.layout == active and core.configure(active, ADAG)
    with pytest.raises(LayoutMismatchError, match="model layout mismatch"):
        core.recover(torch.ones(3, dtype=torch.float64), 8, 1, idle, ADAG)
    assert core.clock == 7


def test_an_offer_is_a_center_its_connection_pulled_and_no_other_one():
    """With rules that keep pulled centers (ADAG's γ), a worker may commit from the center it offered, on the
    connection it offered it on."""
    gamma = {"name": "adag", "gamma": 1e-4}
    core = restarted(gamma, Layout(6, 4, torch.float64, "d"))
    core.recover(torch.ones(6, dtype=torch.float64), 3, connection=10)
    with pytest.raises(ValueError, match="never handed it that center"):
        core.commit(0, torch.zeros(6, dtype=torch.float64), 3, connection=11)
    assert core.commit(0, torch.zeros(6, dtype=torch.float64), 3, connection=10).clock == 4
