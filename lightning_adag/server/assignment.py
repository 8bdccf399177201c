"""Each epoch's samples, handed out to a run's workers in chunks on demand, every one exactly once.

Workers agree on an epoch's order of samples (a permutation seeded per epoch, which each computes itself); the
server only hands out *positions* in that order. A worker asks for its next chunk when it has used up the last, so
fast workers take more chunks than slow ones and the epoch ends for everyone within about one chunk of each other.

An epoch may be cut into *segments* (validation every ``every`` positions): a chunk never crosses a segment's end,
and every worker gets at least one batch of every segment, so that each worker's data runs into every segment
boundary after it has trained something, where it validates with the others.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from lightning_adag.plan import EpochPlan


@dataclass
class _Segment:
    cursor: int
    stop: int
    waiting: set[int]  # workers that have not taken from this segment yet

    def take(self, worker: int, chunk: int, batch: int) -> tuple[int, int] | None:
        """The next chunk for ``worker``, leaving a batch for every other worker still waiting; None if nothing is
        left for it here."""
        reserved = batch * len(self.waiting - {worker})
        size = min(chunk, self.stop - self.cursor - reserved)
        if size <= 0 and worker in self.waiting:
            size = min(batch, self.stop - self.cursor)  # its own reserved batch
        if size <= 0:
            return None
        self.waiting.discard(worker)
        start, self.cursor = self.cursor, self.cursor + size
        return start, self.cursor


@dataclass
class _Epoch:
    plan: EpochPlan
    segments: list[_Segment]

    @classmethod
    def of(cls, plan: EpochPlan) -> _Epoch:
        reserve = plan.every > 0  # without boundaries no worker needs a batch of every segment
        workers = set(range(plan.workers)) if reserve else set()
        return cls(plan, [_Segment(a, b, set(workers)) for a, b in plan.segments()])

    def take(self, worker: int) -> tuple[int, int]:
        for segment in self.segments:
            taken = segment.take(worker, self.plan.chunk, self.plan.batch)
            if taken is not None:
                return taken
        return self.plan.stop, self.plan.stop

    @property
    def used_up(self) -> bool:
        return all(segment.cursor == segment.stop for segment in self.segments)


@dataclass
class _Run:
    open: dict[int, _Epoch] = field(default_factory=dict)  # epochs with positions left to hand out
    newest: int = -1


class Assignments:
    """The chunks handed out so far, per run (runs sharing a standalone server each have their own) and epoch."""

    #: Runs remembered at once; the least recently active is forgotten first.
    MAX_RUNS = 256

    def __init__(self) -> None:
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()

    def take(self, run: str, epoch: int, worker: int, plan: EpochPlan) -> tuple[int, int]:
        """The next chunk ``[start, stop)`` of positions of ``epoch`` for ``worker``; ``start == stop`` when the
        epoch has nothing left for it. The first request of an epoch fixes its plan; later ones must agree."""
        if not 0 <= worker < plan.workers:
            raise ValueError(f"worker {worker} is not one of the plan's {plan.workers} workers")
        with self._lock:
            state = self._runs.pop(run, None) or _Run()
            self._runs[run] = state  # most recently active last
            while len(self._runs) > self.MAX_RUNS:
                del self._runs[next(iter(self._runs))]
            if epoch > state.newest:
                state.open[epoch] = _Epoch.of(plan)
                state.newest = epoch
            current = state.open.get(epoch)
            if current is None:  # begun earlier and used up since
                return plan.stop, plan.stop
            if current.plan != plan:
                raise ValueError(
                    f"run {run!r} epoch {epoch}: this worker's plan {plan} differs from the one the epoch started with,"
                    f" {current.plan}: every worker must load the same data with the same settings"
                )
            taken = current.take(worker)
            if current.used_up:
                del state.open[epoch]
            return taken
