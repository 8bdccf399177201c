"""The parameter server: its core (center, clock, commits), the process that serves it, and how the strategy
starts and stops one."""

from lightning_adag.server.core import LayoutMismatchError, ServerCore

__all__ = ["LayoutMismatchError", "ServerCore"]
