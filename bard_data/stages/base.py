"""What a stage is, and the shard loop every sharded stage runs through.

A stage reads finished tables from the store and writes one table. It returns kept rows and
excluded rows with their ``reason`` (as datatrove's filters hand dropped documents to an
exclusion writer), so the funnel can account for every row. The loop here, not the stage,
deals with shards, resume, atomic writes and progress.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import polars as pl
from tqdm.auto import tqdm

from bard_data.store import atomic_write_json

if TYPE_CHECKING:
    from bard_data.runner import RunContext


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
) -> None:
    """Split ``inputs`` (already in a deterministic order) into shards; run the missing ones.

    Shard boundaries depend on ``shard_size``; if a resumed run has another size, the finished
    parts of this table no longer line up and are set aside (their LLM calls are in the cache,
    so recomputing them is cheap).
    """
    store = ctx.store
    n = max(1, math.ceil(inputs.height / shard_size))
    layout = {"shard_size": shard_size, "shards": n, "rows": inputs.height}
    layout_path = store.table_dir(table) / "_layout.json"
    if layout_path.exists():
        import json

        if json.loads(layout_path.read_text()) != layout:
            for p in store.parts(table):
                p.unlink()
            for p in (store.table_dir(table) / "_funnel").glob("*.json"):
                p.unlink()
    atomic_write_json(layout_path, layout)
    todo = [i for i in range(n) if not store.has_shard(table, i)]
    bar = tqdm(total=n, initial=n - len(todo), desc=f"{table}", unit="shard", disable=ctx.quiet)
    for i in todo:
        shard = inputs.slice(i * shard_size, shard_size)
        res = process(shard, i)
        store.write_shard(table, i, res.kept, res.excluded, res.funnel(table, i, shard.height))
        ctx.on_shard_written(table, i)
        bar.update(1)
    bar.close()
    store.mark_done(table, layout)
