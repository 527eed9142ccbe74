"""Helpers the process-level tests share (importable: tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, what: str, *, interval: float = 0.2) -> T:
    """Poll until `predicate()` is truthy and return it: tests wait on progress (a log
    line, a version, a status), never on fixed sleeps. Fails naming what it waited for."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
