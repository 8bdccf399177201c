"""What a run's workers and the server agree on for one epoch of dynamic data assignment."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EpochPlan:
    """What a run's workers agree on for one epoch: hand out positions ``[start, stop)`` of its order, ``chunk`` at
    a time, to ``workers`` workers; with ``every``, cut the epoch into segments at the multiples of ``every`` and
    keep ``batch`` positions of each segment for every worker that has not taken from it yet."""

    start: int
    stop: int
    chunk: int
    workers: int
    batch: int
    every: int = 0

    def __post_init__(self) -> None:
        if not all(type(value) is int for value in vars(self).values()):
            raise ValueError(f"an epoch plan holds integers: {self}")
        if not 0 <= self.start <= self.stop:
            raise ValueError(f"an epoch plan needs 0 <= start <= stop, got [{self.start}, {self.stop})")
        if self.chunk < 1 or self.workers < 1 or self.batch < 1 or self.every < 0:
            raise ValueError(f"an epoch plan needs positive chunk, workers and batch sizes: {self}")

    def segments(self) -> list[tuple[int, int]]:
        """The epoch's segments: cut at the multiples of ``every``, except where a segment would be too short to give
        every worker a batch (then it joins the one before)."""
        if not self.every:
            return [(self.start, self.stop)]
        least = self.workers * self.batch
        cuts = [self.start]
        boundary = (self.start // self.every + 1) * self.every
        while boundary < self.stop:
            if boundary - cuts[-1] >= least and self.stop - boundary >= least:
                cuts.append(boundary)
            boundary += self.every
        return list(zip(cuts, [*cuts[1:], self.stop]))
