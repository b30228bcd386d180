"""Imported teacher traces: reuse published or earlier chains instead of sampling a teacher.

A trace source is matched to the recipe's problems by normalized question text, then judged by
exactly the rules sampled traces get (split, extract, verify against the problem's gold
answer, count student tokens). A source's own correctness flag is recorded, never trusted:
``flag_disagrees`` marks the rows where it and our verifier differ.
"""

from __future__ import annotations

import polars as pl

from bard_data.config.sources import TraceColumns, TraceSource
from bard_data.errors import DataError
from bard_data.pipeline.io import read_table, require_columns
from bard_data.pipeline.stage import ShardResult, Stage, concat_excluded, excluded_rows
from bard_data.stages.teacher import SAMPLE_COLUMNS, verify_samples
from bard_data.text.ids import content_id, normalize_question


def _completion_from(df: pl.DataFrame, cols: TraceColumns, where: str) -> pl.DataFrame:
    if cols.generation:
        return df.rename({cols.generation: "_completion"}) if cols.generation != "_completion" else df
    if cols.reasoning:
        resp = pl.col(cols.response).cast(pl.Utf8).fill_null("") if cols.response else pl.lit("")
        return df.with_columns(
            pl.format("<think>\n{}\n</think>\n\n{}", pl.col(cols.reasoning).cast(pl.Utf8).fill_null(""), resp).alias("_completion")
        )
    raise DataError(f"{where}: set columns.generation, or columns.reasoning (with optional columns.response)")


def load_traces(recipe, src: TraceSource) -> pl.DataFrame:
    path = recipe.resolve(src.path, force=src.format in ("jsonl", "parquet", "datasets"))
    where = f"{recipe.source_file}: traces[{src.name}] {path}"
    df = read_table(path, src.format, src.limit, src.hub_config, src.hub_split)
    if df.height == 0:
        raise DataError(f"{where}: the trace source has no rows")
    cols = src.columns
    require_columns(df, cols.model_dump(), where)
    keep = [c for c in {cols.question, cols.generation, cols.reasoning, cols.response, cols.correct, cols.model} if c]
    df = df.select(keep).with_row_index("source_row")
    # List-valued columns (several generations per problem) explode to one trace each, in step.
    list_cols = [c for c in (cols.generation, cols.reasoning, cols.response, cols.correct, cols.model)
                 if c and isinstance(df.schema[c], pl.List)]
    if list_cols:
        df = df.with_columns(pl.int_ranges(pl.col(list_cols[0]).list.len()).alias("sample_index")).explode([*list_cols, "sample_index"])
    else:
        df = df.with_columns(pl.lit(0, pl.Int64).alias("sample_index"))
    df = _completion_from(df, cols, where)
    return df.select(
        pl.col(cols.question).cast(pl.Utf8).alias("question"),
        pl.col("_completion").cast(pl.Utf8).alias("completion"),
        pl.col("sample_index").cast(pl.Int64),
        pl.col("source_row").cast(pl.Int64),
        (pl.col(cols.correct).cast(pl.Boolean) if cols.correct else pl.lit(None, pl.Boolean)).alias("source_flag"),
        (pl.col(cols.model).cast(pl.Utf8) if cols.model else pl.lit(src.model)).alias("model"),
        pl.lit(f"imported:{src.name}").alias("origin"),
        pl.lit(src.untagged).alias("_untagged"),
    )


class TracesStage(Stage):
    name = "imported_samples"
    reads = ("problems",)
    sections = ("traces", "student")

    def enabled(self, recipe) -> bool:
        return bool(recipe.traces)

    def run(self, ctx):
        problems = ctx.store.read("problems").select("problem_id", "source", "question", "answer")
        problems = problems.with_columns(pl.col("question").map_elements(normalize_question, return_dtype=pl.Utf8).alias("_q"))
        kept_frames, excluded_frames, rows_in = [], [], 0
        for src in ctx.recipe.traces:
            traces = load_traces(ctx.recipe, src)
            rows_in += traces.height
            traces = traces.with_columns(pl.col("question").map_elements(normalize_question, return_dtype=pl.Utf8).alias("_q"))
            joined = traces.join(problems.drop("question"), on="_q", how="left")
            unknown = joined.filter(pl.col("problem_id").is_null())
            joined = joined.filter(pl.col("problem_id").is_not_null())
            empty = joined.filter(pl.col("completion").fill_null("").str.strip_chars() == "")
            joined = joined.filter(pl.col("completion").fill_null("").str.strip_chars() != "")
            df = joined.with_columns(
                pl.struct("origin", "problem_id", "sample_index", "completion")
                .map_elements(lambda r: content_id("s", r["origin"], r["problem_id"], r["sample_index"], r["completion"]), return_dtype=pl.Utf8)
                .alias("sample_id"),
                pl.col("answer").alias("gold_answer"),
                pl.lit(None, pl.Utf8).alias("prompt"),
                pl.lit(None, pl.Int64).alias("completion_tokens"),
                pl.lit("imported").alias("finish_reason"),
            )
            df = verify_samples(ctx, df, src.untagged)
            df = df.with_columns(
                (pl.col("source_flag").is_not_null() & (pl.col("source_flag") != pl.col("is_correct"))).alias("flag_disagrees")
            )
            kept_frames.append(df.select(SAMPLE_COLUMNS + ["source_flag", "flag_disagrees", "source_row"]))
            excluded_frames += [
                excluded_rows(unknown.drop("_q"), "unknown_problem", "question not among the recipe's problems"),
                excluded_rows(empty.drop("_q"), "empty_trace", ""),
            ]
        kept = pl.concat(kept_frames, how="diagonal_relaxed")
        disagree = int(kept["flag_disagrees"].sum())
        yield ShardResult(kept=kept, excluded=concat_excluded(*excluded_frames), rows_in=rows_in,
                          counters={"source_flag_disagrees": disagree})
