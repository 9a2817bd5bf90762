"""One bounded pool pattern for every parallel transfer: all or nothing, first error wins."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def run_parallel(fn: Callable[[T], R], items: Iterable[T], *, workers: int, name: str) -> list[R]:
    """``[fn(item) for item in items]`` on at most ``workers`` threads, results in order.

    The first failure (any BaseException, so a simulated crash too) cancels the
    calls that have not started, waits for the running ones, and is raised.
    """
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix=name) as pool:
        futures = [pool.submit(fn, item) for item in items]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise
