"""A worker's side of dynamic data assignment: a sampler that asks the server for its next chunk of the epoch.

Every worker computes the epoch's order of samples itself (a permutation seeded by ``seed + epoch``, or the dataset's
order) and yields the positions the server hands it (see :mod:`lightning_adag.server.assignment`), so the work
follows each worker's speed and every sample of an epoch is trained exactly once across the workers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, Sampler, SequentialSampler

from lightning_adag.lockstep import per_worker_step_triggers
from lightning_adag.plan import EpochPlan

#: Take: (epoch, plan as a dict) -> the next chunk [start, stop) of positions (start == stop: the epoch is over).
Take = Callable[[int, dict], tuple[int, int]]


def automatic_chunk(positions: int, workers: int, batch: int) -> int:
    """A few batches: each worker asks about eight times per epoch (or segment) or more, so the epoch ends for every
    worker within a small part of it, and at least one batch at a time, at most eight, so asking costs nothing next
    to training them."""
    batches_per_worker = positions / (workers * batch)
    return batch * min(8, max(1, int(batches_per_worker // 8)))


class DynamicSampler(Sampler[int]):
    """Yields this worker's share of each epoch, chunk by chunk, as the server hands it out.

    ``take`` asks the server for the next chunk. Positions ``[start, stop)`` of the order are handed out (``stop``
    below the dataset's length when the epoch is limited); with ``every``, the epoch is cut into segments at the
    multiples of ``every``, and a worker reaches each segment boundary after a batch of its own (see
    :meth:`validation_due`). ``resume`` is ``(epoch, position)``: that epoch starts at that position.

    Its length is the even share of an epoch (what Lightning's ``estimated_stepping_batches`` counts); the actual
    number of samples a worker gets depends on its speed (see :attr:`taken`).
    """

    def __init__(
        self,
        take: Take,
        size: int,
        worker: int,
        workers: int,
        batch_size: int,
        shuffle: bool,
        seed: int,
        chunk: int | None = None,
        stop: int | None = None,
        every: int = 0,
        resume: tuple[int, int] | None = None,
    ) -> None:
        self._take, self.size, self.worker, self.workers = take, size, worker, workers
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.stop = size if stop is None else min(stop, size)
        self.every = every
        self.validates: Callable[[int], bool] = lambda epoch: True  # whether an epoch has validation points
        self.chunk = chunk or automatic_chunk(every or self.stop, workers, batch_size)
        self.epoch = resume[0] if resume else 0
        self._resume = resume
        self.taken = 0  # positions this worker took this epoch
        self.position = 0  # everything before this position of the epoch's order has been trained by someone
        self._trained = 0  # positions this worker trained this epoch
        self._boundaries: dict[int, int] = {}  # this worker's trained count -> the segment start it reaches there

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self, epoch: int) -> EpochPlan:
        start = self._resume[1] if self._resume and self._resume[0] == epoch else 0
        every = self.every if self.validates(epoch) else 0
        return EpochPlan(start, self.stop, self.chunk, self.workers, self.batch_size, every)

    def __len__(self) -> int:
        return math.ceil((self.stop - self.plan(self.epoch).start) / self.workers)

    def __iter__(self) -> Iterator[int]:
        epoch, plan = self.epoch, self.plan(self.epoch)
        order = self._order(epoch)
        segment_starts = [a for a, _ in plan.segments()]
        self.taken = self._trained = 0
        self.position = plan.start
        self._boundaries = {}
        reached = 0  # the last segment this worker took from
        while True:
            start, stop = self._take(epoch, asdict(plan))
            if start == stop:
                return
            segment = max(i for i, a in enumerate(segment_starts) if a <= start)
            if segment > reached and self.taken:
                self._boundaries[self.taken] = segment_starts[segment]
            reached = segment
            self.taken += stop - start
            yield from order[start:stop].tolist()

    @property
    def trained(self) -> int:
        """Samples of this epoch this worker has trained (counted in whole batches)."""
        return self._trained

    def batch_trained(self) -> None:
        """The training loop finished a batch of this sampler's indices."""
        self._trained += self.batch_size

    def validation_due(self) -> bool:
        """Whether the batches trained so far end this worker's part of a segment: every worker validates there,
        before it trains anything of the next segment (which it has already been handed)."""
        if self._trained in self._boundaries:
            self.position = self._boundaries.pop(self._trained)
            return True
        return False

    def epoch_trained(self) -> None:
        """The epoch's data ran out and every batch of it was trained."""
        self.position = self.stop

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        return torch.randperm(self.size, generator=generator)


def static_reason(trainer: pl.Trainer, dataloader: object) -> str | None:
    """Why the training ``dataloader`` keeps static shards (Lightning's ``DistributedSampler``), or None."""
    if not isinstance(dataloader, DataLoader):
        return f"the training data is a {type(dataloader).__name__}, not a DataLoader"
    if isinstance(dataloader.dataset, IterableDataset):
        return "an IterableDataset has no indices to hand out"
    if type(dataloader.batch_sampler) is not BatchSampler or dataloader.batch_size is None:
        return "the DataLoader has a batch_sampler of its own"
    if type(dataloader.sampler) not in (RandomSampler, SequentialSampler):
        return f"the DataLoader has a sampler of its own ({type(dataloader.sampler).__name__})"
    if trainer.overfit_batches:
        return "overfit_batches trains the same batches on every worker"
    if trainer.max_steps != -1:
        return "max_steps counts each worker's own steps"
    if isinstance(trainer.val_check_interval, int) and trainer.check_val_every_n_epoch is None:
        return (
            "an integer val_check_interval with check_val_every_n_epoch=None counts each worker's batches across epochs"
        )
    triggers = per_worker_step_triggers(trainer)
    if triggers:
        return f"{triggers[0]} acts on each worker's own step count, which differs between workers"
    return None


def sampler_for(
    trainer: pl.Trainer,
    dataloader: DataLoader,
    take: Take,
    seed: int,
    chunk: int | None,
    resume: tuple[int, int] | None,
) -> DynamicSampler | None:
    """The dynamic sampler of Lightning's training ``dataloader``, or None (saying why, in one line) where the
    assignment stays static. Lightning's settings keep their meaning for the epoch as a whole:
    ``limit_train_batches`` (k batches: k per worker on average) limits the positions handed out, and
    ``val_check_interval`` (a fraction of the epoch, or k batches per worker on average) cuts it into segments."""
    reason = static_reason(trainer, dataloader)
    if reason is not None:
        rank_zero_info(f"ADAG: each worker keeps a fixed shard of the training data (static assignment): {reason}")
        return None
    workers, batch = trainer.world_size, dataloader.batch_size
    size = len(dataloader.dataset)
    limit = trainer.limit_train_batches
    stop = min(size, limit * workers * batch) if isinstance(limit, int) else int(size * limit)
    interval = trainer.val_check_interval
    every = interval * workers * batch if isinstance(interval, int) else round(stop * interval / batch) * batch
    sampler = DynamicSampler(
        take,
        size,
        trainer.global_rank,
        workers,
        batch,
        shuffle=isinstance(dataloader.sampler, RandomSampler),
        seed=seed,
        chunk=chunk,
        stop=stop,
        every=0 if every >= stop else max(every, batch),
        resume=resume,
    )
    sampler.validates = lambda epoch: (
        trainer.enable_validation
        and (trainer.check_val_every_n_epoch is None or (epoch + 1) % trainer.check_val_every_n_epoch == 0)
    )
    sampler.set_epoch(trainer.fit_loop.epoch_progress.current.processed)
    return sampler
