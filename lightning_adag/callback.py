"""The worker-side hook: window schedule, commit and pull, the center for validation, and ``adag/`` metrics."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from lightning_adag.lockstep import train_until_data_ends


class ADAGCallback(Callback):
    """Counts each worker's local optimizer steps and commits every ``window`` of them.

    A window counts optimizer steps (so ``accumulate_grad_batches`` is respected); with manual optimization it
    counts training batches. The last, partial window of a run is committed with its own step count. During
    ``fit``, validation runs on the center: every worker pulls the same center (between two barriers, so no commit
    slips in) and gets its own parameters back when training resumes. Logged on every worker, shown in the progress
    bar, flushed to loggers by rank 0: ``adag/staleness`` and ``adag/commit_ms`` (means since the last log; the
    time a commit blocks training), ``adag/commits`` (this worker's), ``adag/clock`` (the server's) and
    ``adag/commit_bytes`` (the bytes one commit sends; the reply carries the whole center in its own dtype).

    :class:`~lightning_adag.ADAGStrategy` adds one when the Trainer has none.
    """

    def __init__(self) -> None:
        self.commits = 0
        self._steps_in_window = 0
        self._last_global_step = 0
        self._since_log = _Means()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not hasattr(trainer.strategy, "record_final_center"):  # the one strategy this drives
            raise TypeError(
                f"ADAGCallback needs Trainer(strategy='adag') or an ADAGStrategy, got {type(trainer.strategy).__name__}"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._steps_in_window = 0
        self._last_global_step = trainer.global_step
        if trainer.strategy.sampler is not None:  # the work follows each worker's speed
            train_until_data_ends(trainer, lambda: trainer.strategy.sampler.validation_due())

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        trainer.strategy.worker.resume_window()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if pl_module.automatic_optimization:
            stepped = trainer.global_step - self._last_global_step
            self._last_global_step = trainer.global_step
        else:
            stepped = 1
        self._steps_in_window += stepped
        sampler = trainer.strategy.sampler
        if sampler is not None:
            sampler.batch_trained()
            if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
                sampler.epoch_trained()
        if self._steps_in_window >= trainer.strategy.algorithm.window:
            self._commit(trainer)
        elif stepped:  # an overlapped exchange may have brought its center: fold it between optimizer steps only,
            trainer.strategy.worker.poll()  # never between the micro-batches of one accumulated gradient
        self._log(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return  # outside fit the model already holds the center (pulled in the strategy's setup)
        trainer.strategy.worker.settle()  # every commit has landed before anyone looks
        trainer.strategy.barrier("adag_show_center")
        trainer.strategy.worker.show_center()
        trainer.strategy.barrier("adag_center_shown")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Commit the last partial window, wait for every worker's, and leave the final center in the model."""
        if self._steps_in_window:
            self._commit(trainer)
        trainer.strategy.worker.settle()
        trainer.strategy.barrier("adag_final_commits")
        trainer.strategy.worker.reset_to_center()
        trainer.strategy.record_final_center()
        trainer.strategy.barrier("adag_final_pull")

    def _commit(self, trainer: pl.Trainer) -> None:
        start = time.perf_counter()
        trainer.strategy.worker.commit(self._steps_in_window)
        self._since_log.latency.add((time.perf_counter() - start) * 1e3)
        self.commits += 1
        self._steps_in_window = 0

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the means since the last log, on the steps whose metrics Lightning hands to the loggers (every
        ``log_every_n_steps``) and on the last batch of an epoch (so short runs show them too). Only then: each
        ``self.log`` call costs Lightning's bookkeeping and, on a GPU, a device synchronization, which every step
        would pay (BENCHMARKS.md)."""
        worker = trainer.strategy.worker
        for receipt in worker.completed:
            self._since_log.staleness.add(receipt.staleness)
        worker.completed.clear()
        epoch_ends = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if not (trainer._logger_connector.should_update_logs or epoch_ends) or not self._since_log.latency.count:
            return
        metrics = {
            "adag/commit_ms": self._since_log.latency.mean(),
            "adag/commits": float(self.commits),
            "adag/clock": float(worker.pulled_clock),
            "adag/commit_bytes": float(worker.payload.nbytes),
        }
        if self._since_log.staleness.count:  # with overlap, no receipt may have come back yet
            metrics["adag/staleness"] = self._since_log.staleness.mean()
        if trainer.strategy.sampler is not None:
            metrics["adag/samples"] = float(trainer.strategy.sampler.trained)
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, prog_bar=name in _PROGRESS_BAR)
        self._since_log = _Means()


_PROGRESS_BAR = ("adag/staleness", "adag/commits")


class _Mean:
    def __init__(self) -> None:
        self.count = 0
        self._total = 0.0

    def add(self, value: float) -> None:
        self.count += 1
        self._total += value

    def mean(self) -> float:
        return self._total / self.count


class _Means:
    """What the callback averages between two logging steps."""

    def __init__(self) -> None:
        self.staleness = _Mean()
        self.latency = _Mean()
