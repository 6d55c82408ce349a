"""Waiting by condition, the one way the tests wait: poll, and fail naming what did not happen."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll(probe: Callable[[], T], timeout: float, what: str, every: float = 0.05) -> T:
    """``probe()``'s first truthy value; fails naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(every)


def wait_until(cond: Callable[[], bool], timeout: float, what: str, every: float = 0.05) -> float:
    """Seconds until ``cond()`` held; fails naming ``what`` after ``timeout``."""
    t0 = time.monotonic()
    poll(cond, timeout, what, every)
    return time.monotonic() - t0


async def until(cond: Callable[[], bool], timeout: float, what: str, every: float = 0.02) -> float:
    """``wait_until`` inside an event loop: the loop keeps running while it waits."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while not cond():
        assert loop.time() - t0 < timeout, f"{what}: not within {timeout:g} s"
        await asyncio.sleep(every)
    return loop.time() - t0
