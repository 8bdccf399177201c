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
from lightning.pytorch.utilities.exceptions import SIGTERMException


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
