"""Asynchronous parameter-server training for PyTorch Lightning with Accumulated Gradient Normalization (ADAG).

Importing the package registers the strategy name ``"adag"`` in ``lightning.pytorch``'s strategy registry
(not in the separate ``pytorch_lightning`` package, which keeps a registry of its own).
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_adag.algorithms import ADAG, Algorithm
from lightning_adag.callback import ADAGCallback
from lightning_adag.strategy import ADAGStrategy
from lightning_adag.wire import ServerGoneError

__version__ = "0.1.0.dev0"
__all__ = ["ADAG", "ADAGCallback", "ADAGStrategy", "Algorithm", "ServerGoneError"]

ADAGStrategy.register_strategies(StrategyRegistry)
