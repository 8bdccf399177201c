"""Keep Lightning from putting asynchronous workers in lockstep; every private Lightning read of the package.

Lightning 2.6 assumes that a distributed run is synchronous. Two places call a collective that our workers,
each at its own pace inside an epoch, would either wait on or never match:

* ``_TrainingEpochLoop._broadcast_sigterm_tensor`` broadcasts a SIGTERM flag from rank 0 **before every training
  batch**, which makes every worker wait for the slowest one at each step;
* ``_SignalConnector._sigterm_notifier_fn`` broadcasts the same flag from inside the SIGTERM handler, which blocks
  a worker whose peers are not in a matching broadcast.

Both are replaced, on this Trainer only, by their local halves: the handler records the signal and forwards it
to the processes this one launched, and the loop stops at the next batch boundary of each worker (Lightning's own
check at the end of every batch raises ``SIGTERMException``). The collectives at epoch boundaries
(``sync_dist``, torchmetrics, checkpoints, early stopping) are untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from types import FrameType

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint, Timer
from lightning.pytorch.callbacks.timer import Interval
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.data import _update_dataloader
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader, Sampler


def disable_lockstep(trainer: pl.Trainer) -> None:
    connector = trainer._signal_connector
    epoch_loop = trainer.fit_loop.epoch_loop

    def stop_on_local_sigterm() -> None:
        if trainer.received_sigterm:
            raise SIGTERMException

    def notify_sigterm_locally(signum: int, frame: FrameType | None) -> None:
        launcher = trainer.strategy.launcher
        if not connector.received_sigterm and launcher is not None:
            launcher.kill(signum)
        connector.received_sigterm = True

    epoch_loop._broadcast_sigterm_tensor = stop_on_local_sigterm
    # Read by `register_signal_handlers`, which the Trainer calls after `strategy.setup`.
    connector._sigterm_notifier_fn = notify_sigterm_locally


def check_asynchrony(trainer: pl.Trainer) -> None:
    """Refuse or flag Trainer settings that need every worker at the same batch at the same moment."""
    if trainer._val_check_time_interval is not None:
        raise ValueError(
            "a time-based val_check_interval makes each worker decide on its own clock when to validate, but"
            " validation on the center needs every worker: give val_check_interval as a number of batches or a"
            " fraction of the epoch"
        )
    if any(isinstance(cb, Timer) and cb._interval == Interval.step for cb in trainer.callbacks):
        rank_zero_warn(
            "Trainer(max_time=...) (a Timer checking every step) broadcasts from rank 0 after every batch, which makes"
            " ADAG workers wait for each other; prefer max_epochs or max_steps, or Timer(interval='epoch')"
        )


def per_worker_step_triggers(trainer: pl.Trainer) -> list[str]:
    """Callbacks that run a collective at each worker's own step count or clock (a checkpoint save has a barrier):
    workers that take different numbers of steps would meet in mismatched collectives."""
    found = []
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint):
            if callback._every_n_train_steps:
                found.append(f"ModelCheckpoint(every_n_train_steps={callback._every_n_train_steps})")
            if callback._train_time_interval is not None:
                found.append("ModelCheckpoint(train_time_interval=...)")
    return found


def assign_training_data(trainer: pl.Trainer, sampler_for: Callable[[DataLoader], Sampler | None]) -> None:
    """Give the training DataLoader ``sampler_for(dataloader)`` (called with the user's DataLoader) in place of the
    ``DistributedSampler`` Lightning injects; where it returns None, Lightning's injection stays."""
    connector = trainer._data_connector
    inject = type(connector)._prepare_dataloader.__get__(connector)

    def prepare(dataloader: object, shuffle: bool, mode: RunningStage) -> object:
        if mode == RunningStage.TRAINING and isinstance(dataloader, DataLoader):
            sampler = sampler_for(dataloader)
            if sampler is not None:
                return _update_dataloader(dataloader, sampler, mode=mode)
        return inject(dataloader, shuffle=shuffle, mode=mode)

    connector._prepare_dataloader = prepare


def train_until_data_ends(trainer: pl.Trainer, validation_due: Callable[[], bool]) -> None:
    """Run each epoch until the training data runs out, not for ``len(dataloader)`` batches (that length is only an
    estimate when the work follows each worker's speed), and validate at the end of an epoch and wherever
    ``validation_due()`` says after a batch, not every ``val_check_batch`` batches. Call it once the training loop
    has set up its data (``on_train_start``); it follows reloads of the dataloader."""
    fit_loop, epoch_loop = trainer.fit_loop, trainer.fit_loop.epoch_loop

    def unsized() -> None:
        fit_loop.max_batches = float("inf")  # no total: the progress bar counts up
        trainer.val_check_batch = float("inf")
        fetcher = fit_loop._data_fetcher
        if getattr(fetcher.reset, "unsized", False):
            return
        reset = fetcher.reset

        def reset_unsized() -> None:
            reset()
            fetcher.length, fetcher.done = None, False  # so it fetches a batch ahead and knows the last one

        reset_unsized.unsized = True
        fetcher.reset = reset_unsized

    setup_data = type(fit_loop).setup_data.__get__(fit_loop)

    def setup_data_unsized() -> None:
        setup_data()  # a reload: the loop iterates the new fetcher at the epoch's start
        unsized()

    def should_validate(data_fetcher: object) -> bool:
        if not epoch_loop._should_check_val_epoch():
            return False
        if epoch_loop.batch_progress.is_last_batch:
            return True
        if trainer.should_stop and fit_loop._can_stop_early:
            return True
        return validation_due()

    unsized()
    fit_loop.setup_data = setup_data_unsized
    epoch_loop._should_check_val_fx = should_validate
    if not (trainer.current_epoch > 0 and not fit_loop.is_resuming and not epoch_loop.restarting):
        iter(fit_loop._data_fetcher)  # the loop iterates at the epoch's start only after the first epoch
