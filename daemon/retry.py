"""Retries in one place: transient errors are retried with capped exponential backoff.

Only errors the adapters classified as transient (``model.errors.TRANSIENT_ERRORS``:
the store or the broker is unreachable) are retried; every attempt is logged and
counted. The wait is interruptible so a stop request is honoured promptly.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog

from model.errors import TRANSIENT_ERRORS, ExemplarError

log = structlog.get_logger(__name__)
T = TypeVar("T")


class StopRequested(ExemplarError):
    """A retry loop gave up because the process was asked to stop."""


@dataclass(frozen=True)
class Backoff:
    initial_s: float = 0.2
    maximum_s: float = 10.0
    factor: float = 2.0

    def delays(self) -> Callable[[int], float]:
        return lambda attempt: min(self.maximum_s, self.initial_s * self.factor**attempt)


def retry(
    operation: str,
    fn: Callable[[], T],
    stop: threading.Event,
    backoff: Backoff | None = None,
    on_retry: Callable[[str, BaseException], None] | None = None,
    wait: Callable[[float], None] | None = None,
) -> T:
    """Call ``fn`` until it succeeds, retrying transient errors until ``stop`` is set.

    ``wait`` replaces the plain sleep (the predictor uses it to keep polling its
    paused consumer so the group does not evict it).
    """
    delay = (backoff or Backoff()).delays()
    attempt = 0
    while True:
        try:
            return fn()
        except TRANSIENT_ERRORS as exc:
            if stop.is_set():
                raise StopRequested(f"{operation}: stopped while retrying ({exc})") from exc
            pause = delay(attempt)
            attempt += 1
            log.warning(
                "retrying", operation=operation, attempt=attempt, delay_s=pause, error=str(exc)
            )
            if on_retry is not None:
                on_retry(operation, exc)
            if wait is not None:
                wait(pause)
            else:
                stop.wait(pause)
