"""What a stage is, and the shard loop every sharded stage runs through.

A stage reads finished tables from the store and writes one table. It returns kept rows and
excluded rows with their ``reason`` (as datatrove's filters hand dropped documents to an
exclusion writer), so the funnel can account for every row. The loop here, not the stage,
deals with shards, resume, atomic writes and progress.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import polars as pl
from tqdm.auto import tqdm

from bard_data.store import atomic_write_json, input_hash

if TYPE_CHECKING:
    from bard_data.runner import RunContext

log = logging.getLogger(__name__)


@dataclass
class ShardResult:
    kept: pl.DataFrame
    excluded: Optional[pl.DataFrame] = None  # must carry `reason` (and ideally `detail`)
    rows_in: Optional[int] = None
    added: int = 0  # rows created beyond the input (upsampling)
    counters: dict[str, float] = field(default_factory=dict)

    def funnel(self, stage: str, shard: int, rows_in: int) -> dict:
        dropped: dict[str, int] = {}
        if self.excluded is not None and self.excluded.height:
            for reason, n in self.excluded.group_by("reason").len().iter_rows():
                dropped[str(reason)] = int(n)
        return {
            "stage": stage,
            "shard": shard,
            "rows_in": int(self.rows_in if self.rows_in is not None else rows_in),
            "rows_out": int(self.kept.height),
            "added": int(self.added),
            "dropped": dropped,
            "counters": self.counters,
        }


def excluded_rows(df: pl.DataFrame, reason: str | pl.Expr, detail: str | pl.Expr = "") -> pl.DataFrame:
    r = pl.lit(reason) if isinstance(reason, str) else reason
    d = pl.lit(detail) if isinstance(detail, str) else detail
    return df.with_columns(r.cast(pl.Utf8).alias("reason"), d.cast(pl.Utf8).alias("detail"))


class BackgroundWriter:
    """Runs writes on one background thread, one at a time, so that the next slice is read and
    prepared while the previous one is compressed (Polars releases the GIL while it encodes
    Parquet). ``submit`` waits for the write before it; leaving the ``with`` block waits for the
    last one, and a write's exception is raised there (or at the next ``submit``)."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bard-writer")
        self._pending = None

    def submit(self, fn: Callable, *args) -> None:
        self.wait()
        self._pending = self._pool.submit(fn, *args)

    def wait(self) -> None:
        f, self._pending = self._pending, None
        if f is not None:
            f.result()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.wait()
        finally:
            self._pool.shutdown(wait=True)


def concat_excluded(*frames: Optional[pl.DataFrame]) -> Optional[pl.DataFrame]:
    frames = [f for f in frames if f is not None and f.height]
    return pl.concat(frames, how="diagonal_relaxed") if frames else None


class Stage:
    """One step of a build. ``table`` is the table it writes (its folder in the run)."""

    table: str = ""
    requires: tuple[str, ...] = ()

    def enabled(self, ctx: "RunContext") -> bool:
        return True

    def run(self, ctx: "RunContext") -> None:
        raise NotImplementedError


def run_sharded(
    ctx: "RunContext",
    table: str,
    inputs: pl.DataFrame,
    process: Callable[[pl.DataFrame, int], ShardResult],
    shard_size: int,
    unit: str = "rows",
    stage: Optional["Stage"] = None,
) -> None:
    """Split ``inputs`` (already in a deterministic order) into shards; run the ones not finished.

    A shard is finished when its files are whole and its funnel record carries the hash of the
    very input rows it was computed from (``store.shard_problem``), so a shard whose input
    changed (an upstream stage was redone, or the shard size changed) is recomputed and a
    damaged one is recomputed with a warning; its LLM calls are in the cache, so that is cheap.
    Shards with rows dropped as ``llm_error`` are redone on every new invocation: the rows that
    worked come back from the cache, only the failed requests are sent again. Shards beyond the
    current count (a larger shard size before) are removed.
    """
    store = ctx.store
    n = max(1, math.ceil(inputs.height / shard_size))
    layout = {"shard_size": shard_size, "shards": n, "rows": inputs.height}
    for i in store.shard_indices(table):
        if i >= n:
            store.remove_shard(table, i)
    atomic_write_json(store.table_dir(table) / "_layout.json", layout)
    shards = [inputs.slice(i * shard_size, shard_size) for i in range(n)]
    hashes = [input_hash(sh) for sh in shards]
    todo = []
    for i in range(n):
        why = store.shard_problem(table, i, hashes[i], retry_errors=True)
        if why is not None:
            todo.append(i)
            if why == "llm_error":
                log.info("%s shard %d: retrying the rows whose LLM call failed", table, i)
    bar = tqdm(total=n, initial=n - len(todo), desc=f"{table}", unit="shard", disable=ctx.quiet)
    executor = getattr(ctx, "executor", None)
    if stage is not None and executor is not None and executor.kind != "local":
        # Shards computed elsewhere (Ray actors) come back in completion order; the writing
        # and bookkeeping stay here, on the driver.
        results = executor.map_shards(ctx, stage, [(i, shards[i]) for i in todo])
    else:
        results = ((i, process(shards[i], i)) for i in todo)
    for i, res in results:
        shard = shards[i]
        funnel = {**res.funnel(table, i, shard.height), "input_hash": hashes[i]}
        store.write_shard(table, i, res.kept, res.excluded, funnel)
        ctx.on_shard_written(table, i)
        bar.update(1)
    bar.close()
    store.mark_done(table, layout)
