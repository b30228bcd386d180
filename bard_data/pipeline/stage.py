"""The stage contract: what a stage declares, and what it hands back. The runner does the rest.

A stage declares

- ``name``: the table it writes (its folder in the run directory);
- ``reads``: the tables it reads (the runner orders stages from these; a table no enabled stage
  builds is simply absent, e.g. ``imported_samples`` in a recipe without traces);
- ``sections``: the recipe sections its output depends on;
- ``version``: bumped when a change of its code changes its output.

and returns its rows as ``ShardResult``s: kept rows, excluded rows with their ``reason`` (as
datatrove's filters hand dropped documents to an exclusion writer), counters, and report tables.
It never writes a file: the runner writes every part through the store and builds every funnel
record, so the funnel accounts for every row whatever the stage does.

Two shapes:

- ``Stage.run(ctx)`` yields the parts of its table, in order (one for a whole table; several when
  the stage streams its rows slice by slice to bound memory). The table is rebuilt whole when the
  stage runs.
- ``ShardedStage`` (the LLM stages): ``inputs(ctx)`` gives the rows to process in a deterministic
  order; the runner cuts them into shards of ``recipe.shard_size`` rows, skips the finished ones
  (resume), and hands the others to the executor, which calls ``process_shard`` here or elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Iterable, Optional

import polars as pl

if TYPE_CHECKING:
    from bard_data.config import Recipe
    from bard_data.pipeline.context import RunContext


@dataclass
class ShardResult:
    """One part of a stage's table. ``rows_in`` defaults to the shard's input rows (sharded stages)."""

    kept: pl.DataFrame
    excluded: Optional[pl.DataFrame] = None  # must carry `reason` (and ideally `detail`)
    rows_in: Optional[int] = None
    added: int = 0  # rows created beyond the input (upsampling)
    counters: dict[str, float] = field(default_factory=dict)
    # Tables that describe the stage's work rather than rows of it (the balance report, the
    # decontamination report), each written whole under its own name before the stage is done.
    reports: dict[str, pl.DataFrame] = field(default_factory=dict)


def excluded_rows(df: pl.DataFrame, reason: str | pl.Expr, detail: str | pl.Expr = "") -> pl.DataFrame:
    r = pl.lit(reason) if isinstance(reason, str) else reason
    d = pl.lit(detail) if isinstance(detail, str) else detail
    return df.with_columns(r.cast(pl.Utf8).alias("reason"), d.cast(pl.Utf8).alias("detail"))


def concat_excluded(*frames: Optional[pl.DataFrame]) -> Optional[pl.DataFrame]:
    frames = [f for f in frames if f is not None and f.height]
    return pl.concat(frames, how="diagonal_relaxed") if frames else None


class Stage:
    """One step of a build (see the module docstring)."""

    name: ClassVar[str] = ""
    reads: ClassVar[tuple[str, ...]] = ()
    sections: ClassVar[tuple[str, ...]] = ()
    version: ClassVar[int] = 1

    def enabled(self, recipe: "Recipe") -> bool:
        return True

    def reads_for(self, recipe: "Recipe") -> tuple[str, ...]:
        """``reads``, for stages whose inputs depend on a setting."""
        return self.reads

    def sections_for(self, recipe: "Recipe") -> tuple[str, ...]:
        """``sections`` (dotted paths; a list item by its index), narrowed to what this recipe's
        settings make the output depend on."""
        return self.sections

    def run(self, ctx: "RunContext") -> Iterable[ShardResult]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<stage {self.name}>"


class ShardedStage(Stage):
    """A stage whose rows are processed shard by shard, resumably (the LLM stages)."""

    def inputs(self, ctx: "RunContext") -> pl.DataFrame:
        raise NotImplementedError

    def process_shard(self, ctx: "RunContext", shard: pl.DataFrame, i: int) -> ShardResult:
        raise NotImplementedError

    def planned_requests(self, shard: pl.DataFrame) -> int:
        """LLM requests ``process_shard`` makes for these rows before any retry (the live figures'
        plan): one per row unless the stage says otherwise."""
        return shard.height
