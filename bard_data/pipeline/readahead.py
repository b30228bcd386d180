"""Reading the next part while this one is processed.

Polars decodes one Parquet column chunk on one core (text columns are one chunk per part), and
releases the GIL while it does: reading part k+1 on a thread while the caller works on part k
keeps the second core busy. Memory: one part more.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def read_ahead(fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """``fn(item)`` for each item, in order, each computed while the caller holds the previous."""
    items = list(items)
    with ThreadPoolExecutor(1, thread_name_prefix="bard-read-ahead") as pool:
        ahead = pool.submit(fn, items[0]) if items else None
        for k in range(len(items)):
            got = ahead.result()
            ahead = pool.submit(fn, items[k + 1]) if k + 1 < len(items) else None
            yield got
            del got
