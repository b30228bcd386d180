"""The ``filtered_compressions`` table: the compressions that kept the gold answer, met the budget
(fidelity as the recipe's ``budget`` section defines it, when ``format.require_within_tolerance``)
and passed the logical-completeness judge. Key columns only: the compressed text stays in
``compressions`` (joinable on compression_id), so is not copied again."""

from __future__ import annotations

from typing import Iterator, Optional

import polars as pl

from bard_data.pipeline.stage import ShardResult, Stage, concat_excluded, excluded_rows

TEXT = ("compressed_reasoning",)


def filter_compressions(comps: pl.DataFrame, judgments: Optional[pl.DataFrame], require_within: bool):
    """Keep compressions that preserved the answer, met the budget and passed the judge."""
    excluded = []
    bad = comps.filter(~pl.col("answer_preserved"))
    excluded.append(excluded_rows(bad, "answer_changed", pl.format("predicted {} gold {}", "predicted_answer", "gold_answer")))
    comps = comps.filter(pl.col("answer_preserved"))
    if require_within:
        bad = comps.filter(~pl.col("within_tolerance"))
        excluded.append(excluded_rows(bad, "over_budget", pl.format("deviation {}", pl.col("deviation").round(3))))
        comps = comps.filter(pl.col("within_tolerance"))
    if judgments is not None:
        j = judgments.select("compression_id", "verdict", "score", "parse_error")
        comps = comps.join(j, on="compression_id", how="left")
        reason = (
            pl.when(pl.col("verdict").is_null()).then(pl.lit("judge_error"))
            .when(pl.col("verdict") == "unparsable").then(pl.lit("judge_unparsable"))
            .when(pl.col("verdict") != "pass").then(pl.lit("judge_rejected"))
        )
        comps = comps.with_columns(reason.alias("_r"))
        excluded.append(excluded_rows(comps.filter(pl.col("_r").is_not_null()), pl.col("_r"),
                                      pl.format("verdict {} score {}", "verdict", "score")).drop("_r"))
        comps = comps.filter(pl.col("_r").is_null()).drop("_r", "verdict", "score", "parse_error")
    return comps, concat_excluded(*excluded)


class FilterStage(Stage):
    name = "filtered_compressions"
    reads = ("compressions", "judgments")
    sections = ("format.require_within_tolerance",)

    def enabled(self, recipe) -> bool:
        return recipe.compression is not None

    def run(self, ctx) -> Iterator[ShardResult]:
        store = ctx.store
        names = store.columns("compressions")
        comps = store.read("compressions", columns=[c for c in names if c not in TEXT])
        judgments = store.read("judgments") if ctx.recipe.judge is not None and store.exists("judgments") else None
        kept, excluded = filter_compressions(comps, judgments, ctx.recipe.format.require_within_tolerance)
        yield ShardResult(kept=kept, excluded=excluded, rows_in=comps.height)
