"""Retries of store requests: what may succeed when tried again, and how long to wait.

Object stores fail transiently (throttling, connection resets, 503 SlowDown): each request
of `Store` and of the S3 calls (s3.py) is retried up to STORE_RETRIES times with capped
exponential backoff and jitter. Missing objects and permission errors are final: no retry
finds an object or a right that is not there.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class TransientStoreError(OSError):
    """A store request failed in a way that may succeed when tried again."""


STORE_RETRIES = 5


def retrying(op: Callable[[], T], what: str) -> T:
    """Object stores fail transiently (throttling, resets): retry with backoff and jitter.

    Missing objects and permission errors are final and raised at once.
    """
    for attempt in range(STORE_RETRIES + 1):
        try:
            return op()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
            raise
        except OSError:
            if attempt == STORE_RETRIES:
                raise
            backoff(attempt)
    raise AssertionError(what)  # unreachable


def backoff(attempt: int) -> None:
    """Sleep before attempt `attempt + 1`: 20 ms doubling, at most 2 s, with jitter."""
    time.sleep(min(2.0, 0.02 * 2**attempt) * (0.5 + random.random()))
