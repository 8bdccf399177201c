"""Keep Lightning from putting asynchronous workers in lockstep.

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

from types import FrameType

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.callbacks.timer import Interval
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn


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
