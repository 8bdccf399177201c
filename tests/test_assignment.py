"""Dynamic data assignment: the server's chunks (any interleaving of requests) and a worker's sampler."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_adag.plan import EpochPlan
from lightning_adag.sampling import DynamicSampler, automatic_chunk
from lightning_adag.server.assignment import Assignments


@st.composite
def plans(draw):
    workers = draw(st.integers(1, 6))
    batch = draw(st.integers(1, 8))
    size = draw(st.integers(0, 300))
    stop = draw(st.integers(0, size))
    start = draw(st.integers(0, stop))
    chunk = batch * draw(st.integers(1, 4))
    every = draw(st.sampled_from([0, 0, batch * draw(st.integers(1, 20))]))
    return EpochPlan(start, stop, chunk, workers, batch, every)


def run_epochs(plan: EpochPlan, epochs: int, schedule: list[int]) -> dict[int, dict[int, list[tuple[int, int]]]]:
    """Workers asking in the order ``schedule`` (then round robin), each moving to the next epoch once the server
    has nothing left for it in its current one; the chunks each got, per epoch."""
    book, chunks = Assignments(), {e: {w: [] for w in range(plan.workers)} for e in range(epochs)}
    current = dict.fromkeys(range(plan.workers), 0)
    order = iter([*schedule, *(w for _ in range(10_000) for w in range(plan.workers))])
    while any(e < epochs for e in current.values()):
        worker = next(order) % plan.workers
        if current[worker] == epochs:
            continue
        start, stop = book.take("run", current[worker], worker, plan)
        if start == stop:
            current[worker] += 1
        else:
            chunks[current[worker]][worker].append((start, stop))
    return chunks


@settings(max_examples=300, deadline=None)
@given(plans(), st.integers(1, 3), st.lists(st.integers(0, 5), max_size=200))
def test_every_position_of_every_epoch_is_handed_out_exactly_once(plan, epochs, schedule):
    for per_worker in run_epochs(plan, epochs, schedule).values():
        handed = sorted(p for chunks in per_worker.values() for a, b in chunks for p in range(a, b))
        assert handed == list(range(plan.start, plan.stop))


@settings(max_examples=300, deadline=None)
@given(plans(), st.lists(st.integers(0, 5), max_size=200))
def test_chunks_stay_inside_segments_and_every_worker_reaches_every_segment_in_order(plan, schedule):
    segments = plan.segments()
    assert segments[0][0] == plan.start and segments[-1][1] == plan.stop
    for start, stop in segments[1:]:
        assert start % plan.every == 0 and stop - start >= plan.workers * plan.batch
    for chunks in run_epochs(plan, 1, schedule)[0].values():
        where = [next(i for i, (a, b) in enumerate(segments) if a <= start and stop <= b) for start, stop in chunks]
        assert all(0 < stop - start <= plan.chunk for start, stop in chunks)
        assert where == sorted(where)  # never back to an earlier segment
        if len(segments) > 1:
            assert set(where) == set(range(len(segments)))  # a batch of every segment: it validates at each boundary


def test_a_later_epoch_or_another_run_starts_afresh_and_a_different_plan_is_refused():
    book, plan = Assignments(), EpochPlan(0, 10, 4, 2, 2)
    assert book.take("a", 0, 0, plan) == (0, 4)
    assert book.take("b", 0, 0, plan) == (0, 4)  # runs sharing a server do not share a cursor
    assert book.take("a", 1, 1, plan) == (0, 4)  # worker 1 moved on: epoch 0 had nothing left for it
    assert book.take("a", 0, 0, plan) == (4, 8)  # epoch 0 still has positions for worker 0
    with pytest.raises(ValueError, match="differs from the one the epoch started with"):
        book.take("a", 1, 0, EpochPlan(0, 12, 4, 2, 2))
    with pytest.raises(ValueError, match="not one of the plan's 2 workers"):
        book.take("a", 1, 2, plan)


def local_take(book: Assignments, run: str, worker: int):
    def take(epoch: int, plan: dict) -> tuple[int, int]:
        return book.take(run, epoch, worker, EpochPlan(**plan))

    return take


def test_samplers_of_two_workers_cover_a_shuffled_epoch_and_start_where_a_resume_says():
    book = Assignments()
    samplers = [DynamicSampler(local_take(book, "r", w), 50, w, 2, 4, shuffle=True, seed=3, chunk=8) for w in (0, 1)]
    streams = [iter(s) for s in samplers]
    seen = [next(streams[0]) for _ in range(8)] + [i for s in streams for i in s]
    assert sorted(seen) == list(range(50)) and seen[:8] != list(range(8))  # shuffled, each index once
    expected = torch.randperm(50, generator=torch.Generator().manual_seed(3)).tolist()
    resumed = DynamicSampler(local_take(Assignments(), "r2", 0), 50, 0, 1, 4, True, 3, chunk=8, resume=(0, 24))
    assert list(resumed) == expected[24:]  # the same order, from the resumed position on
    assert len(samplers[0]) == 25 and len(resumed) == 26


def test_a_worker_validates_at_each_segment_it_reaches_after_training_a_batch_of_its_own():
    book = Assignments()
    fast, slow = (DynamicSampler(local_take(book, "r", w), 40, w, 2, 2, False, 0, chunk=4, every=20) for w in (0, 1))
    slow_stream = iter(slow)
    first_slow = [next(slow_stream), next(slow_stream)]  # the slow worker takes one chunk, then trains slowly
    fast_indices, due_at = [], []
    for index in fast:  # as Lightning's loop does, a batch is trained once the next one has been fetched
        fast_indices.append(index)
        if len(fast_indices) % 2 == 0 and len(fast_indices) > 2:
            fast.batch_trained()
            if fast.validation_due():
                due_at.append((len(fast_indices) - 2, fast.position))
        if len(fast_indices) == 20:
            break  # it waits at the validation for the slow worker
    assert due_at == [(16, 20)]  # after its 16 positions of segment [0, 20): everything before 20 is handed out
    rest = first_slow + [next(slow_stream) for _ in range(4)]
    assert rest == [0, 1, 2, 3, 24, 25]  # its own first chunk, then segment [20, 40), where the fast one left off
    slow.batch_trained()
    assert not slow.validation_due()
    slow.batch_trained()
    assert slow.validation_due() and slow.position == 20  # after its 2 batches of the first segment
    assert automatic_chunk(60_000, 10, 128) == 5 * 128 and automatic_chunk(100, 4, 32) == 32


def test_drop_last_drops_only_the_epochs_last_partial_batch():
    book = Assignments()
    samplers = [DynamicSampler(local_take(book, "r", w), 50, w, 2, 4, shuffle=False, seed=0, chunk=8) for w in (0, 1)]
    streams = [iter(torch.utils.data.DataLoader(torch.arange(50), 4, sampler=s, drop_last=True)) for s in samplers]
    batches = []
    while streams:  # the two workers take turns, one batch each
        for stream in list(streams):
            try:
                batches.append(next(stream).tolist())
            except StopIteration:
                streams.remove(stream)
    assert all(len(batch) == 4 for batch in batches)
    assert sorted(i for batch in batches for i in batch) == list(range(48))  # all but the epoch's last 2


def test_a_hostile_plan_is_refused():
    with pytest.raises(ValueError, match="integers"):
        EpochPlan(0, 10.5, 4, 2, 2)
    with pytest.raises(ValueError, match="start <= stop"):
        EpochPlan(5, 3, 4, 2, 2)
