"""Warnings about peers the server turns away, rate-limited: a flood of peers must not become a flood of log."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


class RefusalLog:
    """Logs the first ``burst`` refusals of every ``interval`` seconds one by one and counts the rest, which one
    line sums up once the interval is over (at the next refusal, or at :meth:`flush`, which the server calls about
    once a second)."""

    def __init__(
        self,
        logger: logging.Logger,
        burst: int = 10,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger, self._burst, self._interval, self._clock = logger, burst, interval, clock
        self._lock = threading.Lock()
        self._since = clock()
        self._logged = self._unlogged = 0

    def warn(self, message: str, *args: object) -> None:
        with self._lock:
            self._roll()
            if self._logged < self._burst:
                self._logged += 1
                self._logger.warning(message, *args)
            else:
                self._unlogged += 1

    def flush(self) -> None:
        with self._lock:
            self._roll()

    def _roll(self) -> None:
        now = self._clock()
        if now - self._since < self._interval:
            return
        if self._unlogged:
            self._logger.warning(
                "%d more peer(s) refused in the last %.0f s, not logged one by one", self._unlogged, now - self._since
            )
        self._since, self._logged, self._unlogged = now, 0, 0
