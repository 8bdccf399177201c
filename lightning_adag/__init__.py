"""Asynchronous parameter-server training for PyTorch Lightning with Accumulated Gradient Normalization (ADAG).

Importing the package registers the strategy names ``"adag"``, ``"downpour"``, ``"aeasgd"`` and ``"dynsgd"`` in
``lightning.pytorch``'s strategy registry
(not in the separate ``pytorch_lightning`` package, which keeps a registry of its own).
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_adag.algorithms import ADAG, AEASGD, DOWNPOUR, Algorithm, DynSGD
from lightning_adag.callback import ADAGCallback
from lightning_adag.strategy import ADAGStrategy
from lightning_adag.wire import ServerBusyError, ServerGoneError, ServerRefusedError

__version__ = "0.1.0.dev0"
__all__ = [
    "ADAG",
    "AEASGD",
    "DOWNPOUR",
    "ADAGCallback",
    "ADAGStrategy",
    "Algorithm",
    "DynSGD",
    "ServerBusyError",
    "ServerGoneError",
    "ServerRefusedError",
]

ADAGStrategy.register_strategies(StrategyRegistry)
